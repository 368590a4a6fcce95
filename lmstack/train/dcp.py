"""Sharded checkpoints through torch.distributed.checkpoint (DCP), readable under any layout.

A sharded checkpoint ROOT/step_00001000 holds
  shard-<rank>-model-00001-of-00001.safetensors   each rank's slices of the model's and the
                       optimizer's tensors, with their offsets in the full tensor (DCP's safetensors
                       writer: no pickles anywhere)
  trainer_state.json   rank 0: the same trainer state a single-process checkpoint holds (step,
                       tokens, time, optimizer param groups, scaler, RNG, data position, config),
                       plus the list of shard files
  config.json          the ModelConfig
The tensors are keyed exactly as in a single-process checkpoint: model tensors by parameter
name, optimizer tensors "<param index>.<key>". So one reader (DCP's safetensors reader, which
reslices whatever files it finds) loads either kind into any layout: 2 ranks -> 1, 1 -> 2,
FSDP2 -> TP, or one plain process. The data position is the TokenStream step, which does not
depend on the world size, so resharding loses nothing.

Commit: every rank writes into ROOT/.tmp-step_XXXXXXXX (DCP fsyncs each file); once all have
finished, rank 0 writes the JSON files and renames the directory to its final name in one step.
A rank killed mid-save leaves only the temporary directory; the previous checkpoint stays the
newest valid one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.hf_storage import (
    HuggingFaceStorageReader,
    HuggingFaceStorageWriter,
)

from lmstack.model import ModelConfig, Transformer, weights
from lmstack.model.hf import save_hf
from lmstack.model.weights import CONFIG_FILE
from lmstack.train.checkpoint import (
    STATE_FILE,
    CheckpointError,
    _model_config,
    _remove_stale_tmp,
    _to_json,
    model_state,
    prune_checkpoints,
    validate_checkpoint,
)

SHARD_GLOB = "shard-*.safetensors"


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------- state as tensors

def tensor_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, torch.Tensor]:
    """The model's and the optimizer's tensors under their checkpoint names; the tensors
    themselves (DTensor shards under FSDP2 / TP), so DCP reads into them in place."""
    state = model_state(model)
    if optimizer is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        # the numbering of optimizer.state_dict(); a pipeline stage numbers its parameters as
        # the whole model's optimizer does, so that the stages' keys do not collide
        positions = getattr(model, "optimizer_positions", None)
        indices = positions(optimizer) if positions is not None else range(len(params))
        for index, param in zip(indices, params, strict=True):
            for key, value in optimizer.state[param].items():
                if isinstance(value, torch.Tensor):
                    state[f"{index}.{key}"] = value
    return state


def optimizer_meta(optimizer: torch.optim.Optimizer) -> dict:
    """What is not a tensor, in the single-process checkpoint's JSON layout."""
    sd = optimizer.state_dict()
    scalars = {f"{index}.{key}": value for index, s in sd["state"].items()
               for key, value in s.items() if not isinstance(value, torch.Tensor)}
    return {"param_groups": sd["param_groups"], "scalars": scalars}


def materialise_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """A fresh optimizer has no state tensors to load into: take one step with zero gradients
    and a zero learning rate (the weights do not move), then forget the gradients."""
    if optimizer.state:
        return
    saved = []
    for group in optimizer.param_groups:
        saved.append(group["lr"])
        group["lr"] = 0.0
        for p in group["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, saved, strict=True):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- save

def save_checkpoint(root: str | Path, step: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer, trainer_state: dict,
                    keep_last: int | None = None) -> Path:
    """Every rank writes its shards of ROOT/step_<step>; rank 0 commits it atomically and
    keeps the newest `keep_last`. Collective: all ranks call it."""
    root = Path(root)
    tmp, final = root / f".tmp-step_{step:08d}", root / f"step_{step:08d}"
    if _is_main():
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(root)
        tmp.mkdir()
    _barrier()
    dcp.save(tensor_state(model, optimizer),
             storage_writer=HuggingFaceStorageWriter(str(tmp), save_distributed=True))
    _barrier()  # every rank's shard file is written and fsynced
    if _is_main():
        files = sorted(p.name for p in tmp.glob(SHARD_GLOB))
        kept = "all" if len(model_state(model)) == len(model.state_dict()) else "trainable"
        state = {**trainer_state, "step": step, "optimizer": optimizer_meta(optimizer),
                 "weights": kept, "files": files}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, default=_to_json))
        (tmp / CONFIG_FILE).write_text(json.dumps(_model_config(model), indent=2))
        for name in (STATE_FILE, CONFIG_FILE):
            weights.fsync(tmp / name)
        weights.replace_dir(tmp, final)
        if keep_last is not None:
            prune_checkpoints(root, keep_last)
    _barrier()
    return final


# ----------------------------------------------------------------------------- load

def check_same_model(path: Path, model: nn.Module) -> None:
    """Refuse a checkpoint of another model before any rank starts reading (no collective
    runs, so every rank raises the same error instead of hanging in a half-done load)."""
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        return
    saved = json.loads((path / CONFIG_FILE).read_text())
    diff = {k: (saved.get(k), v) for k, v in config.to_dict().items() if saved.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r}, model {b!r}" for k, (a, b) in list(diff.items())[:6])
        raise CheckpointError(f"{path} holds another model ({detail}); build the model with the "
                              "checkpoint's config.json or choose another checkpoint")


def load_checkpoint(path: str | Path, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, *, alone: bool = False) -> dict:
    """Load a sharded or a single-process checkpoint into `model` (and `optimizer`) whatever
    their layout, in place; return the trainer state. Collective when a process group is up,
    unless `alone` (one rank reads into a plain model of its own)."""
    path = Path(path)
    state = validate_checkpoint(path)
    check_same_model(path, model)
    if optimizer is not None:
        materialise_optimizer_state(optimizer)
    tensors = tensor_state(model, optimizer)
    try:
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(path)),
                 no_dist=alone or not dist.is_initialized())
    except Exception as e:  # DCP wraps per-rank failures in CheckpointException
        raise CheckpointError(f"cannot load {path} into this model: {e}") from e
    if optimizer is not None:
        for group, saved in zip(optimizer.param_groups, state["optimizer"]["param_groups"],
                                strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
    return state


def load_model(path: str | Path, device: torch.device | str = "cpu") -> Transformer:
    """A plain Transformer from any checkpoint (sharded ones are assembled), read by this
    process alone, even under torchrun."""
    path = Path(path)
    validate_checkpoint(path)
    model = Transformer.build(ModelConfig.load(path / CONFIG_FILE), device=device)
    load_checkpoint(path, model, alone=True)
    return model.eval()


def export_hf(checkpoint: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """One Hugging Face directory (config.json + safetensors) from a sharded checkpoint; runs
    in one process, which holds the whole model."""
    save_hf(load_model(checkpoint), out_dir, dtype=dtype)
    return Path(out_dir)
