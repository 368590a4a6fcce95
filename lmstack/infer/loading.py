"""Load a model (and its tokenizer) for inference from a directory on disk.

Three layouts are understood, told apart by config.json:
- a Hugging Face model directory (config.json has `model_type`): `lmstack.model.hf.load_hf`;
- a quantized directory (config.json has a `quantization` section), as written by
  `lmstack quantize`: `lmstack.compress.load_quantized`;
- an lmstack checkpoint (config.json is a ModelConfig, weights in model.safetensors), as written
  by training. Inference does not import the training package, so it reads the two files here.
The tokenizer is the directory's tokenizer.json, if there is one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmstack.compress.checkpoint import QUANTIZATION, load_quantized
from lmstack.model import Transformer, weights
from lmstack.model.hf import DTYPES
from lmstack.model.tokenizer import Tokenizer


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r}: choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def load_model(path: str | Path, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> Transformer:
    """An HF model directory or an lmstack checkpoint directory -> Transformer in eval mode."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {str(path)!r}; pass an HF model directory or an "
                                "lmstack checkpoint directory (config.json + model.safetensors)")
    config = json.loads(config_file.read_text())
    if "model_type" in config:
        from lmstack.model.hf import load_hf  # transformers-style directory

        return load_hf(path, device=device, dtype=dtype).eval()
    if QUANTIZATION in config:  # written by `lmstack quantize`
        return load_quantized(path, device, dtype)
    return weights.load_model(path, device, dtype)


def load_tokenizer(path: str | Path) -> Tokenizer | None:
    """The tokenizer saved in a model directory (or a tokenizer dir / tokenizer.json), else None."""
    path = Path(path)
    if (path / "tokenizer.json").is_file() or (path.is_file() and path.suffix == ".json"):
        return Tokenizer.load(path)
    return None
