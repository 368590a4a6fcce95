"""The one training loop. Pretraining uses it as is; SFT, LoRA/QLoRA and distillation plug in
their own batch source and loss function, and freeze what they don't train (requires_grad).

One optimizer step:
  1. set the learning rate from the schedule;
  2. draw grad_accum micro-batches and count their valid target tokens (global over ranks);
  3. forward + backward each, with loss = (sum of token losses) / (that count), so k micro-batches
     give exactly the gradient of one batch k times larger, however the -100 targets fall;
  4. unscale, measure and clip the gradient norm, optimizer step;
  5. evaluate / call hooks / log / checkpoint when due.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from lmstack.kernels import FUSED, swap_linears
from lmstack.train import dcp
from lmstack.train.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from lmstack.train.config import TrainConfig
from lmstack.train.distributed import dp_size, rank
from lmstack.train.metrics import MetricsLog, StepStats
from lmstack.train.optim import make_optimizer, set_lr, trainable_parameters
from lmstack.train.parallel import (
    apply_activation_checkpointing,
    apply_compile,
    global_max,
    global_sum,
    world_size,
)
from lmstack.train.pipeline import Pipeline
from lmstack.train.precision import Precision
from lmstack.train.schedule import lr_multiplier, run_progress

IGNORE_INDEX = -100
CHECKPOINT_DIR = "checkpoints"

# inputs (B, T) int64, targets (B, T) int64; rows packed with several documents add their
# positions and segment_ids (B, T) (see Transformer.forward), which the loss_fn receives too
Batch = tuple[torch.Tensor, ...]
LossFn = Callable[..., torch.Tensor]
Hook = Callable[[StepStats], None]


class BatchSource(Protocol):
    """Where training batches come from (`lmstack.data.TokenStream` is one). The state is
    saved in checkpoints so a resumed run continues at the same position."""

    def next_batch(self) -> Batch: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def cross_entropy_sum(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                      *packing: torch.Tensor) -> torch.Tensor:
    """The default loss: next-token cross-entropy SUMMED over targets != -100 (the loop divides
    by the token count). Any loss_fn must return such a sum, computed in fp32."""
    return token_cross_entropy_sum(logits(model, inputs, *packing), targets)


def logits(model: nn.Module, inputs: torch.Tensor, *packing: torch.Tensor) -> torch.Tensor:
    """model(inputs), or over packed rows model(inputs, positions=, segment_ids=)."""
    if not packing:
        return model(inputs)
    positions, segment_ids = packing
    return model(inputs, positions=positions, segment_ids=segment_ids)


def token_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V) in any dtype, targets (B, T): the fp32 sum over targets != -100."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


@functools.cache
def _compiled_token_cross_entropy_sum() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return torch.compile(token_cross_entropy_sum)


def compiled_cross_entropy_sum(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                               *packing: torch.Tensor) -> torch.Tensor:
    """cross_entropy_sum with the cast, log-softmax and loss (and their backward) as one
    compiled graph: the loop's loss with cfg.compile. Eager, bf16 logits pay a cast and three
    passes over the (B*T, V) logits each way; compiled, one (docs/performance.md)."""
    return _compiled_token_cross_entropy_sum()(logits(model, inputs, *packing), targets)


def loss_for(loss_fn: LossFn, cfg: TrainConfig) -> LossFn:
    """The loss the loop runs: the compiled cross-entropy in place of the default under
    cfg.compile; any other loss_fn as given."""
    return compiled_cross_entropy_sum if cfg.compile and loss_fn is cross_entropy_sum else loss_fn


@dataclass
class RunState:
    """The loop's own counters; saved in every checkpoint."""

    step: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0


