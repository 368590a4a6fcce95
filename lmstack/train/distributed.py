"""Training on many processes: torchrun's environment -> a process group -> a DeviceMesh.

    torchrun --nproc-per-node 4 -m lmstack pretrain ... --train.parallel.dp-shard 2 --train.parallel.tp 2

The mesh has four named dimensions, outermost first: ("pp", "dp_replicate", "dp_shard", "tp").
Tensor parallelism is innermost so its frequent collectives stay between neighbouring ranks (the
same node); pipeline stages are outermost because they exchange the least. A degree of 1 still
gets its dimension, so `mesh["pp"]` or `mesh["tp"]` always exists. Ranks in one data-parallel
group ("dp_replicate", "dp_shard") read different batches; ranks that differ only in "tp" or
"pp" read the same one.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable.replicate import replicate
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.overrides import TorchFunctionMode

from lmstack.kernels import FUSED, swap_linears
from lmstack.model import ModelConfig, Transformer
from lmstack.train.config import ParallelConfig, TrainConfig
from lmstack.train.parallel import apply_activation_checkpointing, apply_compile, blocks
from lmstack.train.pipeline import StageModule, check_stages, split_stage
from lmstack.train.precision import AUTOCAST_DTYPES, resolve_dtype

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")
DP_DIMS = ("dp_replicate", "dp_shard")

__all__ = [
    "DP_DIMS", "MESH_DIMS", "FullTensorInit", "ParallelConfig", "apply_fsdp", "apply_tensor_parallel",
    "build_mesh", "build_model", "build_stage", "check_parallel", "check_shardable", "check_tp_linears",
    "check_world_size", "data_parallel", "dp_rank", "dp_size", "full_tensors", "init_distributed", "is_distributed",
    "launch", "launched_world_size", "lay_out_grads_like_params", "parallelize", "rank",
    "RankSlice", "rank_prefix", "rank_state_bytes", "shutdown", "transform_blocks",
]


# ----------------------------------------------------------------------------- process group

def launched_world_size() -> int:
    """WORLD_SIZE as torchrun set it (1 when started as a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def init_distributed(device: torch.device) -> torch.device:
    """Join torchrun's process group with the backend the device needs (gloo on CPU, NCCL on
    CUDA, one GPU per local rank); return the device this rank computes on."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not is_distributed():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # device_id binds NCCL to this rank's GPU at once (no lazy, guessed binding)
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return device


def rank_prefix() -> str:
    """'rank 1/4: ' under torchrun (from its environment, valid even before or after the
    process group), '' for a plain process: what error messages start with."""
    world = launched_world_size()
    return f"rank {os.environ.get('RANK', '0')}/{world}: " if world > 1 else ""


@contextlib.contextmanager
def launch(device: torch.device, cfg: ParallelConfig) -> Iterator[tuple[torch.device, DeviceMesh | None]]:
    """with launch(device, cfg.parallel) as (device, mesh): the body runs on every rank with
    this rank's device and the mesh (None for a plain single process). A clean exit waits for
    all ranks; an error leaves at once (the others may be gone: torchrun stops them)."""
    world = launched_world_size()
    check_world_size(cfg, world)
    if world == 1:
        yield device, None
        return
    device = init_distributed(device)
    try:
        yield device, build_mesh(cfg, device.type)
    except BaseException:
        dist.destroy_process_group()
        raise
    shutdown()


def shutdown() -> None:
    """Leave cleanly: wait for every rank, then destroy the group (gloo can abort at exit when
    one rank tears down while another still talks)."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- mesh

def check_world_size(cfg: ParallelConfig, world_size: int) -> None:
    """Every rank runs this before any collective, so a wrong product fails everywhere at
    once with the same message instead of hanging in the mesh's first all-gather."""
    if cfg.world_size != world_size:
        raise ValueError(
            f"--train.parallel.pp={cfg.pp} x dp-replicate={cfg.dp_replicate} x "
            f"dp-shard={cfg.dp_shard} x tp={cfg.tp} = {cfg.world_size}, but {world_size} "
            f"processes were started; make the product equal torchrun's --nproc-per-node x --nnodes")


def build_mesh(cfg: ParallelConfig, device_type: str = "cpu") -> DeviceMesh:
    """The 4-D DeviceMesh ("pp", "dp_replicate", "dp_shard", "tp") over all ranks."""
    world = dist.get_world_size() if is_distributed() else 1
    check_world_size(cfg, world)
    if not is_distributed():
        raise ValueError("build_mesh needs a process group: launch with torchrun, or call "
                         "init_distributed first")
    return init_device_mesh(device_type, (cfg.pp, cfg.dp_replicate, cfg.dp_shard, cfg.tp),
                            mesh_dim_names=MESH_DIMS)


def dp_rank(mesh: DeviceMesh | None) -> int:
    """Which slice of each global batch this rank reads: its place in (dp_replicate, dp_shard)."""
    if mesh is None:
        return 0
    return mesh["dp_replicate"].get_local_rank() * mesh["dp_shard"].size() + mesh["dp_shard"].get_local_rank()


def dp_size(mesh: DeviceMesh | None) -> int:
    """How many ranks read different batches (dp_replicate x dp_shard)."""
    return 1 if mesh is None else mesh["dp_replicate"].size() * mesh["dp_shard"].size()


class RankSlice:
    """A batch source whose global batches are split over the data-parallel ranks: every rank
    draws the same global batch from `source` (seeded alike, so the same rows) and keeps rows
    [rank * B/dp, (rank + 1) * B/dp) of each tensor in it. For sources without a rank of their
    own (SFT batches); TokenStream reads only its rows itself. The state is the source's, the
    same on every rank.

        batches = RankSlice(SFTBatches(...), dp_rank(mesh), dp_size(mesh))
    """

    def __init__(self, source, rank: int, size: int):
        self.source, self.rank, self.size = source, rank, size

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        batch = self.source.next_batch()
        rows = batch[0].shape[0]
        if rows % self.size:
            raise ValueError(f"a global batch of {rows} rows does not split over {self.size} "
                             "data-parallel ranks; make --train.batch-size a multiple of dp")
        n = rows // self.size
        return tuple(t[self.rank * n:(self.rank + 1) * n] for t in batch)

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)


