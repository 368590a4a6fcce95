"""Weight-only quantized linears, swapped in for nn.Linear: int8 per output channel, int4 in groups.

Unlike the packed linears, these hold no `weight` Parameter: they own integer codes and their
scales as buffers, so a state_dict holds, under the linear's own name,
    <name>.qweight  int8 (N, K) codes                 | uint8 (N, K/2), two int4 codes a byte
    <name>.scales   (N,) one per output channel       | (N, K/G) one per group of G inputs
    <name>.zeros                                      | (N, K/G)
    <name>.bias     as nn.Linear's, if it has one
(N outputs, K inputs, G the group size). `Int8Linear`: w = q * scale, q in [-127, 127].
`Int4Linear`: w = (q - 8) * scale + zero, q in [0, 15], `zero` the value of code 8 (the
convention of torch's int4 kernels); in the file byte j of a row holds the codes of inputs 2j
(low nibble) and 2j + 1 (high nibble).

Products run on the integer kernels torch ships, where the device has one (`has_kernel`):
`torch._weight_int8pack_mm`, and `torch._weight_int4pack_mm_for_cpu` (CPU) or
`torch._weight_int4pack_mm` (CUDA) on the codes reordered for them when the module is loaded or
moved (`prepare`). On CPU the reordered codes replace the file's order in memory (one copy; the
state_dict is written in the file's order again); on CUDA they are a second copy. The kernels
take bf16 activations (`KERNEL_DTYPE`): activations of other dtypes are cast in and out
(eagerly; compiled graphs keep x's dtype). Inside, how they round depends on the CPU (on AVX2
they dequantize to bf16; on AVX-512 they dequantize and sum in fp32). The tile path always
dequantizes to bf16, where the CPU's bf16 products are several times faster than fp32 ones, so
the two paths agree to bf16 rounding, and exactly only where the kernel also rounds to bf16.
Without a kernel a module warns once and runs the tile path below on every call.

Many rows (prefill) do not go to the kernels, which read and dequantize the whole packed weight
once per `KERNEL_ROW_BLOCK` rows of x. Above `max_kernel_rows` rows (a rule, measured once per
process: `measure_max_kernel_rows`) the weight is dequantized tile by tile (blocks of output
rows) and multiplied by F.linear, so the float weight never exists whole.
`dequantize()` and `reference()` are the plain path the tests compare against.
"""

from __future__ import annotations

import functools
import timeit
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.model.cpu import NATIVE_CPU_BF16

INT4_GROUP_SIZES = (32, 64, 128, 256)
"""Group sizes torch's int4 kernels accept."""

KERNEL_ROW_BLOCK = 4
"""Rows of x that ATen's CPU int8 / int4 kernels compute per pass over the packed weight."""

KERNEL_DTYPE = torch.bfloat16
"""What the kernels compute in: their fast (vectorized) paths are bf16; their fp32 ones are scalar."""

INT4_MIN_ROW_BLOCK = 16
"""The int4 kernels take output rows in blocks of 16 (N must be a multiple of it)."""

KERNEL_ALIGNMENT = 64
"""Bytes the int8 kernel's operands are aligned to: its AVX-512 path reads them with aligned
vector loads and crashes on a tensor that starts elsewhere (a view into a loaded file, a slice)."""


def aligned(t: torch.Tensor) -> torch.Tensor:
    """t, or a fresh copy of it (the allocator aligns new tensors) when it starts unaligned.
    Traced code has no data pointers to check: there inductor lowers the kernel's op into code
    of its own, over buffers it allocates."""
    if torch.compiler.is_compiling():
        return t
    return t if t.data_ptr() % KERNEL_ALIGNMENT == 0 else t.clone()


_MAX_KERNEL_ROWS: dict[tuple[type, str], int] = {}  # by (module type, device type), once per process


def measure_max_kernel_rows(m: QuantizedLinear) -> int:
    """The most rows of x the kernel runs for modules of m's type on m's device; more rows are
    dequantized tile by tile.

    The rule: the kernel reads and dequantizes the whole weight once per KERNEL_ROW_BLOCK rows,
    the tile path once per call (then a dense product, which both paths pay for in some form),
    so the kernel is kept while ceil(rows / KERNEL_ROW_BLOCK) one-row kernel calls cost less
    than one dequantization. The ratio of the two depends on the CPU (how fast it runs dense
    bf16 or fp32 products, the int4 unpacking), so it is timed once, on the first module
    prepared there; it does not depend much on the weight's shape (both scale with N x K).
    """
    key = (type(m), m.qweight.device.type)
    if key not in _MAX_KERNEL_ROWS:
        x = torch.randn(1, m.in_features, dtype=KERNEL_DTYPE, device=m.qweight.device)
        one_row = _best_time(lambda: m._kernel_product(x), m.qweight.device)
        dtype = tile_dtype(KERNEL_DTYPE, m.qweight.device)
        dequantize = _best_time(lambda: m.dequantize_rows(0, m.out_features, dtype), m.qweight.device)
        _MAX_KERNEL_ROWS[key] = KERNEL_ROW_BLOCK * max(1, int(dequantize / one_row))
    return _MAX_KERNEL_ROWS[key]