@dataclass
class TrainResult:
    step: int  # optimizer steps completed in total
    losses: list[float]  # train loss of each step this call ran
    val_loss: float | None  # from the last evaluation
    val_ppl: float | None
    checkpoint: Path | None  # the final checkpoint (None without out_dir)


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the OS.

    Every CPU training step allocates and frees the same large tensors (logits, their gradient);
    by default glibc hands such blocks back to the OS and takes them again next step, and each
    of their pages faults on first touch; kept, they fault once (docs/performance.md has the
    counts). The cost: the process keeps its peak memory. Returns whether it applied (glibc only; a
    no-op elsewhere)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        # M_TRIM_THRESHOLD (-1): keep up to 2 GiB free at the heap top; M_MMAP_THRESHOLD (-3):
        # blocks under 1 GiB come from the heap, not from their own mmap
        return bool(libc.mallopt(-1, 2 << 30) and libc.mallopt(-3, 1 << 30))
    except (OSError, AttributeError, TypeError):
        return False


def train(model: nn.Module, batches: BatchSource, cfg: TrainConfig, *,
          out_dir: str | Path | None = None, val_batches: Sequence[Batch] | None = None,
          loss_fn: LossFn = cross_entropy_sum, hooks: Sequence[Hook] = (),
          resume_from: str | Path | None = None, base: dict | None = None,
          mesh: DeviceMesh | None = None, val_loss_fn: LossFn | None = None) -> TrainResult:
    """Train `model` in place until cfg.max_steps or cfg.max_time_s.

    out_dir receives metrics.jsonl, TensorBoard logs, checkpoints/ and loss_curve.png (None:
    nothing is written). resume_from is a checkpoint directory to continue from exactly.
    base describes where the frozen weights come from when only some parameters train (LoRA:
    checkpoints then hold the trainable ones only); it is kept in each checkpoint's trainer state.
    mesh: the DeviceMesh of a torchrun launch, with `model` already parallelised over it
    (distributed.build_model); every rank calls train(), rank 0 alone logs and plots, and
    checkpoints are sharded (train.dcp).
    val_loss_fn: the validation loss, when it is not loss_fn (distillation trains on its own
    loss and reports plain cross-entropy, comparable to pretraining's).
    """
    check_seq_len(model, cfg.seq_len)
    pipeline = _pipeline(model, cfg, mesh, loss_fn)
    if pipeline is not None:
        model = pipeline.module  # this rank's stage: what it trains, clips and saves
    device = next(model.parameters()).device
    precision = Precision(cfg.precision.dtype, device)
    if device.type == "cpu":
        keep_freed_memory()
    optimizer = make_optimizer(model, cfg.optim)
    run = _start(model, optimizer, precision, batches, cfg, resume_from, mesh)
    if mesh is None:  # under a mesh, distributed.parallelize applied them before sharding
        _apply_transforms(model, cfg)
    loss_fn, val_loss_fn = loss_for(loss_fn, cfg), loss_for(val_loss_fn or loss_fn, cfg)
    flops_per_token = _flops_per_token(model, cfg)
    log = _metrics_log(out_dir, cfg, run.step)
    result = TrainResult(run.step, [], None, None, None)
    model.train()
    try:
        while not _finished(cfg, run):
            stats = _train_step(model, batches, loss_fn, optimizer, precision, cfg, run,
                                flops_per_token, dp_size(mesh), pipeline)
            last = _finished(cfg, run)
            if val_batches and (last or _due(run.step, cfg.eval.every)):
                stats.val_loss = (evaluate(model, val_batches, val_loss_fn, precision) if pipeline is None
                                  else pipeline.evaluate(val_batches, precision))
                stats.val_ppl = perplexity(stats.val_loss)
                result.val_loss, result.val_ppl = stats.val_loss, stats.val_ppl
            for hook in hooks:
                hook(stats)
            log.log(stats)
            result.losses.append(stats.loss)
            if out_dir is not None and (last or _due(run.step, cfg.checkpoint.every)):
                result.checkpoint = _save(Path(out_dir), model, optimizer, precision, batches,
                                          cfg, run, base, mesh)
    finally:
        log.close()
    result.step = run.step
    return result