# ----------------------------------------------------------------------------- strategies

def check_parallel(model_config: ModelConfig, cfg: TrainConfig, world_size: int) -> None:
    """Refuse, on every rank and before any collective, what the mesh cannot split."""
    p = cfg.parallel
    check_world_size(p, world_size)
    for name, heads in (("n_heads", model_config.n_heads), ("n_kv_heads", model_config.n_kv_heads)):
        if heads % p.tp:
            raise ValueError(f"--train.parallel.tp={p.tp} does not divide the model's {name}="
                             f"{heads}; choose a tp degree that divides both n_heads and n_kv_heads")
    if p.tp > 1 and cfg.seq_len % p.tp:
        raise ValueError(f"--train.seq-len={cfg.seq_len} is not a multiple of --train.parallel.tp="
                         f"{p.tp}: sequence parallelism splits every sequence over the tp ranks")
    if p.tp > 1 and cfg.fused_projections:
        raise ValueError("--train.fused-projections concatenates q/k/v and gate/up weights, which "
                         "tensor parallelism shards one by one; turn it off with --train.parallel.tp > 1")
    if cfg.compile and p.tp > 1:
        # measured in torch 2.13 (tests/test_distributed.py): the backward of a compiled block
        # hands DTensor's redistribution a plain tensor (AttributeError: no _local_tensor)
        raise ValueError("--train.compile with --train.parallel.tp > 1 fails in this torch's "
                         "backward (a compiled block returns plain-tensor gradients to DTensor's "
                         "redistribution); compile with dp-shard / dp-replicate, or run TP eager")
    if cfg.precision.dtype == "fp16" and (p.dp_shard > 1 or p.tp > 1):
        # each rank would see overflow in its own shards only and skip steps on its own
        raise ValueError("--train.precision.dtype=fp16 (GradScaler) is not supported with sharded "
                         "gradients (--train.parallel.dp-shard / tp > 1); use bf16")
    if cfg.batch_size % p.dp:
        raise ValueError(f"--train.batch-size={cfg.batch_size} (the global micro-batch) is not a "
                         f"multiple of the data-parallel degree dp-replicate x dp-shard = {p.dp}")
    if p.pp > 1 and p.tp > 1 and p.dp > 1:
        raise ValueError(f"--train.parallel.pp={p.pp} with tp={p.tp} and dp-replicate x dp-shard="
                         f"{p.dp}: pipeline stages compose with data parallelism (dp-shard, "
                         "dp-replicate) or with tensor parallelism, not with both at once yet; "
                         "set --train.parallel.tp=1 or dp-shard=dp-replicate=1")
    check_stages(model_config, p.pp)


