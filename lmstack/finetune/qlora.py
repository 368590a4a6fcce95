"""QLoRA (Dettmers et al., 2023): LoRA over a base whose linear weights are stored as NF4.

Each block of 64 weights is scaled by its absmax to [-1, 1] and each weight stored as the nearest
of 16 NormalFloat levels (4 bits, two codes a byte). Products dequantize the weight to bf16 and
multiply in bf16, or in fp32 on a CPU without native bf16 (`compute_dtype`: there bf16 products
are emulated and several times slower, and the bf16 weight converts to fp32 exactly, so only the
sums' precision changes); the weight takes no gradient. The block scales are kept one of two ways:

- double_quant=True (the paper's default): `DoubleQuantNF4Linear`, torchao's `NF4Tensor`, whose
  scales are quantized again to int8 in groups (torchao always does this).
- double_quant=False: `AbsmaxNF4Linear`, our own storage with the scales exact in bf16 (torchao's
  tensor has no such form; bitsandbytes' Params4bit has, but does not compose with FSDP2). The
  weight is rounded to bf16 before quantizing, so every absmax is a bf16 value and bf16 holds it
  exactly; fp32 would cost 2 more bytes a block for nothing.

Both are frozen Parameters that FSDP2's `fully_shard` shards: torchao teaches it NF4Tensor, and
our codes and scales are plain tensors split along their rows.

    apply_lora(model, targets, r, alpha)      # wrap first
    quantize_nf4(model, double_quant=True)    # then every plain linear, adapters' bases too

Merging an adapter into an NF4 base merges into the dequantized weight, which is what the
adapter was trained against (merging into the original float weights instead is the mismatch
reported in artidoro/qlora#28 and huggingface/peft#2105).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.kernels import swap_linears
from lmstack.model.cpu import NATIVE_CPU_BF16

BLOCK_SIZE = 64
"""Weights per absmax block (the QLoRA paper's)."""
MAX_SCALER_BLOCK = 256
"""Block scales per double-quantization group; torchao needs it to divide the block count, so
a weight of n blocks uses gcd(n, 256)."""
COMPUTE_DTYPE = torch.bfloat16
"""The dtype NF4 weights dequantize to (and are stored from)."""


def compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype NF4 products multiply in: bf16, except fp32 on a CPU without native bf16."""
    return torch.float32 if device.type == "cpu" and not NATIVE_CPU_BF16 else COMPUTE_DTYPE


def require_nf4() -> None:
    """ValueError naming the fix when no NF4 implementation can be imported."""
    try:
        import torchao.quantization  # noqa: F401
    except ImportError as e:
        raise ValueError(f"--method qlora needs an NF4 kernel, and torchao cannot be imported "
                         f"({e}); install it: pip install 'lmstack[finetune]' (torchao>=0.10), "
                         "or fine-tune with --method lora") from e


def nf4_levels(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 NF4 levels, ascending, in bf16: torchao's table (read off a one-block NF4Tensor),
    so that both storages round to the same levels."""
    from torchao.quantization import to_nf4
    return to_nf4(torch.ones(BLOCK_SIZE, dtype=COMPUTE_DTYPE, device=device), BLOCK_SIZE, 1).nf4


class NF4Linear(nn.Module):
    """A frozen linear whose weight is stored as NF4 (see the module docstring for the two
    storages); multiplies in `compute_dtype` and returns x's dtype. Subclasses store the weight, `product`
    multiplies by it and `dequantize` returns it."""

    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @staticmethod
    def from_linear(linear: nn.Linear, block_size: int = BLOCK_SIZE,
                    double_quant: bool = True) -> NF4Linear:
        require_nf4()
        w = linear.weight.detach().to(COMPUTE_DTYPE).contiguous()
        if double_quant:
            return DoubleQuantNF4Linear.quantize(w, linear.bias, block_size)
        return AbsmaxNF4Linear.quantize(w, linear.bias, block_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.product(x.to(compute_dtype(x.device)))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The weight the products use, (out, in) in bf16."""
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes the NF4 weight occupies: codes, scales and what it takes to read them."""
        raise NotImplementedError

    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """An nn.Linear over the dequantized weight."""
        weight = self.dequantize()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=weight.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(weight.to(dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class DoubleQuantNF4Linear(NF4Linear):
    """The weight is a torchao NF4Tensor Parameter named `weight` (like the nn.Linear it
    replaces); products run through torchao's `linear_nf4`, with its own backward to the input."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(*weight.shape, bias)
        self.weight = nn.Parameter(weight, requires_grad=False)

    @classmethod
    def quantize(cls, w: torch.Tensor, bias: torch.Tensor | None,
                 block_size: int) -> DoubleQuantNF4Linear:
        from torchao.quantization import to_nf4
        if w.numel() % block_size:
            raise ValueError(f"a {tuple(w.shape)} weight does not split into NF4 blocks of "
                             f"{block_size}; leave this linear out of QLoRA")
        scaler_block = math.gcd(w.numel() // block_size, MAX_SCALER_BLOCK)
        return cls(to_nf4(w, block_size, scaler_block), bias)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4
        return linear_nf4(x, self.weight)

    def dequantize(self) -> torch.Tensor:
        return self.weight.get_original_weight()

    def nbytes(self) -> int:
        names, _ = self.weight.__tensor_flatten__()
        return sum(getattr(self.weight, n).nbytes for n in names)

    def __deepcopy__(self, memo: dict) -> DoubleQuantNF4Linear:
        """Copy the NF4Tensor's inner tensors as they are: its clone, which deepcopy would call,
        quantizes the dequantized weight again with torchao's default scale groups (failing for
        most shapes). Everything else copies as usual, and a weight already in memo (shared, as
        by kernels.graph_view) stays shared."""
        w = self.weight
        if id(w) not in memo:
            names, meta = w.__tensor_flatten__()
            inner = {n: copy.deepcopy(getattr(w, n), memo) for n in names}
            data = type(w).__tensor_unflatten__(inner, meta, w.size(), w.stride())
            memo[id(w)] = nn.Parameter(data, requires_grad=False)
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__setstate__(copy.deepcopy(self.__dict__, memo))
        return clone

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, NF4 (double-quantized scales)"


class AbsmaxNF4Linear(NF4Linear):
    """NF4 codes two a byte, `qweight` (out, in/2) uint8 (the first code of each pair in the high
    nibble), and each block's absmax exact, `absmax` (out, in/block) bf16; blocks run along the
    rows, so in_features must be a multiple of the block size."""

    def __init__(self, qweight: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor,
                 bias: torch.Tensor | None):
        super().__init__(qweight.shape[0], 2 * qweight.shape[1], bias)
        self.qweight = nn.Parameter(qweight, requires_grad=False)
        self.absmax = nn.Parameter(absmax, requires_grad=False)
        self.register_buffer("levels", levels, persistent=False)

    @classmethod
    def quantize(cls, w: torch.Tensor, bias: torch.Tensor | None, block_size: int) -> AbsmaxNF4Linear:
        out_features, in_features = w.shape
        if in_features % block_size or block_size % 2:
            raise ValueError(f"a {tuple(w.shape)} weight does not split into rows of NF4 blocks "
                             f"of {block_size}; leave this linear out of QLoRA or set "
                             "--lora.double-quant true")
        levels = nf4_levels(w.device)
        blocks = w.float().view(out_features, in_features // block_size, block_size)  # (O, I/b, b)
        absmax = blocks.abs().amax(dim=-1)  # (O, I/b), bf16 values held in fp32
        scaled = blocks / torch.where(absmax > 0, absmax, 1.0)[..., None]
        midpoints = (levels[1:].float() + levels[:-1].float()) / 2
        codes = torch.bucketize(scaled, midpoints).to(torch.uint8).view(out_features, in_features)
        qweight = codes[:, 0::2] << 4 | codes[:, 1::2]  # (O, I/2)
        return cls(qweight, absmax.to(COMPUTE_DTYPE), levels, bias)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        return _NF4Product.apply(x, self.qweight, self.absmax, self.levels)

    def dequantize(self) -> torch.Tensor:
        return dequantize_codes(self.qweight, self.absmax, self.levels)

    def nbytes(self) -> int:
        return self.qweight.nbytes + self.absmax.nbytes + self.levels.nbytes

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, NF4 (bf16 absmax scales)"


def dequantize_codes(qweight: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """(out, in) bf16 weight from AbsmaxNF4Linear's codes (out, in/2) and scales (out, in/block)."""
    codes = torch.stack([qweight >> 4, qweight & 0xF], dim=-1).flatten(1).long()  # (O, I)
    out_features, in_features = codes.shape
    blocks = levels.to(COMPUTE_DTYPE)[codes].view(out_features, absmax.shape[1], -1)  # (O, I/b, b)
    return (blocks * absmax.to(COMPUTE_DTYPE)[..., None]).view(out_features, in_features)


class _NF4Product(torch.autograd.Function):
    """x @ W.T with W dequantized in forward and again in backward: autograd keeps the 4-bit
    codes, not a bf16 copy of W, which is QLoRA's memory saving. The codes take no gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, qweight: torch.Tensor, absmax: torch.Tensor,
                levels: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(qweight, absmax, levels)
        return F.linear(x, dequantize_codes(qweight, absmax, levels).to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ dequantize_codes(*ctx.saved_tensors).to(grad.dtype), None, None, None


NF4_LINEARS = (DoubleQuantNF4Linear, AbsmaxNF4Linear)


def quantize_nf4(model: nn.Module, block_size: int = BLOCK_SIZE, double_quant: bool = True) -> int:
    """Replace every plain nn.Linear (LoRA bases included, adapters are not linears) by an
    NF4Linear, in place; return how many. Apply LoRA first: its targets are found by name.
    double_quant=False keeps the block scales exact (bf16) instead of int8 (torchao)."""
    require_nf4()
    return swap_linears(model, {nn.Linear: lambda m: NF4Linear.from_linear(m, block_size, double_quant)})


def base_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the NF4 weights, bytes the same weights take in bf16)."""
    nf4 = [m for m in model.modules() if isinstance(m, NF4Linear)]
    return sum(m.nbytes() for m in nf4), sum(2 * m.in_features * m.out_features for m in nf4)


def dequantize_nf4(model: nn.Module) -> int:
    """Replace every NF4Linear by an nn.Linear over its dequantized weight (fp32), in place."""
    return swap_linears(model, {cls: lambda m: m.to_linear() for cls in NF4_LINEARS})
