"""Learning-rate schedules as pure functions: a multiplier of the peak lr for each step.

Two numbers describe where a run is: `step` (optimizer steps already taken; warmup counts
them) and `progress` in [0, 1], the fraction of the post-warmup budget used. With a step
budget progress is (step - warmup) / (max_steps - warmup), so the schedule is a function of
the step alone and resumes exactly. With a time budget it is elapsed / max_time_s (whichever
budget ends first wins), so a run that stops on time still finishes its decay.
"""

from __future__ import annotations

import math

from lmstack.train.config import ScheduleConfig, TrainConfig


def warmup(step: int, warmup_steps: int) -> float:
    """Linear ramp 1/W, 2/W, ..., 1: the first step already moves the weights."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def cosine(progress: float, min_ratio: float) -> float:
    """Half a cosine from 1 down to min_ratio as progress goes 0 -> 1."""
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_stable_decay(progress: float, decay_frac: float, min_ratio: float) -> float:
    """Hold at 1, then fall linearly to min_ratio over the last decay_frac of the run (WSD,
    Hu et al. 2024, MiniCPM): a checkpoint from the stable phase can be decayed later."""
    decay_start = 1 - decay_frac
    if progress <= decay_start:
        return 1.0
    return 1 - (1 - min_ratio) * (progress - decay_start) / decay_frac


def lr_multiplier(cfg: ScheduleConfig, step: int, progress: float) -> float:
    """Multiplier of the peak lr for the optimizer step numbered `step` (0-based)."""
    if step < cfg.warmup_steps:
        return warmup(step, cfg.warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if cfg.kind == "cosine":
        return cosine(progress, cfg.min_lr_ratio)
    if cfg.kind == "wsd":
        return warmup_stable_decay(progress, cfg.decay_frac, cfg.min_lr_ratio)
    return 1.0


def run_progress(cfg: TrainConfig, step: int, elapsed_s: float) -> float:
    """Fraction in [0, 1] of the post-warmup budget used after `step` steps and `elapsed_s`."""
    done = 0.0
    if cfg.max_steps is not None:
        decay_steps = max(cfg.max_steps - cfg.schedule.warmup_steps, 1)
        done = (step - cfg.schedule.warmup_steps) / decay_steps
    if cfg.max_time_s is not None:
        done = max(done, elapsed_s / cfg.max_time_s)
    return min(max(done, 0.0), 1.0)
