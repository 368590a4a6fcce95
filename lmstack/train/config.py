"""TrainConfig: every knob of the one training loop, each default written once, here.

Loop-wide settings sit at the top level, the rest in sections (optim, schedule, precision,
checkpoint, eval, logging, parallel). `lmstack pretrain` exposes them as `--train.<field>` and
`--train.<section>.<field>`; the field docstrings below are the command's help text.
Invalid values raise ValueError naming the flag to change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal


def _check(ok: bool, flag: str, value, need: str) -> None:
    if not ok:
        raise ValueError(f"--{flag.replace('_', '-')}={value!r} is invalid: {need}")


@dataclass
class OptimConfig:
    """AdamW. Weight decay applies only to weights with two or more dimensions."""

    lr: float = 3e-4
    """Peak learning rate, reached at the end of warmup."""
    weight_decay: float = 0.1
    """Decoupled weight decay on >= 2-D weights (matrices, embeddings); norms and biases get 0."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping (the norm is still logged)."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, "train.optim.lr", self.lr, "must be positive")
        _check(self.weight_decay >= 0, "train.optim.weight_decay", self.weight_decay, "must be >= 0")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            _check(0 <= value < 1, f"train.optim.{name}", value, "must be in [0, 1)")
        _check(self.eps > 0, "train.optim.eps", self.eps, "must be positive")
        _check(self.grad_clip >= 0, "train.optim.grad_clip", self.grad_clip, "must be >= 0 (0: off)")


@dataclass
class ScheduleConfig:
    """Learning-rate multiplier: linear warmup, then cosine decay or warmup-stable-decay."""

    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    """cosine: decay to min_lr_ratio over the run; wsd: hold, then decay linearly over the last
    decay_frac of the run; constant: hold after warmup."""
    warmup_steps: int = 100
    """Steps of linear warmup from lr/warmup_steps to lr."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    decay_frac: float = 0.2
    """wsd only: fraction of the run (after warmup) spent decaying."""

    def __post_init__(self) -> None:
        _check(self.kind in ("cosine", "wsd", "constant"), "train.schedule.kind", self.kind,
               "choose cosine, wsd or constant")
        _check(self.warmup_steps >= 0, "train.schedule.warmup_steps", self.warmup_steps, "must be >= 0")
        _check(0 <= self.min_lr_ratio <= 1, "train.schedule.min_lr_ratio", self.min_lr_ratio,
               "must be in [0, 1]")
        _check(0 < self.decay_frac <= 1, "train.schedule.decay_frac", self.decay_frac,
               "must be in (0, 1]")


@dataclass
class PrecisionConfig:
    """Numeric precision of forward and backward; weights and optimizer state stay fp32."""

    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast on a GPU that supports it, else fp32. fp16 (CUDA only) adds a GradScaler."""

    def __post_init__(self) -> None:
        _check(self.dtype in ("auto", "fp32", "bf16", "fp16"), "train.precision.dtype", self.dtype,
               "choose auto, fp32, bf16 or fp16")


@dataclass
class CheckpointConfig:
    """Checkpoints under OUT/checkpoints/step_XXXXXXXX, written atomically."""

    every: int = 1000
    """Save every this many steps (0: only the final checkpoint)."""
    keep_last: int = 3
    """Keep the newest this many checkpoints and delete older ones."""

    def __post_init__(self) -> None:
        _check(self.every >= 0, "train.checkpoint.every", self.every, "must be >= 0 (0: final only)")
        _check(self.keep_last >= 1, "train.checkpoint.keep_last", self.keep_last, "must be >= 1")


@dataclass
class EvalConfig:
    """Validation loss and perplexity on a fixed set of held-out batches."""

    every: int = 500
    """Evaluate every this many steps (0: only at the end)."""
    batches: int = 20
    """Validation batches per evaluation (the same batches every time)."""

    def __post_init__(self) -> None:
        _check(self.every >= 0, "train.eval.every", self.every, "must be >= 0 (0: at the end only)")
        _check(self.batches >= 1, "train.eval.batches", self.batches, "must be >= 1")


@dataclass
class LoggingConfig:
    """Where per-step metrics go: OUT/metrics.jsonl always, plus these."""

    progress_bar: bool = True
    """Show a tqdm bar with loss, tokens/s and MFU."""
    tensorboard: bool = True
    """Write TensorBoard scalars under OUT/tensorboard."""
    plot: bool = True
    """Write OUT/loss_curve.png at the end of the run."""
    peak_flops: float | None = None
    """Peak FLOP/s of one device in the training dtype (e.g. 989e12 for an H100 in bf16);
    enables the MFU column. None: no MFU."""

    def __post_init__(self) -> None:
        _check(self.peak_flops is None or self.peak_flops > 0, "train.logging.peak_flops",
               self.peak_flops, "must be positive or None")


