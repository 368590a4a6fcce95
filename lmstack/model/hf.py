"""Hugging Face interop: load and save HF model directories (config.json + safetensors).

lmstack parameters already carry HF Llama names, so Llama / Mistral / Qwen2 weights differ only by
the `model.` prefix. GPT-2 needs a table: its Conv1D weights are stored (in, out), i.e. transposed,
and q|k|v are fused in `c_attn`. Configs convert in `hf_config`. Only local directories are read.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch

from lmstack.model.config import ModelConfig
from lmstack.model.hf_config import ARCHITECTURES, config_from_hf, config_to_hf, hf_model_type
from lmstack.model.transformer import Transformer, rope_tables

__all__ = ["ARCHITECTURES", "config_from_hf", "config_to_hf", "from_hf_state_dict", "hf_model_type",
           "load_hf", "read_hf_config", "read_hf_weights", "save_hf", "to_hf_state_dict"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")


# ----------------------------------------------------------------------------- weight names

# lmstack name inside a block -> (GPT-2 name inside h.N, stored transposed: a Conv1D weight)
_GPT2_LAYER = {
    "input_layernorm.weight": ("ln_1.weight", False), "input_layernorm.bias": ("ln_1.bias", False),
    "post_attention_layernorm.weight": ("ln_2.weight", False),
    "post_attention_layernorm.bias": ("ln_2.bias", False),
    "self_attn.o_proj.weight": ("attn.c_proj.weight", True),
    "self_attn.o_proj.bias": ("attn.c_proj.bias", False),
    "mlp.up_proj.weight": ("mlp.c_fc.weight", True), "mlp.up_proj.bias": ("mlp.c_fc.bias", False),
    "mlp.down_proj.weight": ("mlp.c_proj.weight", True),
    "mlp.down_proj.bias": ("mlp.c_proj.bias", False),
}
_GPT2_TOP = {"embed_tokens.weight": "transformer.wte.weight", "pos_embed.weight": "transformer.wpe.weight",
             "norm.weight": "transformer.ln_f.weight", "norm.bias": "transformer.ln_f.bias",
             "lm_head.weight": "lm_head.weight"}
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # fused in this order in c_attn


def to_hf_state_dict(sd: dict[str, torch.Tensor], model_type: str,
                     n_layers: int) -> dict[str, torch.Tensor]:
    """lmstack names and layouts -> HF ones (works on meta tensors, to get expected shapes)."""
    if model_type != "gpt2":
        return {k if k.startswith("lm_head.") else f"model.{k}": v for k, v in sd.items()}
    out = {hf: sd[ours] for ours, hf in _GPT2_TOP.items() if ours in sd}
    for i in range(n_layers):
        ours, h = f"layers.{i}.", f"transformer.h.{i}."
        for name, (hf, conv) in _GPT2_LAYER.items():
            out[h + hf] = sd[ours + name].t() if conv else sd[ours + name]
        q, k, v = (sd[f"{ours}{m}.weight"] for m in _QKV)
        out[h + "attn.c_attn.weight"] = torch.cat([q, k, v]).t()  # (C, 3C)
        out[h + "attn.c_attn.bias"] = torch.cat([sd[f"{ours}{m}.bias"] for m in _QKV])
    return out


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor], model_type: str,
                       n_layers: int) -> dict[str, torch.Tensor]:
    """HF names and layouts -> lmstack ones; `hf_sd` holds exactly the expected HF tensors."""
    if model_type != "gpt2":
        return {k.removeprefix("model."): v for k, v in hf_sd.items()}
    out = {ours: hf_sd[hf] for ours, hf in _GPT2_TOP.items() if hf in hf_sd}
    for i in range(n_layers):
        ours, h = f"layers.{i}.", f"transformer.h.{i}."
        for name, (hf, conv) in _GPT2_LAYER.items():
            out[ours + name] = hf_sd[h + hf].t() if conv else hf_sd[h + hf]
        weights = hf_sd[h + "attn.c_attn.weight"].t().chunk(3)  # 3 x (C, C)
        biases = hf_sd[h + "attn.c_attn.bias"].chunk(3)
        for m, w, b in zip(_QKV, weights, biases, strict=True):
            out[f"{ours}{m}.weight"], out[f"{ours}{m}.bias"] = w.clone(), b.clone()
    return out


def _ignorable(model_type: str, cfg: ModelConfig) -> set[str]:
    """Tensors HF files may hold that carry nothing lmstack needs (buffers, a tied head)."""
    names = {"lm_head.weight"} if cfg.tie_embeddings else set()
    for i in range(cfg.n_layers):
        if model_type == "gpt2":
            names |= {f"transformer.h.{i}.attn.bias", f"transformer.h.{i}.attn.masked_bias"}
        else:
            names.add(f"model.layers.{i}.self_attn.rotary_emb.inv_freq")
    return names


def _check_tensors(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                   ignorable: set[str], where: Path) -> None:
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys() - ignorable)
    if missing or unexpected:
        raise ValueError(f"weights in {where} do not match its config.json: "
                         f"missing {_names(missing)}; unexpected {_names(unexpected)}")
    for name, want in expected.items():
        if found[name].shape != want.shape:
            raise ValueError(f"tensor {name!r} in {where} has shape {tuple(found[name].shape)}, "
                             f"but config.json implies {tuple(want.shape)}")


def _names(names: list[str], limit: int = 12) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{names[:limit]}{more}"


# ----------------------------------------------------------------------------- load

def load_hf(path: str | Path, device: torch.device | str = "cpu",
            dtype: torch.dtype | None = None) -> Transformer:
    """A local HF model directory -> Transformer. dtype None: the checkpoint's dtype (else fp32)."""
    path = Path(path)
    hf = read_hf_config(path)
    cfg = config_from_hf(hf)
    sd = _lmstack_weights(path, hf["model_type"], cfg)
    return _materialise(cfg, sd, device, dtype or _checkpoint_dtype(hf))


