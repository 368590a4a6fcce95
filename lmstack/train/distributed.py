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

import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lmstack.train.config import ParallelConfig

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")
DP_DIMS = ("dp_replicate", "dp_shard")

__all__ = ["DP_DIMS", "MESH_DIMS", "ParallelConfig", "build_mesh", "dp_rank", "dp_size",
           "init_distributed", "is_distributed", "launched_world_size", "rank", "shutdown"]


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
