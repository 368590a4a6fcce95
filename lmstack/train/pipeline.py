"""Pipeline parallelism: a Transformer cut into stages from outside, one stage per rank of the
mesh's "pp" dimension, run by torch.distributed.pipelining's GPipe or 1F1B schedule.

  * Stages. Stage 0 holds the token (and position) embedding, the last stage the final norm and
    the head; the layers are split evenly, earlier stages taking one more where they don't
    divide. A stage keeps its modules under their names in the full model (`layers.3.mlp...`),
    so the stages' state_dicts are disjoint parts of the model's.
  * One step. The loop's micro-batches of the step are concatenated into one batch, padded
    with fully masked rows to a multiple of the pipeline's microbatches (they add nothing to
    the loss and nothing to the gradients), and the schedule runs forward and backward of every
    microbatch, which replaces the loop's accumulate_gradients for that run.
  * Loss. The last stage returns, per microbatch, (sum of its token losses) / (valid target
    tokens of the whole step), as accumulate_gradients does, and the schedule is told not to
    rescale (scale_grads=False): the gradient is the single-process one whatever the masks (a
    mean per microbatch is not; see torchtitan issue #2318).
  * Gradient norm. Each stage holds other parameters, so the global norm (clipping, logging) is
    the square root of the sum of the stages' squared norms (Precision.step's stage_group).
  * Data parallel inside a stage. With dp-shard / dp-replicate > 1 each stage is FSDP2-sharded
    over its own dp sub-mesh (distributed.build_model) and each dp group reads its slice of the
    step: the valid-token count is the global one, and the loss is scaled by dp, since FSDP2
    averages the gradients over the dp ranks (as accumulate_gradients does).
  * Tensor parallel inside a stage (tp > 1, dp = 1): the blocks are split as without stages;
    stages send each other the sequence-parallel slice (B, T / tp, C) of the activations.

The model stays the single-device `Transformer`; tied embeddings (one weight on the first and
the last stage) are refused, and so are data and tensor parallelism both inside a stage.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from lmstack.model.cache import causal_mask
from lmstack.model.config import ModelConfig
from lmstack.model.transformer import Transformer, rope_tables
from lmstack.train.config import ParallelConfig
from lmstack.train.optim import param_groups
from lmstack.train.parallel import global_sum
from lmstack.train.precision import Precision

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}

Batch = tuple[torch.Tensor, torch.Tensor]  # inputs (B, T) int64, targets (B, T) int64
TokenLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # logits, targets -> fp32 sum


def stage_layers(n_layers: int, num_stages: int, stage: int) -> range:
    """The layer indices of `stage` out of `num_stages`: an even split, the first
    n_layers % num_stages stages one layer longer."""
    if num_stages > n_layers:
        raise ValueError(f"--train.parallel.pp={num_stages} pipeline stages exceed the model's "
                         f"{n_layers} layers (each stage needs at least one); lower "
                         f"--train.parallel.pp to at most {n_layers}")
    size, extra = divmod(n_layers, num_stages)
    start = stage * size + min(stage, extra)
    return range(start, start + size + (stage < extra))


def check_stages(config: ModelConfig, num_stages: int) -> None:
    """Refuse a model that cannot be cut into `num_stages` (every rank, before any collective)."""
    if num_stages == 1:
        return
    if config.tie_embeddings:
        raise ValueError("--train.parallel.pp > 1 needs untied embeddings: a tied model's "
                         "embedding and head are one weight, on the first and the last stage; "
                         "set tie_embeddings=false or --train.parallel.pp=1")
    stage_layers(config.n_layers, num_stages, 0)


class StageModule(nn.Module):
    """One pipeline stage of a Transformer: the embeddings (first stage), a run of blocks, the
    final norm and head (last stage); every module is the model's own, under the model's name.

    forward: tokens (B, T) on the first stage, else activations (B, T, C) -> activations
    (B, T, C), or logits (B, T, V) on the last stage. It is Transformer.forward for a full
    causal pass (no cache, no padding mask), cut at the stage's edges.
    """

    def __init__(self, model: Transformer, layers: range, is_first: bool, is_last: bool):
        super().__init__()
        self.config = model.config
        self.embed_tokens = model.embed_tokens if is_first else None
        self.pos_embed = model.pos_embed if is_first else None
        # a ModuleDict keyed by the model's layer index keeps the names `layers.<i>.`
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        self.norm = model.norm if is_last else None
        self.sequence_shards = 1  # tensor parallelism's degree once applied (distributed.build_stage)
        self.lm_head = model.lm_head if is_last else None
        if self.config.pos == "rope":
            self.register_buffer("rope_cos", model.rope_cos, persistent=False)
            self.register_buffer("rope_sin", model.rope_sin, persistent=False)
        names = {id(p): name for name, p in model.named_parameters()}
        # the whole model's trainable parameters in a single-process optimizer's order
        self.single_process_order = [names[id(p)] for group in param_groups(model, 0.0)
                                     for p in group["params"]]

    def optimizer_positions(self, optimizer: torch.optim.Optimizer) -> list[int]:
        """Where each parameter of this stage's optimizer (in its order) sits in a
        single-process optimizer of the whole model: the numbering a checkpoint keys optimizer
        state by, the same on every stage (their own numbering would collide)."""
        position = {name: i for i, name in enumerate(self.single_process_order)}
        names = {id(p): name for name, p in self.named_parameters()}
        return [position[names[id(p)]] for group in optimizer.param_groups for p in group["params"]]

    def num_params(self) -> int:
        """Parameters of this stage (its local shards under FSDP2 count whole)."""
        return sum(p.numel() for p in self.parameters())

    def init_buffers(self) -> None:
        """The rope tables, on the stage's device (a stage built on the meta device has none)."""
        if self.config.pos == "rope":
            self.rope_cos, self.rope_sin = rope_tables(self.config, device=self.rope_cos.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # between stages under sequence parallelism x is this rank's slice (B, T / tp, C)
        T = x.shape[1] if self.embed_tokens is not None else x.shape[1] * self.sequence_shards
        positions = torch.arange(T, device=x.device)
        if self.embed_tokens is not None:
            x = self.embed_tokens(x)  # (B, T, C)
            if self.pos_embed is not None:
                x = x + self.pos_embed(positions)
        rope = None
        if self.config.pos == "rope":
            pos = positions.expand(x.shape[0], T)
            rope = (self.rope_cos[pos][:, None].to(x.dtype), self.rope_sin[pos][:, None].to(x.dtype))
        mask = self._mask(T, x.device)
        for layer in self.layers.values():
            x = layer(x, rope, mask)
        if self.norm is None:
            return x
        return self.lm_head(self.norm(x))  # (B, T, V)

    def _mask(self, T: int, device: torch.device) -> torch.Tensor | None:
        window = self.config.sliding_window
        if window is None or T <= window:
            return None  # plain causal
        return causal_mask(0, torch.ones(1, T, dtype=torch.bool, device=device), window)


def split_stage(model: Transformer, num_stages: int, stage: int) -> StageModule:
    """Stage `stage` of `num_stages` of `model` (ValueError, naming the flag, when it can't be cut)."""
    cfg = model.config
    check_stages(cfg, num_stages)
    layers = stage_layers(cfg.n_layers, num_stages, stage)
    return StageModule(model, layers, is_first=stage == 0, is_last=stage == num_stages - 1)


class Pipeline:
    """This rank's stage of a pipeline-parallel model and the schedule that runs it.

        pipeline = Pipeline(model, mesh, cfg.parallel, token_cross_entropy_sum, IGNORE_INDEX)
        loss, valid = pipeline.step(micro_batches, precision)  # forward + backward, into .grad
        # then: clip with the norm over pipeline.group, optimizer step on pipeline.module

    model is this rank's stage as distributed.build_model makes it (FSDP2-sharded over the dp
    sub-mesh when dp > 1, tensor-parallel over mesh["tp"] when tp > 1), or with dp = tp = 1 the
    full Transformer, of which this rank keeps its stage (mesh["pp"]'s local rank).
    """

    def __init__(self, model: Transformer | StageModule, mesh: DeviceMesh, cfg: ParallelConfig,
                 token_loss: TokenLoss, ignore_index: int):
        if (cfg.dp > 1 or cfg.tp > 1) and not isinstance(model, StageModule):
            raise ValueError(f"--train.parallel.pp={cfg.pp} with dp={cfg.dp}, tp={cfg.tp}: pass "
                             "the stage distributed.build_model builds (split over those ranks), "
                             "not a whole Transformer")
        self.group = mesh["pp"].get_group()
        # a world sum of per-rank values counts each dp slice once per rank reading its rows:
        # pp x tp times from every rank, tp times from the last stage's ranks alone
        self.dp, self.tp, self.copies = cfg.dp, cfg.tp, cfg.pp * cfg.tp
        index, num_stages = mesh["pp"].get_local_rank(), cfg.pp
        self.module = model if isinstance(model, StageModule) else split_stage(model, num_stages, index)
        self.microbatches = cfg.pp_microbatches
        self.token_loss, self.ignore_index = token_loss, ignore_index
        self.device = next(self.module.parameters()).device
        stage = PipelineStage(self.module, index, num_stages, self.device, group=self.group)
        self.is_first, self.is_last = stage.is_first, stage.is_last
        self.schedule = SCHEDULES[cfg.pp_schedule](stage, self.microbatches, loss_fn=self._loss,
                                                   scale_grads=False)
        self._scale = torch.ones((), device=self.device)
        self.shape: tuple[int, int] | None = None  # (rows, tokens) of every pipeline step

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.token_loss(logits, targets) * self._scale

    def step(self, micro_batches: Sequence[Batch], precision: Precision) -> tuple[float, int]:
        """Forward + backward of the step's micro-batches through the pipeline, into .grad of
        this stage's parameters; returns (mean token loss, valid tokens), as
        accumulate_gradients does (the same numbers on every rank)."""
        inputs, targets = self._padded(micro_batches)
        # the valid targets of the whole step, over every dp slice
        valid = global_sum((targets != self.ignore_index).sum()) // self.copies
        # x dp: FSDP2 averages the gradients over the dp ranks; an all-masked step gives zero
        # gradients, not NaN
        self._scale = self.dp / valid.clamp(min=1)
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.is_first else ()
        with precision.autocast():
            self.schedule.step(*args, target=targets, losses=losses, return_outputs=False)
        # each loss is already scaled by dp / the step's valid count; known on the last stages
        # only (one per dp slice), their sum over dp is sent to every rank, so that all log and
        # return the same number
        mean = torch.stack(losses).sum().detach() if self.is_last else torch.zeros((), device=self.device)
        mean = global_sum(mean) / (self.dp * self.tp)
        return mean.item(), int(valid.item())

    @torch.no_grad()
    def evaluate(self, batches: Sequence[Batch], precision: Precision) -> float:
        """Mean loss per valid target token over `batches`, through the pipeline in steps of
        the training step's rows (the stages' buffers were shaped for them)."""
        inputs = torch.cat([batch[0] for batch in batches])
        targets = torch.cat([batch[1] for batch in batches])
        rows = self.shape[0] if self.shape else -(-len(inputs) // self.microbatches) * self.microbatches
        total = torch.zeros((), device=self.device)
        self._scale = torch.ones((), device=self.device)
        for start in range(0, len(inputs), rows):
            chunk = (inputs[start:start + rows], targets[start:start + rows])
            x, y = self._padded([chunk], rows)
            losses: list[torch.Tensor] = []
            with precision.autocast():
                self.schedule.eval(*((x,) if self.is_first else ()), target=y, losses=losses,
                                   return_outputs=False)
            if self.is_last:
                total += torch.stack(losses).sum().float()
        # world sums: the loss from the last stage of each slice, the count from every rank of it
        total = global_sum(total) / self.tp
        valid = global_sum((targets != self.ignore_index).sum().to(self.device)) // self.copies
        return (total / valid.clamp(min=1)).item()

    def _padded(self, micro_batches: Sequence[Batch], rows: int | None = None) -> Batch:
        """The micro-batches as one batch on this stage's device, with fully masked rows
        appended up to `rows` (default: the next multiple of the microbatches)."""
        if any(len(batch) > 2 for batch in micro_batches):
            raise ValueError("packed rows (positions, segment_ids) do not run through pipeline "
                             "stages yet; use unpacked batches with --train.parallel.pp > 1")
        inputs = torch.cat([batch[0] for batch in micro_batches]).to(self.device)
        targets = torch.cat([batch[1] for batch in micro_batches]).to(self.device)
        B, M = len(inputs), self.microbatches
        rows = rows or -(-B // M) * M
        shape = (rows, inputs.shape[1])
        self.shape = self.shape or shape
        if shape != self.shape:  # the stages' buffers were shaped by the first step
            raise ValueError(f"a pipeline step of {shape} (rows, tokens) after steps of "
                             f"{self.shape}: every step must have the same batch and seq_len")
        if rows > B:  # any tokens: their targets are never scored
            inputs = torch.cat([inputs, inputs[:1].expand(rows - B, -1)])
            targets = torch.cat([targets, targets.new_full((rows - B, targets.shape[1]),
                                                           self.ignore_index)])
        return inputs, targets
