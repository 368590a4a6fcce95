"""Transforms the loop applies to a single-device model from outside, one block at a time.

Order (as torchtitan's parallelize does): activation checkpointing, then compile; under
torchrun, lmstack.train.distributed.parallelize puts tensor parallelism before these and
FSDP2 / DDP after them. None of them renames a parameter, so
checkpoints look the same whichever are on.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmstack.train.precision import CpuBf16Linear, recompute_context


def blocks(model: nn.Module) -> nn.ModuleList:
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no `layers` ModuleList of blocks; "
                         "turn off --train.compile and --train.activation-checkpointing")
    return layers


def _recompute(forward, *args, **kwargs):
    # use_reentrant=False: works with kwargs and with inputs that don't require grad
    if CpuBf16Linear.depth and not torch.compiler.is_compiling():
        kwargs["context_fn"] = recompute_context
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Keep only each block's input in forward; recompute its activations during backward."""
    for block in blocks(model):
        if isinstance(block.__dict__.get("forward"), functools.partial):
            continue  # already wrapped (train() called again on the same model)
        # an instance attribute shadows the class's forward, so state_dict names are unchanged
        block.forward = functools.partial(_recompute, block.forward)


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block in place: every block has the same code, so one compiled graph
    is reused L times, and compile time does not grow with depth."""
    for block in blocks(model):
        block.compile()


def global_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over all ranks (identity on one process): the valid-token count that normalises the
    loss must be global, or ranks with more padding would weigh more."""
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
    return value


def global_max(value: float) -> float:
    """The largest value over all ranks (identity on one process)."""
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor(value, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        value = t.item()
    return value


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
