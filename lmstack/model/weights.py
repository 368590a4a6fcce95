"""An lmstack model directory: `config.json` (a ModelConfig) + `model.safetensors` (its state_dict).

Training checkpoints hold these two files next to their optimizer and trainer state; inference
and sampling load them with `load_model`. Hugging Face directories are `hf.py`'s business.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import nn

from lmstack.model.config import ModelConfig
from lmstack.model.transformer import Transformer

MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.json"


def read_weights(file: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors file -> tensors; a damaged file raises ValueError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found")
    try:
        return load_file(file, device=device)
    except SafetensorError as e:
        raise ValueError(f"{file} is corrupted (truncated or overwritten?): {e}") from e


def load_weights(model: nn.Module, file: str | Path) -> None:
    """Load a state_dict in place; every tensor must match by name (shapes are checked by torch)."""
    missing, unexpected = model.load_state_dict(read_weights(file), strict=False)
    if missing or unexpected:
        raise ValueError(f"{file} does not match the model: missing {missing[:8]}, unexpected "
                         f"{unexpected[:8]}; was it saved from a different model config?")


def load_model(path: str | Path, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> Transformer:
    """config.json + model.safetensors in `path` -> Transformer in eval mode."""
    path = Path(path)
    model = Transformer.build(ModelConfig.load(path / CONFIG_FILE), device=device)
    load_weights(model, path / MODEL_FILE)
    return model.to(dtype or torch.float32).eval()


# ----------------------------------------------------------------------------- atomic writes

def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename the finished directory tmp to final atomically; an existing final (the same
    checkpoint saved again) is moved aside first and removed after."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    fsync(final.parent)  # make the rename itself durable
    if old is not None:
        shutil.rmtree(old)