def parallelize(model: Transformer, cfg: TrainConfig, mesh: DeviceMesh) -> Transformer:
    """Apply every transform to a (meta-device) single-device model, in torchtitan's order:
      1. module swaps (fused projections), which must see the plain modules;
      2. tensor + sequence parallelism over mesh["tp"];
      3. activation checkpointing per block;
      4. torch.compile per block;
      5. FSDP2 over ("dp_replicate", "dp_shard") (HSDP when both exceed 1), or DDP when only
         dp_replicate > 1 and nothing else splits the model.
    Parameter names never change, so checkpoints look the same under any layout. A pipeline
    stage (build_model) takes 1-4 on the whole meta model and 5 on the stage alone."""
    check_parallel(model.config, cfg, mesh.size())
    transform_blocks(model, cfg, mesh)
    data_parallel(model, cfg, mesh)
    return model


def transform_blocks(model: Transformer, cfg: TrainConfig, mesh: DeviceMesh) -> None:
    """Steps 1-4 of parallelize: what changes the modules of the blocks, embedding and head."""
    p = cfg.parallel
    if cfg.fused_projections:
        swap_linears(model, FUSED)
    if p.tp > 1:
        check_tp_linears(model)
        apply_tensor_parallel(model, mesh["tp"])
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        apply_compile(model)


def data_parallel(model: Transformer | StageModule, cfg: TrainConfig, mesh: DeviceMesh) -> None:
    """Step 5 of parallelize. With tp or pp > 1, dp_replicate alone is FSDP2 over a
    (dp_replicate, dp_shard=1) mesh too: whole weights per replica, gradients all-reduced, and
    the pipeline schedule knows FSDP2 modules (DDP's reducer expects a backward per forward)."""
    p = cfg.parallel
    if p.dp_shard > 1 or (p.dp_replicate > 1 and (p.tp > 1 or p.pp > 1)):
        dp_mesh = mesh["dp_shard"] if p.dp_replicate == 1 else mesh[DP_DIMS]  # 2-D: HSDP
        apply_fsdp(model, dp_mesh, _param_dtype(cfg, mesh.device_type))
    elif p.dp_replicate > 1:
        replicate(model, device_mesh=mesh["dp_replicate"])
    elif _tp_alone(p) and next(model.parameters()).device.type != "meta":
        lay_out_grads_like_params(model)  # (FSDP2 lays out TP gradients itself)


def _tp_alone(p: ParallelConfig) -> bool:
    return p.tp > 1 and p.dp_shard == 1 and p.dp_replicate == 1


