"""Quantized model directories: save one, and load it without building the float weights.

A quantized directory holds
  model.safetensors    the quantized model's state_dict: for each quantized linear its integer
                       codes (`qweight`), `scales` and `zeros` (int4), and `bias`; an int8 token
                       table's `qweight`, `scales` (and int4's `zeros`); the rest (norms, a float or tied table,
                       linears kept in float) as they were
  config.json          the ModelConfig, as lmstack checkpoints store it, plus a `quantization`
                       section: {"method", "bits", "group_size", "kept": [linears left in float],
                       "embedding": "int8", "int4" (in groups of group_size) or "float" (a
                       directory without the key: float)}
  tokenizer files      tokenizer.json and its config, when a tokenizer was given
It is written into a temporary directory that is then renamed, so a crash never leaves half a
directory under the final name. `lmstack.infer.loading.load_model` recognises the section, so
`LLM(dir)`, `lmstack generate DIR` and `lmstack sample DIR` load it like any model directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

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
from lmstack.model import weights
from lmstack.model.config import ModelConfig
from lmstack.model.transformer import Transformer, rope_tables
from lmstack.model.weights import CONFIG_FILE, MODEL_FILE, read_weights

QUANTIZATION = "quantization"
REQUANTIZE = "re-run `lmstack quantize` to write the directory again"


def describe(model: nn.Module, method: str | None = None) -> dict:
    """The `quantization` section of a quantized model: method, bits, group size, kept linears,
    the token table's format."""
    quantized = [m for m in model.modules() if isinstance(m, QUANTIZED_LINEARS)]
    if not quantized:
        raise ValueError("the model has no quantized linears; quantize it first "
                         "(lmstack.compress.quantize_ or `lmstack quantize`)")
    kinds = {(m.bits, getattr(m, "group_size", None)) for m in quantized}
    if len(kinds) > 1:
        raise ValueError(f"the model mixes quantized layers {sorted(kinds, key=str)} (bits, group "
                         "size); a quantized directory holds one kind")
    (bits, group_size), = kinds
    kept = [name for name, m in model.named_modules() if type(m) in PLAIN_LINEARS]
    table = model.embed_tokens
    embedding = f"int{table.bits}" if isinstance(table, QuantizedEmbedding) else "float"
    if isinstance(table, Int4Embedding) and table.group_size != group_size:
        raise ValueError(f"the token table's int4 groups ({table.group_size}) differ from the "
                         f"linears' ({group_size}); a quantized directory holds one group size")
    return {"method": method or f"int{bits}", "bits": bits, "group_size": group_size, "kept": kept,
            "embedding": embedding}


def save_quantized(model: nn.Module, out: str | Path, tokenizer=None,
                   method: str | None = None) -> Path:
    """Write the quantized model (and its tokenizer) to the directory `out`, atomically."""
    from safetensors.torch import save_file

    out = Path(out)
    section = describe(model, method)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, tmp / MODEL_FILE)
    config = {**model.config.to_dict(), QUANTIZATION: section}
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(tmp)
    for file in tmp.iterdir():
        weights.fsync(file)
    weights.replace_dir(tmp, out)
    return out


# ----------------------------------------------------------------------------- load

def is_quantized_dir(path: str | Path) -> bool:
    config = Path(path) / CONFIG_FILE
    return config.is_file() and QUANTIZATION in json.loads(config.read_text())


def load_quantized(path: str | Path, device: torch.device | str = "cpu",
                   dtype: torch.dtype | None = None) -> Transformer:
    """A quantized directory -> Transformer in eval mode, on `device`, its float tensors in
    `dtype` (None: as saved). The model is built on the meta device with empty quantized
    linears, and the file's tensors are assigned to it: no float weight of a quantized linear
    ever exists. A config that disagrees with the tensors raises ValueError."""
    path = Path(path)
    raw = json.loads((path / CONFIG_FILE).read_text())
    section = raw.pop(QUANTIZATION, None)
    if section is None:
        raise ValueError(f"{path / CONFIG_FILE} has no {QUANTIZATION!r} section: it is not a "
                         "quantized directory (load it with lmstack.infer.loading.load_model)")
    config = ModelConfig.from_dict(raw)
    try:
        model = empty_quantized(config, section)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path / CONFIG_FILE}: its {QUANTIZATION} section {section} does not fit "
                         f"the model ({e}); {REQUANTIZE}") from e
    tensors = read_weights(path / MODEL_FILE, device=str(device))
    _check_tensors(model, tensors, path, section)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    model.load_state_dict(tensors, assign=True)
    if config.pos == "rope":  # not in the state_dict: computed, as Transformer.build does
        model.rope_cos, model.rope_sin = rope_tables(config, device=device)
    return model.eval()


def empty_quantized(config: ModelConfig, section: dict) -> Transformer:
    """The Transformer of `config` on the meta device, with empty quantized linears in place of
    every linear the section does not keep (and an empty int8 or int4 token table, if it says so)."""
    bits, group_size, kept = section["bits"], section["group_size"], set(section["kept"])
    embedding = section.get("embedding", "float")
    if bits not in (4, 8):
        raise ValueError(f"bits={bits}: lmstack stores 8- or 4-bit weights")
    if embedding not in ("int8", "int4", "float") or embedding != "float" and config.tie_embeddings:
        raise ValueError(f"embedding={embedding!r}: a table is int8 or int4 (untied), or float")
    with torch.device("meta"):
        model = Transformer(config)
        linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
        if kept - set(linears):
            raise ValueError(f"kept names {sorted(kept - set(linears))} are not linears of the model")
        empty = {m: _empty_linear(m, bits, group_size) for name, m in linears.items() if name not in kept}
        table = model.embed_tokens
        if embedding == "int8":
            empty[table] = Int8Embedding(table.num_embeddings, table.embedding_dim)
        elif embedding == "int4":
            empty[table] = Int4Embedding(table.num_embeddings, table.embedding_dim, group_size)
    swap_linears(model, {nn.Linear: lambda m: empty.get(m, m), nn.Embedding: lambda m: empty.get(m, m)})
    return model


def _empty_linear(m: nn.Linear, bits: int, group_size: int) -> nn.Module:
    bias = m.bias is not None
    if bits == 8:
        return Int8Linear(m.in_features, m.out_features, bias)
    return Int4Linear(m.in_features, m.out_features, group_size, bias)


def _check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path,
                   section: dict) -> None:
    """Every tensor the config implies is in the file, with its shape (and integer dtype),
    and nothing else is."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = [f"{k}: file {tuple(tensors[k].shape)} {tensors[k].dtype}, config "
             f"{tuple(v.shape)} {v.dtype if not v.is_floating_point() else 'float'}"
             for k, v in expected.items() if k in tensors and not _fits(tensors[k], v)]
    if missing or extra or wrong:
        raise ValueError(
            f"{path}: config.json ({section['bits']}-bit, group size {section['group_size']}, kept "
            f"{section['kept']}) and {MODEL_FILE} disagree: missing {missing[:6]}, unexpected "
            f"{extra[:6]}, mismatched {wrong[:6]}; the directory was damaged or edited: {REQUANTIZE}")


def _fits(found: torch.Tensor, wanted: torch.Tensor) -> bool:
    same_kind = found.is_floating_point() == wanted.is_floating_point()
    dtype_ok = wanted.is_floating_point() or found.dtype == wanted.dtype
    return found.shape == wanted.shape and same_kind and dtype_ok


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model holds (parameters and buffers, kernel layouts included;
    each storage counted once)."""
    storages = {}
    for t in [*model.parameters(), *model.buffers()]:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())
