"""Mixed precision, all in one place: autocast, loss scaling and the clipped optimizer step.

Weights and optimizer state stay fp32 in every mode; only the forward/backward math changes:
  fp32  plain fp32 math.
  bf16  torch.autocast to bfloat16 (CPU and CUDA); bf16 keeps fp32's exponent range, so no
        loss scaling is needed.
  fp16  torch.autocast to float16 on CUDA, with a GradScaler: the loss is multiplied before
        backward so small gradients survive fp16, gradients are unscaled before clipping, and a
        step whose gradients overflowed is skipped while the scale shrinks.

On a CPU without native bf16 matmuls (no AVX512-BF16 / AMX), PyTorch's fallback bf16 GEMM is
fast only when its second operand is a transposed view (x @ W.T), and many times slower for the
input gradient grad @ W with W as stored. `CpuBf16Linear` routes every F.linear through
`_Bf16Linear`, whose backward multiplies by a transposed view of a contiguous copy of W.T
instead: the same products, on the fast kernel (docs/performance.md).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.overrides import TorchFunctionMode

from lmstack.model.cpu import NATIVE_CPU_BF16

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> str:
    """'auto' -> 'bf16' on a CUDA device that supports it or a CPU with native bf16 matmuls
    (AVX512-BF16 / AMX, where bf16 trains faster than fp32), else 'fp32'; check the others fit."""
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return "bf16" if cuda_bf16 or (device.type == "cpu" and NATIVE_CPU_BF16) else "fp32"
    if name not in AUTOCAST_DTYPES:
        raise ValueError(f"--train.precision.dtype={name!r}: choose auto, fp32, bf16 or fp16")
    if name == "fp16" and device.type != "cuda":
        raise ValueError(f"--train.precision.dtype=fp16 needs a CUDA device (got {device}); "
                         "use bf16 or fp32 on CPU")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("--train.precision.dtype=bf16: this GPU has no bf16 support; use fp16")
    if name == "bf16" and device.type == "cpu" and not NATIVE_CPU_BF16:
        # even with CpuBf16Linear, a bf16 step is several times slower than fp32 here (docs/performance.md)
        warnings.warn("bf16 on this CPU has no native matmul kernel and trains many times slower "
                      "than fp32; --train.precision.dtype=fp32 is faster here", stacklevel=2)
    return name


class _Bf16Linear(torch.autograd.Function):
    """F.linear in bf16 whose gradients use the fallback GEMM's fast operand layouts."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
        dt = torch.bfloat16
        x16, w16 = x.to(dt), weight.to(dt)
        b16 = bias.to(dt) if bias is not None else None
        ctx.save_for_backward(x16, w16)
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else None)
        with torch.autocast("cpu", enabled=False):
            return F.linear(x16, w16, b16)  # (..., N) = x @ W.T: already the fast layout

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x16, w16 = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        g = grad.to(torch.bfloat16).flatten(0, -2)  # (M, N)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # g @ W with W as a transposed view, not as stored
            grad_x = (g @ w16.t().contiguous().t()).view(*grad.shape[:-1], -1).to(x_dtype)
        if ctx.needs_input_grad[1]:  # g.T @ x: g.T is a transposed view, already fast
            grad_w = (g.t() @ x16.flatten(0, -2)).to(w_dtype)
        if b_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = g.sum(0).to(b_dtype)
        return grad_x, grad_w, grad_b


class CpuBf16Linear(TorchFunctionMode):
    """While active, F.linear (every nn.Linear, tied heads) runs as _Bf16Linear under CPU bf16
    autocast. Backward runs with torch-function modes off, so activation checkpointing re-enters
    the mode for its recompute (`recompute_context`), or it would save other tensors."""

    depth = 0  # how many are entered now

    def __enter__(self):
        CpuBf16Linear.depth += 1
        return super().__enter__()

    def __exit__(self, *exc):
        CpuBf16Linear.depth -= 1
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is F.linear and torch.is_autocast_enabled("cpu")
                and torch.get_autocast_dtype("cpu") == torch.bfloat16):
            return _Bf16Linear.apply(*_linear_args(*args, **kwargs))
        return func(*args, **kwargs)


def recompute_context() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """(forward, recompute) contexts for torch.utils.checkpoint's context_fn, for a block whose
    forward ran under CpuBf16Linear (compiled blocks need none: the graph holds the mode's ops)."""
    return contextlib.nullcontext(), CpuBf16Linear()


def _linear_args(input, weight, bias=None):  # noqa: A002 (F.linear's own parameter names)
    return input, weight, bias


class Precision:
    """The loop's one handle on numeric precision: `with p.autocast(): loss = ...`,
    `p.backward(loss)`, then `grad_norm = p.step(optimizer, params, max_norm)`."""

    def __init__(self, name: str, device: torch.device):
        self.name = resolve_dtype(name, device)
        self.device = device
        self.dtype = AUTOCAST_DTYPES[self.name]
        # disabled scaler: scale() returns the loss, step() calls optimizer.step()
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.name == "fp16")
        self.cpu_bf16_linear = self.name == "bf16" and device.type == "cpu" and not NATIVE_CPU_BF16

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(self.device.type, dtype=self.dtype))
        if self.cpu_bf16_linear:
            stack.enter_context(CpuBf16Linear())
        return stack

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
             max_norm: float, stage_group: dist.ProcessGroup | None = None) -> float:
        """Unscale, measure (and clip) the global gradient norm, step, update the scale.
        stage_group: the pipeline stages (each holds other parameters), whose squared norms sum
        to the global one."""
        self.scaler.unscale_(optimizer)
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        if isinstance(norm, DTensor):  # FSDP2 / TP shards: sum the partial squares over the mesh
            norm = norm.full_tensor()
        if stage_group is not None:
            squared = norm.pow(2)
            dist.all_reduce(squared, group=stage_group)
            norm = squared.sqrt()
        if max_norm > 0:  # takes the parameters (it scales their .grad), not the gradients
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
        self.scaler.step(optimizer)
        self.scaler.update()
        return norm.item()

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.scaler.load_state_dict(state)

