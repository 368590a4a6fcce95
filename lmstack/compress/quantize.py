"""Weight-only quantization of a model's linears, in place: round-to-nearest (int8, int4) and GPTQ.

    kept = quantize_(model, "int4", group_size=128)
    kept = quantize_(model, "gptq-int4", calibration=[tokens, ...])   # (B, T) token batches

Every nn.Linear (the projections and an untied output head) is replaced through
`lmstack.kernels.swap_linears` by a `kernels` Int8Linear / Int4Linear, and an untied token
embedding table by an Int8Embedding (int8 methods) or Int4Embedding (int4 ones, RTN in the same
groups: a table's inputs are one-hot, so GPTQ has nothing to spread errors over);
`embedding=` chooses otherwise. Norms and a tied table (which is the output head too) stay in
float. A linear whose input width the int4 group size does not divide stays in float, with a
warning; `quantize_` returns the names of such linears.

Both int4 methods produce the same codes, scales and zeros (w = (q - 8) * scale + zero per
group of inputs), so one Int4Linear serves both:
- RTN sets each group's scale and zero from its min and max and rounds every weight.
- GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
  Pre-trained Transformers") quantizes a layer's weight one input column at a time and spreads
  each column's rounding error over the columns not yet quantized, weighted by the inverse
  Hessian of the layer's reconstruction loss ||XW^T - XW_q^T||^2, H = 2 X^T X, accumulated over
  calibration batches. Blocks are done in order, each on the outputs of the blocks before it
  already quantized, as in the paper.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable

import torch
from torch import nn
from tqdm import tqdm

from lmstack.kernels import (
    QUANTIZED_LINEARS,
    Int4Embedding,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    QuantizedEmbedding,
    swap_linears,
)
from lmstack.kernels.packed import PLAIN_LINEARS
from lmstack.kernels.quantized import INT4_GROUP_SIZES, KERNEL_DTYPE

METHODS = ("int8", "int4", "gptq-int4")
EMBEDDINGS = ("int8", "int4", "float")


def quantize_(model: nn.Module, method: str, group_size: int = 128,
              calibration: Iterable[torch.Tensor] | None = None, block_size: int = 128,
              damp: float = 0.01, progress: bool = True, embedding: str | None = None) -> list[str]:
    """Replace the model's linears by quantized ones, in place; return the names kept in float.

    calibration: (B, T) token batches for GPTQ (read once per Transformer block).
    block_size: GPTQ's columns per lazy update, rounded up to a multiple of group_size.
    damp: GPTQ adds damp * mean(diag H) to H's diagonal, which keeps its inverse stable.
    embedding: an untied token table's format, "int8", "int4" (in groups of group_size; int8
    where that does not divide the model width) or "float"; None: the method's bits.
    """
    _check(model, method, group_size, calibration, damp)
    embedding = embedding or method[-4:]
    if embedding not in EMBEDDINGS:
        raise ValueError(f"embedding={embedding!r}: choose one of {', '.join(EMBEDDINGS)} (--embedding)")
    if embedding == "int4" and method == "int8":
        raise ValueError("an int4 token table takes the int4 linears' groups: with --method int8 "
                         "choose --embedding int8 or float")
    kept = _kept(model, method, group_size)
    if method == "gptq-int4":
        _gptq_model(model, list(calibration), group_size, block_size, damp, kept, progress)
    else:
        make = rtn_int8 if method == "int8" else functools.partial(rtn_int4, group_size=group_size)
        _swap(model, {m: make(m) for name, m in _plain_linears(model) if name not in kept})
    table = model.embed_tokens
    if embedding != "float" and not model.config.tie_embeddings and type(table) is nn.Embedding:
        if embedding == "int4" and table.embedding_dim % group_size == 0:
            new = rtn_int4_embedding(table, group_size)
        else:
            new = rtn_int8_embedding(table)
        swap_linears(model, {nn.Embedding: lambda m: new if m is table else m})
    return kept


def _check(model: nn.Module, method: str, group_size: int, calibration, damp: float) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r}: choose one of {', '.join(METHODS)} (--method)")
    done = [name for name, m in model.named_modules() if isinstance(m, (*QUANTIZED_LINEARS, QuantizedEmbedding))]
    if done:
        raise ValueError(f"the model is already quantized ({len(done)} quantized linears, e.g. "
                         f"{done[0]}); quantize the float model it came from instead")
    if method != "int8" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size={group_size}: int4 takes one of {INT4_GROUP_SIZES} (--group-size)")
    if method == "gptq-int4" and calibration is None:
        raise ValueError("gptq-int4 needs calibration data: pass --calibration DATA (a prepared "
                         "shards directory or a text file), or calibration= token batches")
    if not 0 <= damp < 1:
        raise ValueError(f"damp={damp} must be in [0, 1) (--damp)")


def _plain_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules() if type(m) in PLAIN_LINEARS]


def _kept(model: nn.Module, method: str, group_size: int) -> list[str]:
    """Linears that int4 cannot group (input width not a multiple of group_size), with a warning."""
    if method == "int8":
        return []
    kept = [name for name, m in _plain_linears(model) if m.in_features % group_size]
    if kept:
        warnings.warn(f"group size {group_size} does not divide the input width of {kept}; these "
                      "stay in float (choose a --group-size that divides them to quantize them)",
                      UserWarning, stacklevel=3)
    return kept


def _swap(module: nn.Module, replacements: dict[nn.Module, nn.Module]) -> None:
    """Put each linear's replacement in its place (through the kernels' one entry point)."""
    swap_linears(module, {kind: lambda m: replacements.get(m, m) for kind in PLAIN_LINEARS})


# ----------------------------------------------------------------------------- round to nearest

def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (N, K) -> codes (N, K) int8 and scales (N,) = max |w| / 127
    (in the weight's dtype)."""
    w = weight.detach().float()
    scales = _grid_value((w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny),
                         weight.dtype)
    return (w / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8), scales


