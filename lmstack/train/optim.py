"""AdamW over the trainable parameters, with weight decay only where it regularises.

Trainable means `requires_grad`: full training, LoRA (frozen base) and distillation (frozen
teacher outside the model) all build their optimizer here the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from lmstack.train.config import OptimConfig


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: >= 2-D weights (matrices, embeddings) decay; norms and biases (1-D) do not,
    since shrinking a gain or an offset towards 0 only fights the normalisation."""
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no parameters with requires_grad=True; nothing to train")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW, fused into one kernel on CUDA and CPU, multi-tensor (foreach) elsewhere.

    On CPU foreach runs op by op over each tensor; the fused kernel makes one pass per tensor,
    several times faster (docs/performance.md)."""
    device = next(model.parameters()).device
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=fused, foreach=not fused)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