@dataclass
class ParallelConfig:
    """How ranks split the work under torchrun (lmstack.train.distributed); the product of the
    four degrees must equal the world size. All 1: one process, no torch.distributed."""

    dp_replicate: int = 1
    """Data-parallel replicas holding whole copies of the weights (DDP; with dp_shard > 1, HSDP)."""
    dp_shard: int = 1
    """Data-parallel ranks that shard weights, gradients and optimizer state (FSDP2)."""
    tp: int = 1
    """Tensor-parallel degree: each block's matmuls split over this many ranks (must divide the
    heads and KV heads)."""
    pp: int = 1
    """Pipeline stages: the layers split into this many consecutive groups."""
    pp_schedule: Literal["gpipe", "1f1b"] = "1f1b"
    """Pipeline schedule (lmstack.train.pipeline): gpipe runs every microbatch's forward, then
    every backward; 1f1b alternates them once the pipeline is full, holding fewer activations."""
    microbatches: int | None = None
    """Pipeline microbatches per optimizer step; more shrink the idle bubble (None: one per
    stage). A step's rows are padded with masked rows to a multiple of it."""

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "dp_shard", "tp", "pp"):
            _check(getattr(self, name) >= 1, f"train.parallel.{name}", getattr(self, name),
                   "must be >= 1")
        _check(self.pp_schedule in ("gpipe", "1f1b"), "train.parallel.pp_schedule",
               self.pp_schedule, "choose gpipe or 1f1b")
        _check(self.microbatches is None or self.microbatches >= 1, "train.parallel.microbatches",
               self.microbatches, "must be >= 1 or None")
        _check(self.pp_schedule != "1f1b" or self.pp_microbatches >= self.pp,
               "train.parallel.microbatches", self.microbatches,
               f"1f1b needs at least one microbatch per stage ({self.pp}); raise it or use "
               "--train.parallel.pp-schedule gpipe")

    @property
    def pp_microbatches(self) -> int:
        return self.pp if self.microbatches is None else self.microbatches

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many ranks read different batches."""
        return self.dp_replicate * self.dp_shard


@dataclass
class TrainConfig:
    """Everything the training loop needs to know, apart from the model and the data."""

    batch_size: int = 16
    """Sequences per micro-batch, over all data-parallel ranks together (under torchrun each
    reads batch_size / dp of them), so a run's batches do not depend on its layout."""
    seq_len: int = 256
    """Tokens per sequence; at most the model's max_seq_len."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (effective batch = batch_size * grad_accum)."""
    max_steps: int | None = 1000
    """Stop after this many optimizer steps (None: stop on max_time_s only)."""
    max_time_s: float | None = None
    """Stop after this many seconds of training, across resumes (None: no time limit)."""
    seed: int = 0
    """Seeds the model init, the data order and every random generator."""
    device: str = "auto"
    """Where `lmstack pretrain` builds the model: auto (cuda if available, else cpu), cpu, cuda
    or cuda:N. train() itself runs wherever the model's parameters are."""
    compile: bool = False
    """torch.compile each Transformer block, and the default loss (its cross-entropy)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward instead of storing them."""
    fused_projections: bool = False
    """Run q/k/v, and gate/up, as one product each (lmstack.kernels.FUSED, over the weights
    concatenated): fewer, larger matmuls forward and backward; parameters and checkpoints are
    unchanged. Off by default: on CPU it measured within the noise (docs/performance.md)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "grad_accum"):
            _check(getattr(self, name) >= 1, f"train.{name}", getattr(self, name), "must be >= 1")
        _check(self.max_steps is not None or self.max_time_s is not None, "train.max_steps",
               None, "set train.max_steps or train.max_time_s (or both)")
        _check(self.max_steps is None or self.max_steps >= 1, "train.max_steps", self.max_steps,
               "must be >= 1 or None")
        _check(self.max_time_s is None or self.max_time_s > 0, "train.max_time_s",
               self.max_time_s, "must be positive or None")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        d = dict(d)
        for name, kind in _SECTIONS.items():
            if isinstance(d.get(name), dict):
                d[name] = kind(**d[name])
        unknown = set(d) - set(sections)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}; valid: {sorted(sections)}")
        return cls(**d)


_SECTIONS = {"optim": OptimConfig, "schedule": ScheduleConfig, "precision": PrecisionConfig,
             "checkpoint": CheckpointConfig, "eval": EvalConfig, "logging": LoggingConfig,
             "parallel": ParallelConfig}
