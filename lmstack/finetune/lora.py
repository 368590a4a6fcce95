"""LoRA (Hu et al., 2021) by module swap: `apply_lora` replaces chosen linears with `LoRALinear`,
which adds a trainable low-rank update to a frozen base:

    y = base(x) + scaling * B(A(dropout(x)))     A: (r, in), B: (out, r), B starts at zero
    scaling = alpha / r, or alpha / sqrt(r) with rslora (Kalajdzievski, 2023)

The base is any linear: nn.Linear, a `kernels` linear (packed, int8 / int4) or an NF4 linear
(QLoRA, lmstack.finetune.qlora); swap_linears still reaches a plain base inside the wrapper.
The base's tensors keep their names in the state_dict (`q_proj.weight`, not
`q_proj.base.weight`), so checkpoints, HF conversion and kernels see the model they know; the
adapter adds `q_proj.lora_A` and `q_proj.lora_B`.

`merge_lora` folds B A into the base weights (an NF4 base is dequantized first, and the merged
weight is float), `unmerge_lora` takes it out again, and `remove_lora` puts the bases back in the
model (merged or not), leaving a plain Transformer that `save_hf` writes.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.finetune.qlora import NF4Linear
from lmstack.kernels import QuantizedLinear

ALL_LINEAR = "all-linear"
"""Target every linear of the blocks (not the output head), as PEFT's `all-linear` does."""

DEFAULT_TARGETS = [ALL_LINEAR]


@dataclass
class LoRAConfig:
    """Low-rank adapters on the chosen linears; everything else is frozen."""

    r: int = 16
    """Rank of each adapter (A is r x in, B is out x r)."""
    alpha: float = 32.0
    """The update is scaled by alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = 0.05
    """Dropout on the adapter's input while training."""
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Module-name suffixes to adapt (q_proj v_proj, or layers.0.mlp.up_proj), or all-linear."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    double_quant: bool = True
    """QLoRA: quantize the NF4 block scales again to int8 (torchao); false keeps them exact in
    bf16, 1/64 more bytes a weight."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"--lora.r={self.r} is invalid: the rank must be >= 1")
        if self.alpha <= 0:
            raise ValueError(f"--lora.alpha={self.alpha} is invalid: it must be positive")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--lora.dropout={self.dropout} is invalid: it must be in [0, 1)")
        if not self.targets:
            raise ValueError("--lora.targets is empty: name module suffixes or all-linear")


def is_linear(m: nn.Module) -> bool:
    """A module LoRA can wrap: it maps in_features to out_features like nn.Linear."""
    return isinstance(m, nn.Linear | QuantizedLinear | NF4Linear)


class LoRALinear(nn.Module):
    """A frozen base linear plus a trainable low-rank update (see the module docstring)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False):
        super().__init__()
        LoRAConfig(r=r, alpha=alpha, dropout=dropout)  # the same checks as the flags get
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.merged = False
        self.base = base
        device = next(itertools.chain(base.parameters(), base.buffers())).device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, as PEFT's
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_state_dict_post_hook(_base_names_out)
        self.register_load_state_dict_pre_hook(_base_names_in)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        h = self.dropout(x).to(self.lora_A.dtype)
        update = F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling
        return y + update.to(y.dtype)

    def delta(self) -> torch.Tensor:
        """The update as a weight: scaling * B @ A, (out, in) in fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        self.base = _float_base(self.base)
        self.base.weight.add_(self.delta().to(self.base.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight.sub_(self.delta().to(self.base.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, rslora={self.rslora}, merged={self.merged}"


def _float_base(base: nn.Module) -> nn.Module:
    """A base whose weight can take the update: itself, or an NF4 base as an nn.Linear over
    its dequantized weight (the weights the adapter was trained against)."""
    if isinstance(base, NF4Linear):
        return base.to_linear()
    if isinstance(base, nn.Linear):
        return base
    raise ValueError(f"cannot merge LoRA into a {type(base).__name__} base; merge before "
                     "quantizing, or dequantize the model first")


def _base_names_out(module: LoRALinear, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict: `<prefix>base.<name>` -> `<prefix><name>` (the base keeps its names)."""
    inner = prefix + "base."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _base_names_in(module: LoRALinear, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict: the inverse of _base_names_out."""
    own = set(module._modules) | set(module._parameters)
    for key in [k for k in state_dict if k.startswith(prefix)]:
        if key[len(prefix):].split(".", 1)[0] not in own:
            state_dict[prefix + "base." + key[len(prefix):]] = state_dict.pop(key)


# ----------------------------------------------------------------------------- apply and remove

def _matches(name: str, targets: list[str]) -> bool:
    if ALL_LINEAR in targets:
        return name.rsplit(".", 1)[-1] != "lm_head"
    return any(name == t or name.endswith("." + t) for t in targets)


def linear_names(model: nn.Module) -> list[str]:
    """Names of the linears LoRA could wrap (outside existing adapters)."""
    inside = {id(m.base) for m in model.modules() if isinstance(m, LoRALinear)}
    return [n for n, m in model.named_modules() if is_linear(m) and id(m) not in inside]


def apply_lora(model: nn.Module, targets: list[str] | str, r: int, alpha: float,
               dropout: float = 0.0, rslora: bool = False) -> list[str]:
    """Freeze the model and wrap each matching linear in a LoRALinear; return their names.

    targets: exact module-name suffixes ("q_proj", "layers.0.mlp.up_proj") or "all-linear"."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    LoRAConfig(r=r, alpha=alpha, dropout=dropout, targets=targets)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters; remove_lora first")
    names = [n for n in linear_names(model) if _matches(n, targets)]
    if not names:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linear_names(model)})
        raise ValueError(f"LoRA targets {targets} match no linear of the model; its linears "
                         f"end in {leaves} (give such suffixes, or all-linear)")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        owner, _, leaf = _owner(model, name)
        setattr(owner, leaf, LoRALinear(getattr(owner, leaf), r, alpha, dropout, rslora))
    return names


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str, str]:
    parent, _, leaf = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), parent, leaf


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (in place); forward then skips the adapters."""
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Take merged adapters out of the base weights again."""
    for m in lora_modules(model).values():
        m.unmerge()


def remove_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put each adapter's base back in its place, merged first unless merge=False (which drops
    the adapters); the result is the plain model."""
    for name, m in lora_modules(model).items():
        if merge:
            m.merge()
        owner, _, leaf = _owner(model, name)
        setattr(owner, leaf, m.base)
    return model


# ----------------------------------------------------------------------------- adapter weights

def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<module>.lora_A": (r, in), "<module>.lora_B": (out, r)} of every adapter."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A"], out[f"{name}.lora_B"] = m.lora_A, m.lora_B
    return out


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor],
                         where: str = "the adapter") -> None:
    """Copy adapter weights in; names and shapes must match the model's adapters exactly."""
    params = lora_state_dict(model)
    missing, unexpected = sorted(params.keys() - tensors.keys()), sorted(tensors.keys() - params.keys())
    if missing or unexpected:
        raise ValueError(f"{where} does not fit the model's adapters: missing {missing[:6]}, "
                         f"unexpected {unexpected[:6]}; was it trained on another base or targets?")
    for key, value in tensors.items():
        if value.shape != params[key].shape:
            raise ValueError(f"{where}: {key} has shape {tuple(value.shape)}, but the base's "
                             f"module needs {tuple(params[key].shape)}: the adapter was trained "
                             "for a different base model")
    for key, value in tensors.items():
        params[key].copy_(value)
