"""LoRA adapters on disk in Hugging Face PEFT's format, both ways.

A directory holds
  adapter_config.json        peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, target_modules,
                             base_model_name_or_path, lora_dropout, use_rslora, ...
  adapter_model.safetensors  base_model.model.<HF module path>.lora_A.weight (r, in)
                             base_model.model.<HF module path>.lora_B.weight (out, r)
  lmstack_adapter.json       what PEFT has no field for: whether the base was NF4 (QLoRA), and
                             how its scales were kept, so a merge dequantizes the same way first
HF module paths are lmstack's names under `model.` (Llama, Mistral, Qwen2 layouts). GPT-2 names
its linears c_attn / c_proj / c_fc / mlp.c_proj (Conv1D, whose weight is stored transposed; PEFT's
A and B are not, and its config says fan_in_fan_out) and fuses q|k|v into c_attn: an adapter on
c_attn gives each of q, k, v its A and its third of B, exactly; saving q/k/v adapters as one on
c_attn concatenates their A's and puts their B's on a block diagonal (see `peft_tensors`).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from lmstack.finetune.lora import (
    apply_lora,
    linear_names,
    load_lora_state_dict,
    lora_modules,
    lora_state_dict,
    remove_lora,
)
from lmstack.finetune.qlora import dequantize_nf4, quantize_nf4
from lmstack.model.hf import _GPT2_LAYER, _QKV, hf_model_type

CONFIG_FILE, WEIGHTS_FILE, LMSTACK_FILE = ("adapter_config.json", "adapter_model.safetensors",
                                           "lmstack_adapter.json")
PREFIX = "base_model.model."
_KEY = re.compile(r"(.+)\.lora_([AB])\.weight")
_GPT2_BLOCK = re.compile(r"transformer\.h\.(\d+)\.(.+)")
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")

# lmstack linear inside layers.N -> GPT-2's module inside transformer.h.N (hf.py's weight table;
# q, k, v all map to c_attn, fused in that order)
GPT2_MODULES = {ours.removesuffix(".weight"): hf.removesuffix(".weight")
                for ours, (hf, conv) in _GPT2_LAYER.items() if conv} | {m: "attn.c_attn" for m in _QKV}


def hf_module_path(model: nn.Module, name: str) -> str:
    """lmstack module name -> the HF model's module name (`layers.0.self_attn.q_proj` ->
    `model.layers.0.self_attn.q_proj`, or for GPT-2 `transformer.h.0.attn.c_attn`)."""
    if name == "lm_head":
        return name
    if hf_model_type(model.config) != "gpt2":
        return f"model.{name}"
    match = _LAYER.fullmatch(name)
    if match is None or match[2] not in GPT2_MODULES:
        raise ValueError(f"{name} has no GPT-2 counterpart for a PEFT adapter; adapt the block "
                         f"linears {sorted(GPT2_MODULES)} or lm_head")
    return f"transformer.h.{match[1]}.{GPT2_MODULES[match[2]]}"


def lmstack_names(hf_path: str) -> list[str]:
    """HF module name -> the lmstack modules it holds: one, or GPT-2's c_attn -> q, k, v_proj."""
    match = _GPT2_BLOCK.fullmatch(hf_path)
    if match is None:
        return [hf_path if hf_path == "lm_head" else hf_path.removeprefix("model.")]
    parts = [ours for ours, hf in GPT2_MODULES.items() if hf == match[2]]
    if not parts:
        raise ValueError(f"{hf_path} is not a GPT-2 linear LoRA can adapt; those in a block are "
                         f"{sorted(set(GPT2_MODULES.values()))}")
    return [f"layers.{match[1]}.{p}" for p in parts]


def save_adapter(model: nn.Module, path: str | Path, base_name_or_path: str = "",
                 quantized_base: str | None = None,
                 state: dict[str, torch.Tensor] | None = None, double_quant: bool = True) -> Path:
    """Write the model's adapters as a PEFT adapter directory; return it.

    state: the adapter tensors by lmstack name, as lora_state_dict names them, when they are
    not the modules' own (gathered to full tensors on rank 0 of a sharded run, say).
    double_quant: how an NF4 base (quantized_base="nf4") kept its scales; recorded only when
    False, as adapters written before the option were all double-quantized."""
    from safetensors.torch import save_file
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA adapters to save; apply_lora first")
    first = next(iter(modules.values()))
    fused, rank = peft_tensors(model, state if state is not None else lora_state_dict(model))
    tensors = {f"{PREFIX}{hf}.lora_{ab}.weight": t.detach().float().cpu().contiguous()
               for hf, pair in fused.items() for ab, t in zip("AB", pair, strict=True)}
    # the same alpha / r (alpha / sqrt(r) with rslora) at the rank the fused modules need
    alpha = first.alpha * (math.sqrt(rank / first.r) if first.rslora else rank / first.r)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
              "lora_alpha": alpha, "lora_dropout": getattr(first.dropout, "p", 0.0),
              "use_rslora": first.rslora, "target_modules": _target_modules(model, list(fused)),
              "bias": "none", "fan_in_fan_out": hf_model_type(model.config) == "gpt2",
              "base_model_name_or_path": base_name_or_path, "inference_mode": True,
              "modules_to_save": None}
    ours = {"quantized_base": quantized_base}
    if quantized_base is not None and not double_quant:
        ours["double_quant"] = False
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / WEIGHTS_FILE, metadata={"format": "pt"})
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    (path / LMSTACK_FILE).write_text(json.dumps(ours) + "\n")
    return path