def _best_time(run, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed():
        run()
        sync()
    timed()  # warm-up
    return min(timeit.repeat(timed, number=1, repeat=3))


def tile_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """What the tile path computes in: x's dtype, except fp32 for bf16 / fp16 on a CPU without
    native bf16 instructions, where those products are emulated and several times slower."""
    emulated = device.type == "cpu" and not NATIVE_CPU_BF16 and dtype in (torch.bfloat16, torch.float16)
    return torch.float32 if emulated else dtype


def has_kernel(op: str, device: torch.device) -> bool:
    """Whether torch registers `aten::<op>` for this device type (the capability check)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", device.type.upper())


def _warn_reference(kind: str, device: torch.device, why: str) -> None:
    warnings.warn(f"{kind} on {device.type}: {why}; it runs on the reference path (dequantized "
                  "tile by tile, then F.linear), which is slower", RuntimeWarning, stacklevel=3)


# ----------------------------------------------------------------------------- int4 code orders

def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(..., 2m) codes in [0, 15] -> (..., m) uint8: code 2j in the low nibble, 2j + 1 high."""
    pairs = codes.to(torch.uint8).unflatten(-1, (-1, 2))
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: (..., m) uint8 -> (..., 2m) uint8 codes."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


@functools.cache
def _cpu_slot_rows(n: int) -> torch.Tensor | None:
    """For a block of n output rows in the CPU int4 kernel's order: which row (0..n-1) each
    nibble of one input column holds, read off the kernel's own converter on a probe whose
    codes spell each row's index; None where n rows do not form one block of that order."""
    rows = torch.arange(n, dtype=torch.int32)
    probe = torch.stack([rows & 15, rows >> 4], dim=1)  # (n, 2): the row index, two 4-bit digits
    packed = torch._convert_weight_to_int4pack_for_cpu(probe, 1).view(2, n // 2)  # (K, n/2)
    digits = unpack_int4(packed).int()  # (K, n): nibble slots of each input column
    found = digits[0] + 16 * digits[1]
    return found if torch.equal(found.sort().values, rows) else None


@functools.cache
def _nibbles_hold_halves(n: int) -> bool:
    """Whether byte j of an input column, in blocks of n rows, holds rows j (low nibble) and
    j + n/2, as the converter writes whole blocks on x86 (read off its probe, not assumed)."""
    return torch.equal(_cpu_slot_rows(n), torch.arange(n).view(2, n // 2).t().flatten())


@functools.cache
def cpu_block_rows() -> int:
    """Output rows per block of the CPU int4 kernel's order (the largest one-block probe)."""
    return max(n for n in (16, 32, 64, 128, 256) if _cpu_slot_rows(n) is not None)


def to_cpu_order(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes -> (N, K/2) uint8 in the order torch's CPU int4 kernel reads."""
    return torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)


def from_cpu_order(packed: torch.Tensor) -> torch.Tensor:
    """(R, K/2) uint8 rows in the CPU kernel's order (R whole blocks, the last one maybe
    shorter, as in a whole weight) -> (R, K) uint8 codes."""
    rows, K = packed.shape[0], packed.shape[1] * 2
    block = cpu_block_rows()
    full = rows - rows % block
    parts = [_blocks_from_cpu_order(packed[:full], block, K)] if full else []
    if rows > full:
        parts.append(_blocks_from_cpu_order(packed[full:], rows - full, K))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _blocks_from_cpu_order(packed: torch.Tensor, n: int, K: int) -> torch.Tensor:
    slots = _cpu_slot_rows(n)
    if slots is None:
        raise ValueError(f"blocks of {n} rows are not in the CPU int4 kernel's order")
    if _nibbles_hold_halves(n):  # transpose the bytes; each nibble is then half a block, no gather
        by_byte = packed.reshape(-1, K, n // 2).transpose(1, 2).contiguous()  # (blocks, n/2, K)
        return torch.stack([by_byte & 15, by_byte >> 4], dim=1).reshape(-1, K)
    nibbles = unpack_int4(packed.reshape(-1, K, n // 2))  # (blocks, K, n) by slot
    return nibbles.transpose(1, 2)[:, slots.argsort()].reshape(-1, K)  # (blocks * n, K) by row


# ----------------------------------------------------------------------------- the modules

class QuantizedLinear(nn.Module):
    """What Int8Linear and Int4Linear share: the choice of path per call, the tile path, the
    bias, and re-preparing the kernel's layout whenever the module is moved, cast or loaded."""

    bits: int
    kernel: str | None = None
    """Which kernel serves the module where it lives ("cpu", "cuda"), None for none."""
    max_kernel_rows: int = 0
    """Inputs of more rows run the tile path (set by prepare: measure_max_kernel_rows)."""

    def _init(self, in_features: int, out_features: int, bias: bool, device, dtype) -> None:
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if not bias else nn.Parameter(
            torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # With a kernel, every path takes bf16 in and gives bf16 out (fp32 sums). Traced code keeps x's dtype:
        # inductor writes its own code for these products, and its CPU flex-attention template
        # takes no cast as an epilogue.
        eager_kernel = self.kernel is not None and not torch.compiler.is_compiling()
        dtype = KERNEL_DTYPE if eager_kernel else x.dtype
        x2 = x.reshape(-1, self.in_features).to(dtype)  # (M, K)
        if self.path(x2) == "kernel":
            y = self._kernel_product(x2.contiguous())
        else:
            y = self._tiled_product(x2.to(tile_dtype(dtype, x.device))).to(dtype)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def path(self, x: torch.Tensor) -> str:
        """"kernel" or "tiles" for this (M, K) input: the kernel while it has at most
        max_kernel_rows rows and no gradient is wanted (the integer kernels have no backward)."""
        use = (self.kernel is not None and x.shape[0] <= self.max_kernel_rows
               and not (torch.is_grad_enabled() and x.requires_grad))
        return "kernel" if use else "tiles"

    def _tiled_product(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T by tiles of output rows, each dequantized in x's dtype. A tile has as many
        rows as x, or as the weight has inputs if that is more (rounded up to the codes' row
        alignment): its float copy is no larger than x or one K x K square, each product is
        about square, and a few-row x (without a kernel) is not split into many tiny products."""
        align = self._row_align()
        tile = -(-max(x.shape[0], self.in_features) // align) * align
        return torch.cat([F.linear(x, self.dequantize_rows(r, min(r + tile, self.out_features), x.dtype))
                          for r in range(0, self.out_features, tile)], dim=-1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (N, K) float weight these codes stand for."""
        return self.dequantize_rows(0, self.out_features, dtype)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The plain path: F.linear on the whole dequantized weight, in fp32, cast to x's dtype."""
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.dequantize(), bias).to(x.dtype)

    def _row_align(self) -> int:
        return 1

    def _set_bias(self, bias: torch.Tensor | None) -> None:
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().to(self.scales.dtype), requires_grad=False)

    def prepare(self) -> None:
        """Choose the kernel for the module's device and lay its tensors out for it."""

    def unprepare(self) -> None:
        """Back to the file's layout (before a move, a cast or a load)."""

    def _apply(self, fn, recurse: bool = True):
        self.unprepare()
        super()._apply(fn, recurse)
        self.prepare()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        self.unprepare()
        super()._load_from_state_dict(state_dict, prefix, *args)
        self.prepare()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, kernel={self.kernel}")


class Int8Linear(QuantizedLinear):
    """y = x @ (q * scale).T + bias, int8 codes per output channel; torch._weight_int8pack_mm
    reads the codes as they are stored, so there is nothing to prepare but the choice."""

    bits = 8

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self._init(in_features, out_features, bias, device, dtype)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))
        self.register_buffer("kernel_scales", None, persistent=False)  # in KERNEL_DTYPE
        self.prepare()

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor,
                   bias: torch.Tensor | None) -> Int8Linear:
        """From (N, K) int8 codes and (N,) scales (the module takes these tensors)."""
        with torch.device("meta"):
            m = cls(codes.shape[1], codes.shape[0], bias is not None, dtype=scales.dtype)
        m.qweight, m.scales = codes.to(torch.int8), scales
        m._set_bias(bias)
        m.prepare()
        return m

    def prepare(self) -> None:
        self.unprepare()
        device = self.qweight.device
        if device.type == "meta":
            return
        if not has_kernel("_weight_int8pack_mm", device):
            _warn_reference("Int8Linear", device, "torch has no int8 weight-only kernel there")
            return
        self.qweight = aligned(self.qweight)
        self.kernel_scales, self.kernel = aligned(self.scales.to(KERNEL_DTYPE)), device.type
        self.max_kernel_rows = measure_max_kernel_rows(self)

    def unprepare(self) -> None:
        self.kernel, self.kernel_scales = None, None

    def _kernel_product(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(aligned(x), self.qweight, aligned(self.kernel_scales.to(x.dtype)))

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        return self.qweight[start:stop].to(dtype) * self.scales[start:stop, None].to(dtype)


class Int4Linear(QuantizedLinear):
    """y = x @ ((q - 8) * scale + zero).T + bias, int4 codes with a scale and a zero per group
    of `group_size` inputs (see the module docstring for the layouts)."""

    bits = 4

    def __init__(self, in_features: int, out_features: int, group_size: int = 128,
                 bias: bool = True, device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if group_size not in INT4_GROUP_SIZES or in_features % group_size:
            raise ValueError(f"group_size={group_size} for a linear of {in_features} inputs: "
                             f"choose one of {INT4_GROUP_SIZES} that divides {in_features}")
        self._init(in_features, out_features, bias, device, dtype)
        self.group_size = group_size
        self.order = "rows"
        """How qweight holds the codes: "rows" (the file's) or "cpu" (the CPU kernel's)."""
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=dtype, device=device))
        # made by prepare(), not in the state_dict: (K/G, N, 2) scales and zeros side by side as
        # the kernels read them; the CUDA kernel's copy of the codes (on CPU qweight is reordered)
        self.register_buffer("kernel_scales", None, persistent=False)
        self.register_buffer("kernel_weight", None, persistent=False)
        self.prepare()

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   bias: torch.Tensor | None, group_size: int) -> Int4Linear:
        """From (N, K) codes in [0, 15] and (N, K/G) scales and zeros."""
        with torch.device("meta"):
            m = cls(codes.shape[1], codes.shape[0], group_size, bias is not None, dtype=scales.dtype)
        m.qweight, m.scales, m.zeros = pack_int4(codes), scales, zeros.to(scales.dtype)
        m._set_bias(bias)
        m.prepare()
        return m

    def codes(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """(rows, K) uint8 codes of output rows [start, stop), whatever order qweight holds
        (in the CPU kernel's order, start and stop must fall on its blocks of rows)."""
        packed = self.qweight[start:stop]
        if self.order == "rows":
            return unpack_int4(packed)
        block, stop = cpu_block_rows(), self.out_features if stop is None else stop
        if start % block or stop % block and stop != self.out_features:
            raise ValueError(f"rows [{start}, {stop}) cut the CPU kernel's blocks of {block} rows")
        return from_cpu_order(packed)

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        codes = self.codes(start, stop).unflatten(-1, (-1, self.group_size))  # (rows, K/G, G)
        scales = self.scales[start:stop, :, None].to(dtype)
        offsets = self.zeros[start:stop, :, None].to(dtype) - 8 * scales  # the value of code 0
        return torch.addcmul(offsets, codes.to(dtype), scales).flatten(-2)

    def _row_align(self) -> int:
        return cpu_block_rows() if self.order == "cpu" else 1

    # ------------------------------------------------------------------------- kernel layouts

    def prepare(self) -> None:
        self.unprepare()
        device = self.qweight.device
        if device.type == "meta":
            return
        why = self._no_kernel_reason(device)
        if why is not None:
            _warn_reference("Int4Linear", device, why)
            return
        self.kernel_scales = torch.stack([self.scales.t(), self.zeros.t()], dim=-1).to(KERNEL_DTYPE).contiguous()
        codes = unpack_int4(self.qweight)
        if device.type == "cuda":
            self.kernel_weight = _to_cuda_order(codes)
        else:
            reordered = to_cpu_order(codes)
            if not torch.equal(from_cpu_order(reordered), codes):
                self.kernel_scales = None
                _warn_reference("Int4Linear", device, "the CPU kernel's code order is not the one "
                                "lmstack reads (a torch it was not written for?)")
                return
            self.qweight, self.order = reordered, "cpu"
        self.kernel = device.type
        self.max_kernel_rows = measure_max_kernel_rows(self)

    def _no_kernel_reason(self, device: torch.device) -> str | None:
        op = "_weight_int4pack_mm_for_cpu" if device.type == "cpu" else "_weight_int4pack_mm"
        if device.type not in ("cpu", "cuda") or not has_kernel(op, device):
            return "torch has no int4 weight-only kernel there"
        if self.out_features % INT4_MIN_ROW_BLOCK:
            return f"its kernel needs outputs in multiples of {INT4_MIN_ROW_BLOCK}"
        return None

    def unprepare(self) -> None:
        if self.order == "cpu":
            self.qweight, self.order = pack_int4(from_cpu_order(self.qweight)), "rows"
        self.kernel, self.kernel_scales, self.kernel_weight = None, None, None

    def _kernel_product(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "cuda":
            return torch._weight_int4pack_mm(x, self.kernel_weight, self.group_size, self.kernel_scales)
        scales = self.kernel_scales.to(x.dtype)
        return torch._weight_int4pack_mm_for_cpu(x, self.qweight, self.group_size, scales)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.order == "cpu":  # the file always holds the codes packed along the inputs
            destination[prefix + "qweight"] = pack_int4(self.codes())


def _to_cuda_order(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes -> the CUDA int4 kernel's tiles (its converter takes two codes a byte, the
    earlier input high, and inner k-tiles of 16 inputs)."""
    K = codes.shape[1]
    inner = next(t for t in (8, 4, 2) if K % (16 * t) == 0)
    pairs = codes.to(torch.uint8).unflatten(-1, (-1, 2))
    return torch._convert_weight_to_int4pack((pairs[..., 0] << 4) | pairs[..., 1], inner)


class QuantizedEmbedding(nn.Module):
    """nn.Embedding's lookup over integer codes: a row is dequantized when a token looks it up,
    so the float table never exists. A decode step reads one row per token, so a table's bytes
    are memory, not time. It holds no `weight`, so a tied table (the output head too) stays
    nn.Embedding. Layouts under the embedding's own name (V tokens, C the model width):
        Int8Embedding  <name>.qweight int8 (V, C), <name>.scales (V,): row v = q * scales[v]
        Int4Embedding  <name>.qweight uint8 (V, C/2), <name>.scales and .zeros (V, C/G): as
                       Int4Linear's file layout, one group of G values of a row per scale
    """

    bits: int

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids, self.scales.dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (V, C) float table these codes stand for."""
        return self.rows(torch.arange(self.num_embeddings, device=self.qweight.device), dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int{self.bits}"


class Int8Embedding(QuantizedEmbedding):
    """Symmetric int8 codes, one scale per row (token)."""

    bits = 8

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(num_embeddings, dtype=dtype, device=device))

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor) -> Int8Embedding:
        """From (V, C) int8 codes and (V,) scales (the module takes these tensors)."""
        with torch.device("meta"):
            m = cls(codes.shape[0], codes.shape[1], dtype=scales.dtype)
        m.qweight, m.scales = codes.to(torch.int8), scales
        return m

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return F.embedding(ids, self.qweight).to(dtype) * F.embedding(ids, self.scales[:, None]).to(dtype)


class Int4Embedding(QuantizedEmbedding):
    """Asymmetric int4 codes in groups of `group_size` values of a row, w = (q - 8) * scale + zero."""

    bits = 4

    def __init__(self, num_embeddings: int, embedding_dim: int, group_size: int = 128,
                 device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if group_size not in INT4_GROUP_SIZES or embedding_dim % group_size:
            raise ValueError(f"group_size={group_size} for a table {embedding_dim} wide: choose "
                             f"one of {INT4_GROUP_SIZES} that divides {embedding_dim}")
        self.num_embeddings, self.embedding_dim, self.group_size = num_embeddings, embedding_dim, group_size
        groups = embedding_dim // group_size
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(num_embeddings, groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.zeros(num_embeddings, groups, dtype=dtype, device=device))

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   group_size: int) -> Int4Embedding:
        """From (V, C) codes in [0, 15] and (V, C/G) scales and zeros."""
        with torch.device("meta"):
            m = cls(codes.shape[0], codes.shape[1], group_size, dtype=scales.dtype)
        m.qweight, m.scales, m.zeros = pack_int4(codes), scales, zeros.to(scales.dtype)
        return m

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        codes = unpack_int4(F.embedding(ids, self.qweight)).unflatten(-1, (-1, self.group_size))
        scales = F.embedding(ids, self.scales).to(dtype)[..., None]  # (..., C/G, 1)
        zeros = F.embedding(ids, self.zeros).to(dtype)[..., None]
        return ((codes.to(dtype) - 8) * scales + zeros).flatten(-2)
