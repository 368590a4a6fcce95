"""oneDNN-packed CPU linears: the same products as F.linear over a copy of the weights laid out
in oneDNN's blocked format, for inference on CPU.

Three drop-in modules, swapped in for the model's `nn.Linear`, `Fanout` and `TiedHead`
(`swap_linears(model, CPU_PACKED)`); each keeps the Parameters it computes with, so names,
`state_dict` and training are unchanged:
- `PackedLinear`: one linear;
- `PackedFanout`: the linears of one input (q/k/v, gate/up) as one product over their weights
  stacked along the outputs, while every one of them is still a plain linear;
- `PackedTiedHead`: the tied output projection.

Packed copies are made at the first call that can use one, kept on the module and in
`COPIES` by the first weight they were made from (the graph op finds them there), and checked
at every call against their sources' identity and version counters: an optimizer step, `load_state_dict`, a LoRA merge or a dtype cast makes a new
copy at the next call. Writes through `.data` skip the version counter: call `drop_copies(model)`
after them. A copy serves only eager CPU inference (no autograd, no autocast, not being traced);
everything else runs F.linear on the Parameters.

Compiled decode steps of many rows run these products as `lmstack::packed_linear`, an opaque op
torch.compile leaves as it is (oneDNN's packed tensors cannot be traced): `graph_view(model)`.
"""

from __future__ import annotations

import copy
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakTensorKeyDictionary

from lmstack.model.cpu import NATIVE_CPU_BF16
from lmstack.model.transformer import Fanout, TiedHead

MKLDNN = torch.backends.mkldnn.is_available()


class PackedWeight:
    """oneDNN's copy of one weight, or of several stacked along their outputs; remembers which
    tensors it was made from and their data pointers and version counters."""

    def __init__(self, weights: list[torch.Tensor]):
        stacked = weights[0] if len(weights) == 1 else torch.cat(weights)
        self.tensor = torch.ops.mkldnn._reorder_linear_weight(stacked.detach(), None)
        self._sources = [weakref.ref(w) for w in weights]
        self._stamps = [(w.data_ptr(), w._version) for w in weights]

    @staticmethod
    def supports(weight: torch.Tensor) -> bool:
        """CPU fp32, or bf16 where the CPU has native bf16 instructions (oneDNN's emulated bf16
        is slow); not inference-mode tensors, which keep no version counter to check."""
        return (MKLDNN and weight.device.type == "cpu" and not weight.is_inference()
                and (weight.dtype == torch.float32 or weight.dtype == torch.bfloat16 and NATIVE_CPU_BF16))

    def current(self, weights: list[torch.Tensor]) -> bool:
        """Made from exactly these tensors, unchanged since."""
        if len(weights) != len(self._sources):
            return False
        for source, (ptr, version), w in zip(self._sources, self._stamps, weights, strict=True):
            if source() is not w or w._version != version or w.data_ptr() != ptr:
                return False
        return True

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.tensor, bias, "none", [], "")


COPIES: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
"""Packed copies by the first weight they were made from; a copy goes with its weight."""


def packed_copy(weights: list[torch.Tensor]) -> PackedWeight | None:
    """The current packed copy of these weights (stacked), made now if there is none; None
    where oneDNN cannot serve them."""
    if not all(PackedWeight.supports(w) and w.dtype == weights[0].dtype for w in weights):
        return None
    copy_ = COPIES.get(weights[0])
    if copy_ is None or not copy_.current(weights):
        COPIES[weights[0]] = copy_ = PackedWeight(weights)
    return copy_


def drop_copies(model: nn.Module) -> None:
    """Forget every packed copy of the model's weights (they are made again at the next calls),
    after writes through `.data`, which version counters do not see."""
    for p in model.parameters():
        COPIES.pop(p, None)
    for m in model.modules():
        if isinstance(m, _PackedKernel):
            m._packed = None


def _stacked_bias(biases: list[torch.Tensor | None]) -> torch.Tensor | None:
    """The biases of stacked weights side by side (all given, or all None)."""
    return None if biases[0] is None else biases[0] if len(biases) == 1 else torch.cat(biases)


def packed_product(x: torch.Tensor, weights: list[torch.Tensor],
                   biases: list[torch.Tensor | None]) -> torch.Tensor:
    """x through the weights stacked (their outputs side by side): on their packed copy where
    oneDNN serves them and x has their dtype, else F.linear weight by weight (concatenating
    the weights would copy them at every call)."""
    packed = packed_copy(weights) if x.dtype == weights[0].dtype else None
    if packed is not None:
        return packed(x, _stacked_bias(biases))
    outs = [F.linear(x, w, b) for w, b in zip(weights, biases, strict=True)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def eager_cpu_inference(x: torch.Tensor) -> bool:
    """Whether a packed copy may serve x: CPU, no autograd, no autocast (they must see
    F.linear), not being traced (the compiler lays out and runs the products itself)."""
    return not (torch.compiler.is_compiling() or torch.is_grad_enabled() or x.device.type != "cpu"
                or torch.is_autocast_enabled("cpu"))


# `lmstack::packed_linear`: packed_product as an opaque op, which torch.compile calls as it is.
# Defined through torch.library.Library: the custom_op decorator's wrapper costs more per call.
_LIB = torch.library.Library("lmstack", "DEF")
_LIB.define("packed_linear(Tensor x, Tensor[] weights, Tensor?[] biases) -> Tensor")
_LIB.impl("packed_linear", packed_product, "CompositeExplicitAutograd")
packed_linear_op = torch.ops.lmstack.packed_linear.default


@torch.library.register_fake("lmstack::packed_linear")
def _(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], sum(w.shape[0] for w in weights))