def _train_step(model, batches, loss_fn, optimizer, precision, cfg, run, flops_per_token,
                dp: int = 1, pipeline: Pipeline | None = None) -> StepStats:
    t0 = time.perf_counter()
    progress = run_progress(cfg, run.step, run.elapsed_s)
    lr = cfg.optim.lr * lr_multiplier(cfg.schedule, run.step, progress)
    set_lr(optimizer, lr)
    device = next(model.parameters()).device
    micro = [_to_device(batches.next_batch(), device) for _ in range(cfg.grad_accum)]
    if pipeline is None:
        loss, valid = accumulate_gradients(model, micro, loss_fn, precision)
    else:  # the schedule runs every microbatch forward and backward through the stages
        loss, valid = pipeline.step(micro, precision)
    grad_norm = precision.step(optimizer, trainable_parameters(model), cfg.optim.grad_clip,
                               stage_group=pipeline.group if pipeline else None)
    optimizer.zero_grad(set_to_none=True)
    # the slowest rank's time: every rank must agree on time budgets and the schedule's progress
    dt = global_max(time.perf_counter() - t0)
    tokens = sum(batch[0].numel() for batch in micro) * dp  # over the dp ranks' slices
    run.step += 1
    run.tokens_seen += tokens
    run.elapsed_s += dt
    tokens_per_s = tokens / dt
    mfu = None if flops_per_token is None else tokens_per_s * flops_per_token / cfg.logging.peak_flops
    return StepStats(step=run.step, loss=loss, lr=lr, grad_norm=grad_norm, tokens=tokens,
                     valid_tokens=valid, tokens_seen=run.tokens_seen, tokens_per_s=tokens_per_s,
                     mfu=mfu, step_time_s=dt, elapsed_s=run.elapsed_s)


def accumulate_gradients(model: nn.Module, micro_batches: Sequence[Batch], loss_fn: LossFn,
                         precision: Precision) -> tuple[float, int]:
    """Backward over all micro-batches into .grad; return (mean token loss, valid tokens).

    Each micro-batch's summed loss is divided by the valid-token count of the whole step (all
    micro-batches, all ranks), never by its own count: otherwise a micro-batch with few valid
    tokens would weigh as much as a full one. DDP and FSDP2 average gradients over the dp ranks,
    hence the world_size factor. Ranks of one tensor-parallel group read the same batch, so
    the world count is tp x the dp count and tp cancels out of world_size / valid.
    """
    local = sum((batch[1] != IGNORE_INDEX).sum() for batch in micro_batches)
    valid = global_sum(local).clamp(min=1)  # an all-masked step gives zero gradients, not NaN
    total = torch.zeros((), device=valid.device)
    for inputs, targets, *packing in micro_batches:
        with precision.autocast():
            loss_sum = loss_fn(model, inputs, targets, *packing)
        precision.backward(loss_sum * world_size() / valid)
        total += loss_sum.detach().float()
    return (global_sum(total) / valid).item(), int(valid.item())


@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn = cross_entropy_sum,
             precision: Precision | None = None) -> float:
    """Mean loss per valid target token over `batches` (the same batches every call)."""
    device = next(model.parameters()).device
    precision = precision or Precision("fp32", device)
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    count = torch.zeros((), device=device, dtype=torch.long)
    for batch in batches:
        inputs, targets, *packing = _to_device(batch, device)
        with precision.autocast():
            total += loss_fn(model, inputs, targets, *packing).float()
        count += (targets != IGNORE_INDEX).sum()
    model.train(was_training)
    return (global_sum(total) / global_sum(count).clamp(min=1)).item()


def perplexity(loss: float) -> float:
    """exp(mean token loss); inf rather than an OverflowError for a diverged model."""
    return torch.tensor(loss, dtype=torch.float64).exp().item()


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available, else cpu; anything else as torch.device understands it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--train.device={name}: CUDA is not available here; use cpu or auto")
    return device


def check_seq_len(model: nn.Module, seq_len: int) -> None:
    config = getattr(model, "config", None)
    limit = getattr(config, "max_seq_len", None)
    if limit is not None and seq_len > limit:
        raise ValueError(f"--train.seq-len={seq_len} is longer than the model's context "
                         f"(max_seq_len={limit}); lower --train.seq-len or build the model "
                         "with a larger max_seq_len")


