"""Checkpoints: everything needed to continue a run exactly, written so a crash can't damage one.

A checkpoint is a directory ROOT/step_00001000 holding
  model.safetensors      the model's state_dict; only its trainable parameters when some are
                         frozen (LoRA: the base is named in trainer_state.json, not copied)
  optimizer.safetensors  AdamW's per-parameter tensors (exp_avg, exp_avg_sq, step)
  trainer_state.json     step, tokens, time, optimizer param groups, GradScaler state, RNG states
                         (python, numpy, torch CPU and CUDA), the data stream's position, the config
  config.json            the ModelConfig, so the weights can be loaded on their own
Nothing is pickled: tensors go to safetensors, the rest to JSON.

Sharded checkpoints (lmstack.train.dcp, written under torchrun) keep the same names and JSON
files, with per-rank tensor files in place of the two .safetensors; every function here reads both.

Atomicity: files are written and fsynced into a hidden `.tmp-*` directory which is then renamed
to its final name in one step. A process killed mid-save leaves only a temporary directory
(removed by the next save), never a half-written `step_*`; resuming picks the newest valid one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lmstack.model import ModelConfig, Transformer, weights
from lmstack.model.weights import CONFIG_FILE, MODEL_FILE

OPTIMIZER_FILE, STATE_FILE = "optimizer.safetensors", "trainer_state.json"
FILES = (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, CONFIG_FILE)
_NAME = re.compile(r"step_(\d{8})")


class CheckpointError(ValueError):
    """A checkpoint directory exists but cannot be read back."""


# ----------------------------------------------------------------------------- save

def save_checkpoint(root: str | Path, step: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer, trainer_state: dict,
                    keep_last: int | None = None) -> Path:
    """Write ROOT/step_<step> atomically; then keep only the newest `keep_last` checkpoints."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root)
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    tmp.mkdir()
    opt_tensors, opt_meta = flatten_optimizer(optimizer)
    weights_kept = model_state(model)
    state = {**trainer_state, "step": step, "optimizer": opt_meta,
             "weights": "all" if len(weights_kept) == len(model.state_dict()) else "trainable"}
    writers = [
        (MODEL_FILE, lambda p: save_file(_plain_tensors(weights_kept), p)),
        (OPTIMIZER_FILE, lambda p: save_file(opt_tensors, p)),
        (STATE_FILE, lambda p: p.write_text(json.dumps(state, indent=1, default=_to_json))),
        (CONFIG_FILE, lambda p: p.write_text(json.dumps(_model_config(model), indent=2))),
    ]
    for name, write in writers:
        write(tmp / name)
        weights.fsync(tmp / name)
    final = root / f"step_{step:08d}"
    weights.replace_dir(tmp, final)
    if keep_last is not None:
        prune_checkpoints(root, keep_last)
    return final


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of the model: its state_dict, or only its trainable parameters
    when some are frozen (the frozen rest is the base the run started from)."""
    state = model.state_dict(keep_vars=True)
    if all(p.requires_grad for p in model.parameters()):
        return state
    return {k: v for k, v in state.items() if isinstance(v, nn.Parameter) and v.requires_grad}


def _plain_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage and non-contiguous views; give it plain copies on CPU
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _model_config(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    return config.to_dict() if isinstance(config, ModelConfig) else {}


def _remove_stale_tmp(root: Path) -> None:
    """Debris of saves that were killed: unfinished new ones, replaced old ones."""
    for path in [*root.glob(".tmp-step_*"), *root.glob(".old-step_*")]:
        shutil.rmtree(path, ignore_errors=True)


def _to_json(obj):
    """json.dumps fallback for the numpy / torch values that RNG and data states contain."""
    if isinstance(obj, np.ndarray | torch.Tensor):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} in {STATE_FILE}; "
                    "state_dict() values must be numbers, strings, lists, dicts or arrays")


# ----------------------------------------------------------------------------- optimizer state

def flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state_dict -> ({"<param index>.<key>": tensor}, JSON-able rest)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            target = tensors if isinstance(value, torch.Tensor) else scalars
            target[f"{index}.{key}"] = value
    return _plain_tensors(tensors), {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = defaultdict(dict)
    for name, value in {**tensors, **meta["scalars"]}.items():
        index, key = name.split(".", 1)
        state[int(index)][key] = value
    return {"state": dict(state), "param_groups": meta["param_groups"]}


# ----------------------------------------------------------------------------- RNG state

def rng_state() -> dict:
    """Every generator a training step may draw from: python, numpy, torch CPU and CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