def peft_tensors(model: nn.Module, state: dict[str, torch.Tensor]
                 ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
    """({HF module path: (A, B)}, the rank they share) for the model's adapters of rank r.

    An HF module holding several lmstack linears (GPT-2's c_attn: q, k, v) of which k are
    adapted gets A = cat(A_q, A_k, A_v) (k r, in) and the block-diagonal B (3 out, k r), zero
    rows for an unadapted part, so each part's rows of B A are its own B A. PEFT's config has one
    r, so every module is then padded with zero rows of A and columns of B to the largest k r
    (save_adapter scales lora_alpha to keep the update's scaling)."""
    modules, fused = lora_modules(model), {}
    for hf in dict.fromkeys(hf_module_path(model, n) for n in modules):
        parts = lmstack_names(hf)
        adapted = [p for p in parts if p in modules]
        outs = [model.get_submodule(p).out_features for p in parts]
        r = modules[adapted[0]].r
        a = torch.cat([state[f"{p}.lora_A"].detach() for p in adapted])  # (k r, in)
        b = torch.zeros(sum(outs), len(adapted) * r, dtype=a.dtype, device=a.device)
        rows, cols = 0, 0
        for part, out in zip(parts, outs, strict=True):
            if part in modules:
                b[rows:rows + out, cols:cols + r] = state[f"{part}.lora_B"].detach()
                cols += r
            rows += out
        fused[hf] = a, b
    rank = max(a.shape[0] for a, _ in fused.values())
    return {hf: (_pad(a, rank, 0), _pad(b, rank, 1)) for hf, (a, b) in fused.items()}, rank


def _pad(t: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """t with zeros appended along dim up to size."""
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _target_modules(model: nn.Module, adapted: list[str]) -> list[str]:
    """Leaf names (q_proj, c_attn) where every HF module of that leaf name is adapted, else the
    full HF paths: PEFT matches target_modules as module-name suffixes."""
    others = {hf_module_path(model, n) for n in linear_names(model)} - set(adapted)
    leaves = {_leaf(p) for p in adapted}
    if not leaves & {_leaf(p) for p in others}:
        return sorted(leaves)
    return sorted(adapted)


def _leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def read_adapter(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config, {lmstack name.lora_A / .lora_B: tensor}) of a PEFT adapter directory.
    An adapter on GPT-2's c_attn gives q, k and v_proj its A and each its third of B."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a PEFT adapter directory (no {CONFIG_FILE})")
    config = json.loads((path / CONFIG_FILE).read_text())
    _check_config(config, path)
    tensors = {}
    for key, value in _read_weights(path).items():
        match = _KEY.fullmatch(key.removeprefix(PREFIX))
        if not key.startswith(PREFIX) or match is None:
            raise ValueError(f"{path / WEIGHTS_FILE}: tensor {key!r} is not a LoRA weight "
                             f"({PREFIX}<module>.lora_A.weight / .lora_B.weight)")
        names = lmstack_names(match[1])
        pieces = [value] * len(names) if match[2] == "A" else value.chunk(len(names))
        for name, piece in zip(names, pieces, strict=True):
            tensors[f"{name}.lora_{match[2]}"] = piece
    return config, tensors


def _check_config(config: dict, path: Path) -> None:
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not supported; "
                         "only LORA adapters load")
    unsupported = {"use_dora": False, "bias": "none",
                   "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None}
    for key, plain in unsupported.items():
        if config.get(key, plain) not in (plain, None, [], {}):
            raise ValueError(f"{path}: {key}={config[key]!r} is not supported (only plain LoRA: "
                             f"{key}={plain!r})")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / WEIGHTS_FILE).is_file():
        from safetensors.torch import load_file
        return load_file(path / WEIGHTS_FILE)
    if (path / "adapter_model.bin").is_file():
        return torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE} (or adapter_model.bin)")


def _lmstack_metadata(path: str | Path) -> dict:
    file = Path(path) / LMSTACK_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


def quantized_base(path: str | Path) -> str | None:
    """"nf4" when the adapter was trained over an NF4 base (lmstack's QLoRA), else None."""
    return _lmstack_metadata(path).get("quantized_base")


def nf4_double_quant(path: str | Path) -> bool:
    """Whether the adapter's NF4 base double-quantized its scales (absent: True, the default)."""
    return bool(_lmstack_metadata(path).get("double_quant", True))


def load_adapter(model: nn.Module, path: str | Path) -> list[str]:
    """Apply the PEFT adapter in `path` to the model (which is frozen, as by apply_lora) and load
    its weights; return the adapted module names. Its shapes must fit this base."""
    config, tensors = read_adapter(path)
    names = sorted({key.rsplit(".", 1)[0] for key in tensors})
    modules = dict(model.named_modules())
    absent = [n for n in names if n not in modules]
    if absent:
        raise ValueError(f"{path}: the adapter names modules {absent[:4]} that the model lacks: "
                         "it was trained for a different base model")
    apply_lora(model, names, r=int(config["r"]), alpha=float(config["lora_alpha"]),
               dropout=float(config.get("lora_dropout") or 0.0),
               rslora=bool(config.get("use_rslora", False)))
    load_lora_state_dict(model, tensors, where=str(path))
    return names


def use_adapter(model: nn.Module, path: str | Path, merge: bool = True) -> nn.Module:
    """The model with the adapter in `path` as it was trained: over an NF4 base if it was a
    QLoRA adapter (the base is quantized first); merge=True folds it in and leaves a plain
    float model (NF4 weights dequantized), ready to sample, serve or save_hf."""
    load_adapter(model, path)
    if quantized_base(path) == "nf4":
        quantize_nf4(model, double_quant=nf4_double_quant(path))
    if merge:
        remove_lora(model)
        dequantize_nf4(model)
    return model


__all__ = ["hf_module_path", "lmstack_names", "load_adapter", "nf4_double_quant", "peft_tensors",
           "quantized_base", "read_adapter", "save_adapter", "use_adapter"]