TP_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def check_tp_linears(model: nn.Module) -> None:
    """TP's styles split nn.Linear weights; a swapped-in module (LoRA, quantized) is refused."""
    other = [f"{n} ({type(m).__name__})" for n, m in model.named_modules()
             if n.endswith(TP_LINEARS) and not isinstance(m, nn.Linear)]
    if other:
        raise ValueError(f"tensor parallelism splits nn.Linear weights, and {other[:3]} are not "
                         "nn.Linear (LoRA or quantized linears): train them with "
                         "--train.parallel.tp=1, sharded by --train.parallel.dp-shard")


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh) -> None:
    """Megatron-style TP with sequence parallelism (Korthikanti et al. 2022).

    Between blocks the residual stream is split along the sequence (Shard(1)); norms run on
    their slice (SequenceParallel, their weights Replicate on the tp mesh). Attention and the MLP
    gather the full sequence once at their input; q/k/v and gate/up are column-wise (each rank
    owns H/tp heads, hidden/tp channels), o and down row-wise, whose partial sums are
    reduce-scattered back to sequence slices. The embedding is split by vocabulary rows, the
    head by vocabulary columns, its logits gathered whole. Every parameter ends up a DTensor
    on the one tp mesh, so the gradient norm is one reduction."""
    plan = {"embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "norm": SequenceParallel()}
    if model.pos_embed is not None:  # positions (T,) -> (T, C): its sequence dim is dim 0
        plan["pos_embed"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(0))
    if model.lm_head is not None:
        plan["lm_head"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())
    else:  # x @ embed_tokens.weight.T with the weight split by vocabulary rows
        plan["tied_head"] = PrepareModuleInputOutput(
            input_layouts=(Shard(1), Shard(0)), desired_input_layouts=(Replicate(), Shard(0)),
            output_layouts=Shard(-1), desired_output_layouts=Replicate(), use_local_output=True)
    parallelize_module(model, tp_mesh, plan)
    for block in blocks(model):
        layer = {"input_layernorm": SequenceParallel(),
                 "self_attn": PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                                 desired_input_layouts=(Replicate(), None, None, None),
                                                 use_local_output=True),
                 "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
                 "self_attn.v_proj": ColwiseParallel(),
                 "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
                 "post_attention_layernorm": SequenceParallel(),
                 "mlp": PrepareModuleInput(input_layouts=(Shard(1),),
                                           desired_input_layouts=(Replicate(),), use_local_output=True),
                 "mlp.up_proj": ColwiseParallel(),
                 "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1))}
        if block.mlp.gated:
            layer["mlp.gate_proj"] = ColwiseParallel()
        parallelize_module(block, tp_mesh, layer)


def lay_out_grads_like_params(model: nn.Module) -> None:
    """DTensor's backward can leave a gradient laid out unlike its parameter: the sharded
    embedding's comes back Replicate (whole on every rank), sequence-parallel norms' Partial
    (unreduced). Redistribute each as it is accumulated, so a gradient takes the memory of its
    parameter (a Replicate -> Shard step is a local slice) and the optimizer sees matching
    layouts."""
    def match(param: torch.Tensor) -> None:
        if param.grad.placements != param.placements:
            param.grad = param.grad.redistribute(param.device_mesh, param.placements)

    for param in model.parameters():
        if isinstance(param, DTensor) and param.requires_grad:
            param.register_post_accumulate_grad_hook(match)


def apply_fsdp(model: Transformer | StageModule, dp_mesh: DeviceMesh,
               param_dtype: torch.dtype | None) -> None:
    """FSDP2: each block is one unit (its weights all-gathered just before its forward and
    backward, gradients reduce-scattered after); the embeddings and the norm + head are units of
    their own; the root takes whatever is left (a tied embedding, used at both ends). Gradients
    are reduced in fp32 whatever the compute dtype. A pipeline stage shards the parts it holds."""
    check_shardable(model, dp_mesh.size())
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    shard = functools.partial(fully_shard, mesh=dp_mesh, mp_policy=policy)
    embeddings = [m for m in (model.embed_tokens, model.pos_embed) if m is not None]
    if embeddings and not model.config.tie_embeddings:
        shard(embeddings)
    for block in (model.layers.values() if isinstance(model, StageModule) else blocks(model)):
        shard(block)
    if model.lm_head is not None:
        # kept unsharded after forward: backward needs it at once
        shard([model.norm, model.lm_head], reshard_after_forward=False)
    shard(model)


def check_shardable(model: nn.Module, shards: int) -> None:
    """FSDP2 splits every parameter along dim 0. A plain tensor always splits (padded); a
    tensor subclass splits only as its own rules allow (torchao's NF4: every inner tensor, down
    to the scale groups, must divide evenly). Refuse before any rank starts sharding."""
    for name, param in model.named_parameters():
        if isinstance(param, DTensor):  # TP's shards: FSDP2 splits their local tensors itself
            continue
        try:
            torch.chunk(param.data, shards, dim=0)  # a view: no copy, no communication
        except (AssertionError, RuntimeError, ValueError) as e:
            raise ValueError(f"{name} ({type(param.data).__name__}, {tuple(param.shape)}) cannot be "
                             f"split into {shards} FSDP2 shards ({e}); choose a "
                             "--train.parallel.dp-shard its blocks divide into") from e


def _param_dtype(cfg: TrainConfig, device_type: str) -> torch.dtype | None:
    """FSDP2 all-gathers weights in the compute dtype (bf16 halves the traffic)."""
    return AUTOCAST_DTYPES[resolve_dtype(cfg.precision.dtype, torch.device(device_type))]


# ----------------------------------------------------------------------------- build and init

def build_model(model_config: ModelConfig, cfg: TrainConfig, mesh: DeviceMesh | None,
                device: torch.device) -> Transformer | StageModule:
    """The model for this rank: built on the meta device, parallelised, materialised and
    initialised once, with the same weights as `Transformer.build(config, seed=cfg.seed)` (no
    rank ever holds more than one full parameter at a time). mesh=None: that single build.
    With pp > 1, this rank's pipeline stage alone (build_stage)."""
    if mesh is None:
        return Transformer.build(model_config, device=device, seed=cfg.seed)
    with torch.device("meta"):
        model = Transformer(model_config)
    if cfg.parallel.pp > 1:
        return build_stage(model, cfg, mesh, device)
    parallelize(model, cfg, mesh)
    model.to_empty(device=device)
    if _tp_alone(cfg.parallel):  # hooks registered on meta parameters would not survive to_empty
        lay_out_grads_like_params(model)
    torch.manual_seed(cfg.seed)
    with FullTensorInit():
        model.init_weights()
    return model


def build_stage(model: Transformer, cfg: TrainConfig, mesh: DeviceMesh,
                device: torch.device) -> StageModule:
    """This rank's pipeline stage of the meta-device `model`, and nothing else materialised:
      1. the block transforms (parallelize's 1-4) on the whole meta model;
      2. the stage cut from it (its layers; the embeddings on the first stage, the norm and
         head on the last), FSDP2 over this stage's dp sub-mesh when dp > 1;
      3. the stage alone moved to `device` (to_empty); the other stages' modules stay meta;
      4. the whole model's init_weights() under FullTensorInit(device): the same draws, in the
         same order, as one process, the other stages' drawn into scratch and dropped, so the
         stage's weights are exactly those of `Transformer.build(config, seed=cfg.seed)`."""
    p = cfg.parallel
    check_parallel(model.config, cfg, mesh.size())
    transform_blocks(model, cfg, mesh)
    stage = split_stage(model, p.pp, mesh["pp"].get_local_rank())
    stage.sequence_shards = p.tp
    data_parallel(stage, cfg, mesh)
    stage.to_empty(device=device)
    if _tp_alone(p):  # as in build_model: hooks on meta parameters would not survive to_empty
        lay_out_grads_like_params(stage)
    torch.manual_seed(cfg.seed)
    with FullTensorInit(device):
        model.init_weights()
    stage.init_buffers()
    return stage


class FullTensorInit(TorchFunctionMode):
    """While active, a torch.nn.init function called on a DTensor parameter fills the full
    tensor first (same shape, same generator, so the same draws as a single process) and keeps
    this rank's shard of it. Without it each rank would draw only its shard, from a generator
    advanced differently than in a single process.

    device: where a parameter left on the meta device (another pipeline stage's) is drawn
    instead, into a scratch tensor that is dropped: the generator then advances as in one
    process, and the next parameter gets its single-process draws."""

    def __init__(self, device: torch.device | None = None):
        super().__init__()
        self.device = device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) != "torch.nn.init":
            return func(*args, **kwargs)
        bound = inspect.signature(func).bind(*args, **kwargs)
        param = bound.arguments["tensor"]
        if self.device is not None and param.device.type == "meta":
            bound.arguments["tensor"] = torch.empty(param.shape, dtype=param.dtype, device=self.device)
            func(*bound.args, **bound.kwargs)
            return param
        if not isinstance(param, DTensor):
            return func(*args, **kwargs)
        full = torch.empty(param.shape, dtype=param.dtype, device=param.device)
        bound.arguments["tensor"] = full
        func(*bound.args, **bound.kwargs)
        # Replicate -> the parameter's placements is a local slice on every rank: no communication
        whole = DTensor.from_local(full, param.device_mesh, [Replicate()] * param.device_mesh.ndim,
                                   run_check=False)
        param.to_local().copy_(whole.redistribute(param.device_mesh, param.placements).to_local())
        return param


# ----------------------------------------------------------------------------- accounting

def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each DTensor gathered whole (a collective: every rank calls it), plain tensors as they
    are; e.g. the LoRA adapters that rank 0 then saves in PEFT format."""
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in tensors.items()}


def rank_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state that this rank holds (its own shards
    of DTensors): what FSDP2 divides by the dp_shard degree and TP by the tp degree."""
    def nbytes(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    params = list(model.parameters())
    return {"params": sum(nbytes(p) for p in params),
            "grads": sum(nbytes(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(nbytes(v) for state in optimizer.state.values()
                             for v in state.values() if isinstance(v, torch.Tensor))}
