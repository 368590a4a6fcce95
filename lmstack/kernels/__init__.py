"""Drop-in modules swapped into a model from outside: one entry point, `swap_linears`.

    swap_linears(model, CPU_PACKED)     # eager CPU inference on oneDNN-packed weights
    swap_linears(model, FUSED)          # q/k/v and gate/up as one product each, for training
    swap_linears(model, {nn.Linear: make_int4})  # quantized linears: lmstack.compress.quantize_

A policy maps the exact type of a module (nn.Linear, or the model's seams `Fanout` and
`TiedHead`) to a function that builds its replacement; modules of other types (a LoRA wrapper,
a quantized linear) are left as they are, and the kernels around them still run.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lmstack.kernels.packed import (
    FusedFanout,
    PackedFanout,
    PackedLinear,
    PackedTiedHead,
    drop_copies,
    graph_view,
)
from lmstack.kernels.quantized import (
    Int4Embedding,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    QuantizedEmbedding,
    QuantizedLinear,
)
from lmstack.model.transformer import Fanout, TiedHead

Policy = dict[type, Callable[[nn.Module], nn.Module]]

CPU_PACKED: Policy = {
    nn.Linear: PackedLinear.from_linear,
    Fanout: lambda m: PackedFanout(*m.names),
    TiedHead: lambda m: PackedTiedHead(),
}
FUSED: Policy = {Fanout: lambda m: FusedFanout(*m.names)}
QUANTIZED_LINEARS = (Int8Linear, Int4Linear)
"""Weight-only quantized stand-ins for nn.Linear (lmstack.kernels.quantized)."""


def activation_like(model: nn.Module):
    """A tensor of the dtype and device the model computes in: its final norm's weight, which
    no kernel replaces (quantization leaves the linears and the embedding table integer codes)."""
    return model.norm.weight


def swap_linears(model: nn.Module, policy: Policy) -> int:
    """Replace, in place, every module whose exact type the policy names; return how many."""
    found = [(owner, name, child) for owner in model.modules()
             for name, child in owner.named_children() if type(child) in policy]
    for owner, name, child in found:
        setattr(owner, name, policy[type(child)](child))
    return len(found)


__all__ = ["CPU_PACKED", "FUSED", "QUANTIZED_LINEARS", "Int4Embedding", "Int4Linear", "Int8Embedding",
           "Int8Linear", "Policy", "QuantizedEmbedding", "QuantizedLinear", "activation_like", "drop_copies", "graph_view", "swap_linears"]
