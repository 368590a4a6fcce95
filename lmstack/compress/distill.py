"""Knowledge distillation (Hinton, Vinyals and Dean 2015): a loss for the one training loop that
pulls a student's next-token distributions towards a frozen teacher's on the same inputs.

    loss_fn = distillation_loss(teacher, temperature=2.0, alpha=0.5)
    train(student, batches, cfg, loss_fn=loss_fn, val_loss_fn=cross_entropy_sum)

Per valid target (targets != -100), in fp32, with z the logits and T the temperature:

    alpha * T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T)) + (1 - alpha) * CE(z_student, target)

summed over the batch, as every loss of the loop is (it divides by the global valid-token count).
The T^2 factor is Hinton's: the soft term's gradient shrinks as 1/T^2, so the factor keeps its
weight against the hard term comparable across temperatures.

Vocabulary rule: student and teacher score the same token ids, so their logits have the same
width; any other width is refused, a teacher whose head is padded beyond its tokenizer too
(its padding columns hold probability no student column can match, and slicing them off would
quietly renormalise the teacher; build the student from data of the teacher's tokenizer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # the training loop's "not a target" (lmstack.train.IGNORE_INDEX)


@dataclass
class DistillConfig:
    """How the student learns from the teacher."""

    temperature: float = 2.0
    """Both models' logits are divided by this before the KL term; > 1 softens the teacher and
    shows the student more than its top token."""
    alpha: float = 0.5
    """Weight of the KL term (times T^2); 1 - alpha weighs the cross-entropy on the data's targets."""

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"--distill.temperature={self.temperature!r} is invalid: must be > 0")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"--distill.alpha={self.alpha!r} is invalid: must be in [0, 1]")


def distillation_loss(teacher: nn.Module, temperature: float = DistillConfig.temperature,
                      alpha: float = DistillConfig.alpha) -> Callable[..., torch.Tensor]:
    """The loop's loss_fn(student, inputs, targets, *packing) -> the fp32 sum above.

    The teacher is frozen here (eval mode, requires_grad off) and runs under no_grad on the
    same inputs and packing as the student; it may live on any device the inputs do."""
    cfg = DistillConfig(temperature, alpha)
    teacher.eval().requires_grad_(False)

    def loss_fn(student: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                *packing: torch.Tensor) -> torch.Tensor:
        student_logits = _logits(student, inputs, *packing)
        with torch.no_grad():
            teacher_logits = _logits(teacher, inputs, *packing)
        return distillation_sum(student_logits, teacher_logits, targets, cfg.temperature, cfg.alpha)

    return loss_fn


def distillation_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     targets: torch.Tensor, temperature: float, alpha: float) -> torch.Tensor:
    """logits (B, T, V) in any dtype, targets (B, T) -> the fp32 sum over valid targets."""
    check_same_vocab(student_logits.shape[-1], teacher_logits.shape[-1])
    ce = F.cross_entropy(student_logits.flatten(0, 1).float(), targets.flatten(),
                         ignore_index=IGNORE_INDEX, reduction="sum")
    kl = kl_sum(student_logits, teacher_logits, targets, temperature)
    return alpha * temperature**2 * kl + (1 - alpha) * ce


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
           temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher_T || student_T) in fp32, summed over the positions whose target is valid."""
    valid = targets != IGNORE_INDEX  # (B, T)
    student = F.log_softmax(student_logits[valid].float() / temperature, dim=-1)  # (N, V)
    teacher = F.log_softmax(teacher_logits[valid].float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="sum")


def check_same_vocab(student: int, teacher: int) -> None:
    if student != teacher:
        raise ValueError(f"the teacher scores {teacher} token ids and the student {student}: "
                         "distillation needs one vocabulary; build the student from data "
                         "prepared with the teacher's tokenizer")


def _logits(model: nn.Module, inputs: torch.Tensor, *packing: torch.Tensor) -> torch.Tensor:
    """model(inputs), or over packed rows model(inputs, positions=, segment_ids=)."""
    if not packing:
        return model(inputs)
    positions, segment_ids = packing
    return model(inputs, positions=positions, segment_ids=segment_ids)
