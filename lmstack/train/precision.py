"""Mixed precision, all in one place: autocast, loss scaling and the clipped optimizer step.

Weights and optimizer state stay fp32 in every mode; only the forward/backward math changes:
  fp32  plain fp32 math.
  bf16  torch.autocast to bfloat16 (CPU and CUDA); bf16 keeps fp32's exponent range, so no
        loss scaling is needed.
  fp16  torch.autocast to float16 on CUDA, with a GradScaler: the loss is multiplied before
        backward so small gradients survive fp16, gradients are unscaled before clipping, and a
        step whose gradients overflowed is skipped while the scale shrinks.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> str:
    """'auto' -> 'bf16' on a CUDA device that supports it, else 'fp32'; check the others fit."""
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return "bf16" if cuda_bf16 else "fp32"
    if name not in AUTOCAST_DTYPES:
        raise ValueError(f"--train.precision.dtype={name!r}: choose auto, fp32, bf16 or fp16")
    if name == "fp16" and device.type != "cuda":
        raise ValueError(f"--train.precision.dtype=fp16 needs a CUDA device (got {device}); "
                         "use bf16 or fp32 on CPU")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("--train.precision.dtype=bf16: this GPU has no bf16 support; use fp16")
    if name == "bf16" and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        # without AVX512-BF16 / AMX, bf16 matmuls fall back to a slow loop (README, benchmarks)
        warnings.warn("bf16 on this CPU has no native matmul kernel and trains many times slower "
                      "than fp32; --train.precision.dtype=fp32 is faster here", stacklevel=2)
    return name


class Precision:
    """The loop's one handle on numeric precision: `with p.autocast(): loss = ...`,
    `p.backward(loss)`, then `grad_norm = p.step(optimizer, params, max_norm)`."""

    def __init__(self, name: str, device: torch.device):
        self.name = resolve_dtype(name, device)
        self.device = device
        self.dtype = AUTOCAST_DTYPES[self.name]
        # disabled scaler: scale() returns the loss, step() calls optimizer.step()
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.name == "fp16")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
             max_norm: float) -> float:
        """Unscale, measure (and clip) the global gradient norm, step, update the scale."""
        self.scaler.unscale_(optimizer)
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(grads, max_norm, norm, foreach=True)
        self.scaler.step(optimizer)
        self.scaler.update()
        return norm.item()

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.scaler.load_state_dict(state)

