"""LoRA adapters on disk in Hugging Face PEFT's format, both ways.

A directory holds
  adapter_config.json        peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, target_modules,
                             base_model_name_or_path, lora_dropout, use_rslora, ...
  adapter_model.safetensors  base_model.model.<HF module path>.lora_A.weight (r, in)
                             base_model.model.<HF module path>.lora_B.weight (out, r)
  lmstack_adapter.json       what PEFT has no field for: whether the base was NF4 (QLoRA), so a
                             merge dequantizes the same way first
HF module paths are lmstack's names under `model.` (Llama, Mistral, Qwen2 layouts; GPT-2 fuses
q/k/v into one Conv1D, which a per-projection adapter cannot express).
"""

from __future__ import annotations

import json
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
from lmstack.model.hf import hf_model_type

CONFIG_FILE, WEIGHTS_FILE, LMSTACK_FILE = ("adapter_config.json", "adapter_model.safetensors",
                                           "lmstack_adapter.json")
PREFIX = "base_model.model."
_KEY = re.compile(r"(.+)\.lora_([AB])\.weight")


def hf_module_path(model: nn.Module, name: str) -> str:
    """lmstack module name -> the HF model's module name (`layers.0.self_attn.q_proj` ->
    `model.layers.0.self_attn.q_proj`)."""
    if hf_model_type(model.config) == "gpt2":
        raise ValueError("PEFT adapters of GPT-2-layout models are not supported: HF GPT-2 fuses "
                         "q/k/v into one Conv1D (c_attn); use a Llama-layout model")
    return name if name == "lm_head" else f"model.{name}"


def _lmstack_name(hf_path: str) -> str:
    return hf_path if hf_path == "lm_head" else hf_path.removeprefix("model.")


def save_adapter(model: nn.Module, path: str | Path, base_name_or_path: str = "",
                 quantized_base: str | None = None,
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the model's adapters as a PEFT adapter directory; return it.

    state: the adapter tensors by lmstack name, as lora_state_dict names them, when they are
    not the modules' own (gathered to full tensors on rank 0 of a sharded run, say)."""
    from safetensors.torch import save_file
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA adapters to save; apply_lora first")
    first = next(iter(modules.values()))
    state = state if state is not None else lora_state_dict(model)
    tensors = {}
    for name in modules:
        hf = PREFIX + hf_module_path(model, name)
        for ab in "AB":
            tensors[f"{hf}.lora_{ab}.weight"] = state[f"{name}.lora_{ab}"].detach().float().cpu().contiguous()
    dropout = getattr(first.dropout, "p", 0.0)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": first.r,
              "lora_alpha": first.alpha, "lora_dropout": dropout, "use_rslora": first.rslora,
              "target_modules": _target_modules(model, list(modules)), "bias": "none",
              "fan_in_fan_out": False, "base_model_name_or_path": base_name_or_path,
              "inference_mode": True, "modules_to_save": None}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / WEIGHTS_FILE, metadata={"format": "pt"})
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    (path / LMSTACK_FILE).write_text(json.dumps({"quantized_base": quantized_base}) + "\n")
    return path


def _target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """Leaf names (q_proj) where every linear of that leaf name is adapted, else the full HF
    paths: PEFT matches target_modules as module-name suffixes."""
    adapted = set(names)
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    others = {n.rsplit(".", 1)[-1] for n in linear_names(model)}
    if not leaves & others:
        return sorted(leaves)
    return sorted(hf_module_path(model, n) for n in adapted)


def read_adapter(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config, {lmstack name.lora_A / .lora_B: tensor}) of a PEFT adapter directory."""
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
        tensors[f"{_lmstack_name(match[1])}.lora_{match[2]}"] = value
    return config, tensors


def _check_config(config: dict, path: Path) -> None:
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not supported; "
                         "only LORA adapters load")
    unsupported = {"use_dora": False, "fan_in_fan_out": False, "bias": "none",
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


def quantized_base(path: str | Path) -> str | None:
    """"nf4" when the adapter was trained over an NF4 base (lmstack's QLoRA), else None."""
    file = Path(path) / LMSTACK_FILE
    return json.loads(file.read_text()).get("quantized_base") if file.is_file() else None


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
        quantize_nf4(model)
    if merge:
        remove_lora(model)
        dequantize_nf4(model)
    return model


__all__ = ["hf_module_path", "load_adapter", "quantized_base", "read_adapter", "save_adapter",
           "use_adapter"]