# ----------------------------------------------------------------------------- helpers

def _start(model, optimizer, precision, batches, cfg, resume_from, mesh=None) -> RunState:
    """Fresh run: seed every generator. Resume: restore weights, optimizer, scaler, data
    position and RNG exactly as they were when the checkpoint was written (under a mesh from
    a checkpoint of any layout, resliced; RNG states are rank 0's, the same on every rank)."""
    if resume_from is None:
        seed_everything(cfg.seed)
        return RunState()
    load = load_checkpoint if mesh is None else dcp.load_checkpoint
    state = load(resume_from, model, optimizer)
    precision.load_state_dict(state["scaler"])
    batches.load_state_dict(state["data"])
    set_rng_state(state["rng"])
    return RunState(state["step"], state["tokens_seen"], state["elapsed_s"])


def _save(out_dir: Path, model, optimizer, precision, batches, cfg, run, base, mesh=None) -> Path:
    trainer_state = {"tokens_seen": run.tokens_seen, "elapsed_s": run.elapsed_s,
                     "scaler": precision.state_dict(), "data": batches.state_dict(),
                     "rng": rng_state(), "train_config": cfg.to_dict()}
    if base is not None:
        trainer_state["base"] = base
    save = save_checkpoint if mesh is None else dcp.save_checkpoint
    return save(out_dir / CHECKPOINT_DIR, run.step, model, optimizer, trainer_state,
                keep_last=cfg.checkpoint.keep_last)


def _pipeline(model: nn.Module, cfg: TrainConfig, mesh: DeviceMesh | None,
              loss_fn: LossFn) -> Pipeline | None:
    """The schedule that steps this rank's pipeline stage (None unless --train.parallel.pp > 1)."""
    if cfg.parallel.pp == 1:
        return None
    if mesh is None:
        raise ValueError(f"--train.parallel.pp={cfg.parallel.pp} needs a torchrun launch: pass "
                         "train() the mesh of distributed.build_mesh")
    check_pipeline_loss(cfg, loss_fn)
    return Pipeline(model, mesh, cfg.parallel, token_cross_entropy_sum, IGNORE_INDEX)


def check_pipeline_loss(cfg: TrainConfig, loss_fn: LossFn) -> None:
    """Pipeline stages compute the default loss only: refuse any other under pp > 1."""
    if cfg.parallel.pp > 1 and loss_fn is not cross_entropy_sum:
        raise ValueError("pipeline stages compute the default cross-entropy on the last stage; "
                         "a custom loss_fn needs --train.parallel.pp=1")


def _metrics_log(out_dir, cfg: TrainConfig, start_step: int) -> MetricsLog:
    """Rank 0 writes metrics, TensorBoard, the bar and the plot; other ranks nothing."""
    if rank() == 0:
        return MetricsLog(out_dir, cfg.logging, start_step, cfg.max_steps)
    quiet = dataclasses.replace(cfg.logging, progress_bar=False, tensorboard=False, plot=False)
    return MetricsLog(None, quiet, start_step, cfg.max_steps)


def _apply_transforms(model: nn.Module, cfg: TrainConfig) -> None:
    """Module swaps first, then activation checkpointing, then compile (see train.parallel)."""
    if cfg.fused_projections:
        swap_linears(model, FUSED)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        apply_compile(model)


def _flops_per_token(model: nn.Module, cfg: TrainConfig) -> float | None:
    if cfg.logging.peak_flops is None or not hasattr(model, "flops_per_token"):
        return None
    return model.flops_per_token(cfg.seq_len)


def _finished(cfg: TrainConfig, run: RunState) -> bool:
    out_of_steps = cfg.max_steps is not None and run.step >= cfg.max_steps
    out_of_time = cfg.max_time_s is not None and run.elapsed_s >= cfg.max_time_s
    return out_of_steps or out_of_time


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return tuple(t.to(device, non_blocking=True) for t in batch)
