"""The training layer: one loop (pretrain, and later SFT / LoRA / distillation through a loss
function and a batch source), AdamW + LR schedules, precision, checkpoints and metrics."""

from lmstack.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model,
    save_checkpoint,
    validate_checkpoint,
)
from lmstack.train.config import (
    CheckpointConfig,
    EvalConfig,
    LoggingConfig,
    OptimConfig,
    PrecisionConfig,
    ScheduleConfig,
    TrainConfig,
)
from lmstack.train.loop import (
    IGNORE_INDEX,
    BatchSource,
    TrainResult,
    accumulate_gradients,
    compiled_cross_entropy_sum,
    cross_entropy_sum,
    evaluate,
    keep_freed_memory,
    perplexity,
    resolve_device,
    train,
)
from lmstack.train.metrics import StepStats

__all__ = [
    "IGNORE_INDEX", "BatchSource", "CheckpointConfig", "CheckpointError", "EvalConfig",
    "LoggingConfig", "OptimConfig", "PrecisionConfig", "ScheduleConfig", "StepStats",
    "TrainConfig", "TrainResult", "accumulate_gradients", "compiled_cross_entropy_sum",
    "cross_entropy_sum", "evaluate", "keep_freed_memory", "latest_checkpoint", "list_checkpoints",
    "load_checkpoint", "load_model", "perplexity", "resolve_device", "save_checkpoint", "train",
    "validate_checkpoint",
]