def rtn_int8(linear: nn.Linear) -> Int8Linear:
    """Symmetric int8 per output channel."""
    return Int8Linear.from_codes(*int8_rows(linear.weight), linear.bias)


def rtn_int8_embedding(table: nn.Embedding) -> Int8Embedding:
    """Symmetric int8 per row (token) of an embedding table."""
    return Int8Embedding.from_codes(*int8_rows(table.weight))


def rtn_int4_embedding(table: nn.Embedding, group_size: int) -> Int4Embedding:
    """Asymmetric int4 in groups of group_size values of each row, rounded to nearest."""
    w = table.weight.detach().float().unflatten(1, (-1, group_size))  # (V, C/G, G)
    scales, zeros = group_grid(w, table.weight.dtype)
    return Int4Embedding.from_codes(int4_codes(w, scales, zeros).flatten(1), scales, zeros, group_size)


def group_grid(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero (each (N, groups), stored in dtype) of groups w (N, groups, G): the 16
    codes span each group's [min, max]; zero is the value of code 8."""
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scales = _grid_value(((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny), dtype)
    return scales, _grid_value(low + 8 * scales.float(), dtype)


def _grid_value(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t rounded to a number of the kernels' dtype (bf16), stored in dtype: the kernels then
    compute with exactly the weights the file describes, whatever the model's dtype."""
    return t.to(KERNEL_DTYPE).to(dtype)


def int4_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The nearest code of each weight: w (..., G) with scales and zeros (...,) -> q in [0, 15]."""
    q = ((w - zeros.float()[..., None]) / scales.float()[..., None]).round() + 8
    return q.clamp(0, 15)


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    return (q - 8) * scales.float()[..., None] + zeros.float()[..., None]


def rtn_int4(linear: nn.Linear, group_size: int) -> Int4Linear:
    """Asymmetric int4 in groups of group_size inputs, each weight rounded to its nearest code."""
    w = linear.weight.detach().float().unflatten(1, (-1, group_size))  # (N, K/G, G)
    scales, zeros = group_grid(w, linear.weight.dtype)
    codes = int4_codes(w, scales, zeros).flatten(1)
    return Int4Linear.from_codes(codes, scales, zeros, linear.bias, group_size)


# ----------------------------------------------------------------------------- GPTQ

def gptq_int4(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, block_size: int = 128,
              damp: float = 0.01, dtype: torch.dtype | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ of one (N, K) weight given H (K, K) -> codes (N, K), scales and zeros (N, K/G).

    Columns go left to right; each is rounded on its group's grid (set from the group's
    columns when the first of them is reached, after every earlier update), and its error,
    divided by the diagonal of the Cholesky factor of H^-1, is subtracted from the columns to
    its right in proportion to that factor's row. Within a block of columns updates are
    immediate; the columns after the block get them all at once (the paper's lazy batches).
    """
    dtype = dtype or weight.dtype
    W = weight.detach().float().clone()
    N, K = W.shape
    U = _inverse_hessian_factor(hessian.float(), damp, W)
    block = -(-max(block_size, group_size) // group_size) * group_size
    codes = torch.zeros_like(W)
    scales = torch.zeros(N, K // group_size, dtype=dtype, device=W.device)
    zeros = torch.zeros_like(scales)
    for start in range(0, K, block):
        stop = min(start + block, K)
        errors = torch.zeros(N, stop - start, device=W.device)
        for j in range(start, stop):
            if j % group_size == 0:
                g = slice(j // group_size, j // group_size + 1)
                scales[:, g], zeros[:, g] = group_grid(W[:, None, j:j + group_size], dtype)
                scales_g, zeros_g = scales[:, g], zeros[:, g]  # (N, 1)
            codes[:, j] = int4_codes(W[:, j:j + 1, None], scales_g, zeros_g)[:, 0, 0]
            error = (W[:, j] - dequantize_int4(codes[:, j:j + 1, None], scales_g, zeros_g)[:, 0, 0]) / U[j, j]
            W[:, j:stop] -= error[:, None] * U[j, j:stop][None]
            errors[:, j - start] = error
        W[:, stop:] -= errors @ U[start:stop, stop:]
    return codes, scales, zeros


def _inverse_hessian_factor(H: torch.Tensor, damp: float, W: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping)^-1. Inputs never seen (zero diagonal) get a unit
    diagonal and their weights are zeroed, as in the paper's code."""
    H = H.clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(damp * H.diagonal().mean())
    try:
        L = torch.linalg.cholesky(H)
        return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except torch.linalg.LinAlgError as e:
        raise ValueError(f"the calibration Hessian is not positive definite even with damp={damp}; "
                         "raise --damp or give more --calibration data") from e


class _Stop(Exception):
    """Raised after the block being calibrated has run: the rest of the forward is not needed."""


def hessians(model: nn.Module, stage: nn.Module, linears: list[nn.Linear],
             batches: list[torch.Tensor]) -> dict[nn.Linear, torch.Tensor]:
    """X^T X of each linear's inputs X over the calibration batches, running the model only up
    to the end of `stage` (H = 2 X^T X up to a factor GPTQ does not depend on)."""
    found = {m: torch.zeros(m.in_features, m.in_features, device=m.weight.device) for m in linears}

    def record(m, args):
        x = args[0].detach().reshape(-1, m.in_features).float()  # (rows, K)
        found[m].addmm_(x.t(), x)

    def stop(m, args, out):
        raise _Stop

    hooks = [m.register_forward_pre_hook(record) for m in linears]
    hooks.append(stage.register_forward_hook(stop))
    try:
        with torch.no_grad():
            for tokens in batches:
                try:
                    model(tokens.to(model.embed_tokens.weight.device))
                except _Stop:
                    pass
    finally:
        for h in hooks:
            h.remove()
    unseen = [m for m in linears if not found[m].any()]
    if unseen:
        raise ValueError(f"{len(unseen)} linears never ran as modules during calibration (a packed "
                         "or fused fanout runs them as one product): quantize the model before "
                         "kernels are swapped in")
    return found


def _gptq_model(model: nn.Module, batches: list[torch.Tensor], group_size: int, block_size: int,
                damp: float, kept: list[str], progress: bool) -> None:
    """GPTQ block by block (then the linears outside the blocks, such as an untied head)."""
    if not batches:
        raise ValueError("the calibration data holds no batches; give more --calibration text")
    skip = {m for name, m in _plain_linears(model) if name in kept}
    stages = [*model.layers, model]
    for stage in tqdm(stages, desc="GPTQ", unit="layer", disable=not progress):
        linears = [m for _, m in _plain_linears(stage) if m not in skip]
        if not linears:
            continue
        found = hessians(model, stage, linears, batches)
        _swap(stage, {m: _gptq_linear(m, found[m], group_size, block_size, damp) for m in linears})


def _gptq_linear(m: nn.Linear, H: torch.Tensor, group_size: int, block_size: int,
                 damp: float) -> Int4Linear:
    codes, scales, zeros = gptq_int4(m.weight, H, group_size, block_size, damp)
    return Int4Linear.from_codes(codes, scales, zeros, m.bias, group_size)