class _PackedKernel:
    """What the packed modules share: the current packed copy of their weights, kept on the
    module for eager calls (also in COPIES, for the graph op), and the graph switch."""

    in_graph = False
    """Traced code runs the product as the opaque op (set only on graph_view's copies)."""
    _packed: PackedWeight | None = None

    def _copy_for(self, x: torch.Tensor, weights: list[torch.Tensor]) -> PackedWeight | None:
        """The packed copy that serves x in eager CPU inference, else None (F.linear then)."""
        if x.dtype != weights[0].dtype or not eager_cpu_inference(x):
            return None
        packed = self._packed
        if packed is None or not packed.current(weights):
            packed = self._packed = packed_copy(weights)
        return packed

    def __getstate__(self) -> dict:  # copies and pickles hold no oneDNN tensor: they pack anew
        state = dict(self.__dict__)
        state.pop("_packed", None)
        return state


class PackedLinear(_PackedKernel, nn.Linear):
    """nn.Linear (the same weight and bias Parameters) that runs on a packed copy in eager CPU
    inference."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = linear.in_features, linear.out_features
        m.weight, m.bias = linear.weight, linear.bias
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_graph:
            return packed_linear_op(x, [self.weight], [self.bias])
        packed = self._copy_for(x, [self.weight])
        return F.linear(x, self.weight, self.bias) if packed is None else packed(x, self.bias)


PLAIN_LINEARS = (nn.Linear, PackedLinear)
"""Module types whose forward is exactly F.linear(x, weight, bias): a fanout may stack them."""


def _stackable(owner: nn.Module, names: tuple[str, ...]) -> list[nn.Linear] | None:
    """The owner's linears of these names, if their products can be stacked into one: all
    plain linears, with biases all given or all None."""
    modules = owner._modules  # where nn.Module keeps children: getattr would search three dicts
    linears = [modules[name] for name in names]
    plain = all(type(m) in PLAIN_LINEARS for m in linears)
    return linears if plain and len({m.bias is None for m in linears}) == 1 else None


class PackedFanout(_PackedKernel, Fanout):
    """Fanout that runs its linears as one product over their weights stacked, while each is a
    plain linear with a bias like the others' (a LoRA wrapper swapped in for one of them, say,
    and they run one by one again)."""

    def forward(self, x: torch.Tensor, owner: nn.Module) -> list[torch.Tensor]:
        linears = _stackable(owner, self.names)
        if linears is None:
            return super().forward(x, owner)
        weights, biases = [m.weight for m in linears], [m.bias for m in linears]
        if self.in_graph:
            y = packed_linear_op(x, weights, biases)
        else:
            packed = self._copy_for(x, weights)
            if packed is None:
                return super().forward(x, owner)
            y = packed(x, _stacked_bias(biases))
        return list(y.split([m.out_features for m in linears], dim=-1))


class PackedTiedHead(_PackedKernel, TiedHead):
    """The tied output projection on a packed copy of the embedding weight."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.in_graph:
            return packed_linear_op(x, [weight], [None])
        packed = self._copy_for(x, [weight])
        return F.linear(x, weight) if packed is None else packed(x, None)


class FusedFanout(Fanout):
    """Fanout that runs its plain linears as one F.linear over their weights concatenated, with
    autograd: one larger product forward and backward instead of several (a fused `c_attn`),
    while the Parameters stay q_proj/k_proj/v_proj."""

    def forward(self, x: torch.Tensor, owner: nn.Module) -> list[torch.Tensor]:
        linears = _stackable(owner, self.names)
        if linears is None:
            return super().forward(x, owner)
        y = F.linear(x, torch.cat([m.weight for m in linears]),
                     _stacked_bias([m.bias for m in linears]))
        return list(y.split([m.out_features for m in linears], dim=-1))


def graph_view(model: nn.Module) -> nn.Module:
    """A copy of the model's modules, sharing every Parameter and buffer, whose packed kernels
    run as the opaque op when traced (for compiled steps of many rows)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    view = copy.deepcopy(model, memo=tensors)
    for m in view.modules():
        if isinstance(m, _PackedKernel):
            m.in_graph = True
    return view