# ----------------------------------------------------------------------------- find and load

def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete (renamed) checkpoint directories under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name))


def prune_checkpoints(root: str | Path, keep_last: int) -> None:
    for path in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(path)


def validate_checkpoint(path: str | Path) -> dict:
    """Check every file is present and readable; return the trainer state. Raises
    FileNotFoundError / CheckpointError naming the file at fault. A sharded checkpoint
    (lmstack.train.dcp) lists its tensor files in the trainer state ("files")."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    _require(path, STATE_FILE)
    tensor_files = _read_json(path / STATE_FILE).get("files", [MODEL_FILE, OPTIMIZER_FILE])
    for name in [*tensor_files, CONFIG_FILE]:
        _require(path, name)
    for name in tensor_files:
        try:
            with safe_open(path / name, framework="pt") as f:
                f.keys()
        except SafetensorError as e:
            raise CheckpointError(f"{path / name} is corrupted (truncated or overwritten?): {e}; "
                                  "resume from an older checkpoint") from e
    _read_json(path / CONFIG_FILE)
    return _read_json(path / STATE_FILE)


def _require(path: Path, name: str) -> None:
    if not (path / name).is_file():
        raise FileNotFoundError(f"checkpoint {path} is missing {name}: it is incomplete or "
                                "was damaged; resume from an older checkpoint")


def is_sharded(state: dict) -> bool:
    """Whether a trainer state (validate_checkpoint's result) belongs to a sharded checkpoint."""
    return "files" in state


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is damaged") from e


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint under root that passes validate_checkpoint (None if there is none);
    damaged newer ones are skipped with a warning."""
    for path in reversed(list_checkpoints(root)):
        try:
            validate_checkpoint(path)
        except (FileNotFoundError, CheckpointError) as e:
            warnings.warn(f"skipping checkpoint {path.name}: {e}", stacklevel=2)
            continue
        return path
    return None


def load_checkpoint(path: str | Path, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load weights (and optimizer state) in place; return the trainer state for the loop."""
    path = Path(path)
    state = validate_checkpoint(path)
    if is_sharded(state):
        from lmstack.train import dcp  # dcp builds on this module
        return dcp.load_checkpoint(path, model, optimizer)
    if state.get("weights") == "trainable":
        load_trainable_weights(model, path)
    else:
        load_weights(model, path)
    if optimizer is not None:
        tensors = load_file(path / OPTIMIZER_FILE)
        optimizer.load_state_dict(unflatten_optimizer(tensors, state["optimizer"]))
    return state


def load_weights(model: nn.Module, path: str | Path) -> None:
    try:
        weights.load_weights(model, Path(path) / MODEL_FILE)
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def load_trainable_weights(model: nn.Module, path: str | Path) -> None:
    """Load a checkpoint that holds only trainable parameters into a model built from its base
    (with the same adapters applied); the names must be exactly the model's trainable ones."""
    tensors = weights.read_weights(Path(path) / MODEL_FILE)
    want = set(model_state(model))
    if set(tensors) != want:
        raise CheckpointError(
            f"{path} holds trainable weights {_few(set(tensors) - want)} the model lacks and lacks "
            f"{_few(want - set(tensors))}; resume with the LoRA settings the run started with")
    model.load_state_dict(tensors, strict=False)


def _few(names: set[str], limit: int = 6) -> list[str]:
    return sorted(names)[:limit]


def load_model(path: str | Path, device: torch.device | str = "cpu") -> Transformer:
    """A Transformer built from a checkpoint's config.json and weights (for sampling)."""
    if is_sharded(validate_checkpoint(path)):
        from lmstack.train import dcp
        return dcp.load_model(path, device)
    return weights.load_model(path, device)