def _lmstack_weights(path: Path, model_type: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Read, check (names and shapes, in the file's own names) and rename the tensors."""
    weights = read_hf_weights(path)
    if model_type == "gpt2":  # GPT2Model files lack the `transformer.` prefix
        weights = {k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v
                   for k, v in weights.items()}
    with torch.device("meta"):
        expected = to_hf_state_dict(Transformer(cfg).state_dict(), model_type, cfg.n_layers)
    _check_tensors(weights, expected, _ignorable(model_type, cfg), path)
    return from_hf_state_dict({k: weights[k] for k in expected}, model_type, cfg.n_layers)


def _materialise(cfg: ModelConfig, sd: dict[str, torch.Tensor], device: torch.device | str,
                 dtype: torch.dtype) -> Transformer:
    """Build on meta (no memory, no init) and adopt the loaded tensors as the parameters."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict({k: v.to(device=device, dtype=dtype).contiguous() for k, v in sd.items()},
                          assign=True)
    if cfg.pos == "rope":  # non-persistent buffers are not in the file: compute them on `device`
        model.rope_cos, model.rope_sin = rope_tables(cfg, device=device)
    left = [name for name, t in model.named_buffers() if t.is_meta]
    if left:
        raise RuntimeError(f"load_hf left buffers {left} on the meta device; hf.py must fill them")
    return model


def read_hf_config(path: Path) -> dict:
    if not path.is_dir():
        raise FileNotFoundError(f"no model directory at {path}; load_hf reads a local HF directory")
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found; an HF model directory needs config.json")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e


def _checkpoint_dtype(hf: dict) -> torch.dtype:
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if name not in DTYPES:
        raise ValueError(f"config.json dtype={name!r} is not one of {sorted(DTYPES)}; "
                         "pass dtype= to load_hf")
    return DTYPES[name]


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of the first weight layout found, in WEIGHT_FILES order, on the CPU."""
    for name in WEIGHT_FILES:
        file = path / name
        if file.is_file():
            files = _index_shards(file) if name.endswith(".index.json") else [file]
            return {k: v for f in files for k, v in _read_file(f).items()}
    raise FileNotFoundError(f"no weights in {path}: looked for {', '.join(WEIGHT_FILES)}")


def _index_shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index} is not a shard index with a 'weight_map': {e}") from e
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    for shard in shards:
        if not shard.is_file():
            raise FileNotFoundError(f"{index} lists shard {shard.name}, which is missing")
    return shards


def _read_file(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(file)
        except SafetensorError as e:
            raise ValueError(f"{file} is not a readable safetensors file ({e}); it may be "
                             "truncated or corrupt: save or copy it again") from e
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise ValueError(f"{file} is not a readable PyTorch weights file ({e})") from e
    if not isinstance(sd, dict) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
        raise ValueError(f"{file} does not hold a flat name -> tensor state dict")
    return sd


# ----------------------------------------------------------------------------- save

def save_hf(model: Transformer, path: str | Path, dtype: torch.dtype | None = None,
            max_shard_bytes: int | None = None) -> None:
    """Write config.json + safetensors (sharded above max_shard_bytes) that transformers loads.

    A new directory appears whole (one rename). Into an existing one each file is replaced
    whole and weight files of an earlier save that are no longer listed are removed.
    """
    cfg = model.config
    hf = config_to_hf(cfg)
    dtype = dtype or next(model.parameters()).dtype
    hf["dtype"] = hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    tensors = to_hf_state_dict(_plain_state_dict(model), hf["model_type"], cfg.n_layers)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file; save_hf writes a directory there")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        names = _write(tmp, hf, _shards(tensors, max_shard_bytes))
        if not path.exists():
            os.replace(tmp, path)
        else:
            _replace_into(tmp, path, names)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _plain_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    with torch.device("meta"):
        want = Transformer(model.config).state_dict().keys()
    if sd.keys() != want:
        raise ValueError(f"model has tensors a plain Transformer lacks {_names(sorted(sd.keys() - want))} "
                         f"or lacks {_names(sorted(want - sd.keys()))}; merge LoRA adapters or "
                         "dequantize before save_hf")
    return sd


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_bytes} must be positive or None")
    shards, size = [{}], 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if max_bytes is not None and shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def _write(folder: Path, hf: dict, shards: list[dict[str, torch.Tensor]]) -> list[str]:
    """Write weights, then the index, then config.json; return the names in that order."""
    from safetensors.torch import save_file
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, folder / name, metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {k: name for name, s in zip(names, shards, strict=True) for k in s}
        size = sum(t.numel() * t.element_size() for s in shards for t in s.values())
        index = {"metadata": {"total_size": size}, "weight_map": weight_map}
        (folder / WEIGHT_FILES[1]).write_text(json.dumps(index, indent=2) + "\n")
        names.append(WEIGHT_FILES[1])
    (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return names + ["config.json"]


def _replace_into(tmp: Path, path: Path, names: list[str]) -> None:
    old = {WEIGHT_FILES[0], WEIGHT_FILES[1]}
    index = path / WEIGHT_FILES[1]
    if index.is_file():
        old |= set(json.loads(index.read_text()).get("weight_map", {}).values())
    for name in names:
        os.replace(tmp / name, path / name)
    for name in old - set(names):
        (path / name).unlink(missing_ok=True)
