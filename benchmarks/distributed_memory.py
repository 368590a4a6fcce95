"""What each parallel layout changes per rank: training-state bytes and communication, measured.

    .venv/bin/python benchmarks/distributed_memory.py                    # llama-10m, ~2 minutes
    .venv/bin/python benchmarks/distributed_memory.py --preset tiny-llama --layouts ddp fsdp

For each layout the script launches torchrun (gloo on CPU; the same code runs NCCL on GPUs),
and every rank builds the model with `lmstack.train.distributed.build_model`, takes one AdamW
step (so the optimizer state exists), then runs one more forward + backward and measures:
  * state: the bytes of parameters, gradients and optimizer state the rank holds
    (`distributed.rank_state_bytes`, its own shards of DTensors);
  * communication: every collective of that forward + backward, by kind, with the bytes the
    rank contributes (its input), recorded by a TorchDispatchMode over the c10d ops.
The baseline is one plain process measured by the same code in the same run. Memory for
activations is not counted here (activation checkpointing trades it for recompute).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lmstack.model import ModelConfig
from lmstack.train import TrainConfig, distributed
from lmstack.train.config import OptimConfig, ParallelConfig, PrecisionConfig
from lmstack.train.loop import cross_entropy_sum
from lmstack.train.optim import make_optimizer

LAYOUTS = {  # name: (processes, ParallelConfig fields)
    "single": (1, {}),
    "ddp": (2, {"dp_replicate": 2}),
    "fsdp": (2, {"dp_shard": 2}),
    "tp": (2, {"tp": 2}),
    "fsdp_tp": (4, {"dp_shard": 2, "tp": 2}),
    "hsdp": (4, {"dp_replicate": 2, "dp_shard": 2}),
}

# c10d op -> the position of the argument this rank sends (a tensor or a list of tensors)
SENT_ARG = {"allreduce_": 0, "allgather_": 1, "_allgather_base_": 1,
            "allgather_into_tensor_coalesced_": 1, "reduce_scatter_": 1, "_reduce_scatter_base_": 1,
            "reduce_scatter_tensor_coalesced_": 1, "broadcast_": 0, "all_reduce": 0,
            "all_gather_into_tensor": 0, "reduce_scatter_tensor": 0, "all_to_all_single": 0}


class CommCounter(TorchDispatchMode):
    """Counts collectives (eager c10d and functional ones, which DTensor uses) and the bytes
    each contributes from this rank."""

    def __init__(self):
        super().__init__()
        self.calls, self.bytes = Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ns, name = func.namespace, func._schema.name.split("::")[-1]
        if ns in ("c10d", "_c10d_functional") and name in SENT_ARG:
            sent = args[SENT_ARG[name]]
            tensors = sent if isinstance(sent, list | tuple) else [sent]
            kind = name.strip("_").replace("_base", "").replace("_into_tensor", "")
            kind = kind.replace("_tensor_coalesced", "").replace("_coalesced", "")
            kind = kind.removesuffix("_tensor")  # DTensor's functional reduce_scatter_tensor
            kind = {"allreduce": "all_reduce", "allgather": "all_gather"}.get(kind, kind)
            self.calls[kind] += 1
            self.bytes[kind] += sum(t.numel() * t.element_size() for t in tensors)
        return func(*args, **(kwargs or {}))


def measure(preset: str, batch: int, seq_len: int, parallel: ParallelConfig) -> dict:
    cfg = TrainConfig(batch_size=batch, seq_len=seq_len, device="cpu",
                      precision=PrecisionConfig("fp32"), optim=OptimConfig(), parallel=parallel)
    mesh = distributed.build_mesh(parallel) if distributed.is_distributed() else None
    model = distributed.build_model(ModelConfig.from_preset(preset), cfg, mesh, torch.device("cpu"))
    optimizer = make_optimizer(model, cfg.optim)
    per_rank = batch // parallel.dp
    tokens = torch.randint(0, model.config.vocab_size, (per_rank, seq_len + 1),
                           generator=torch.Generator().manual_seed(distributed.dp_rank(mesh)))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    cross_entropy_sum(model, inputs, targets).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with CommCounter() as comm:
        cross_entropy_sum(model, inputs, targets).backward()
    return {"state": distributed.rank_state_bytes(model, optimizer),
            "calls": dict(comm.calls), "bytes": dict(comm.bytes)}


def worker(args) -> None:
    torch.set_num_threads(1)
    world = distributed.launched_world_size()
    if world > 1:
        distributed.init_distributed(torch.device("cpu"))
    result = measure(args.preset, args.batch, args.seq_len, ParallelConfig(**json.loads(args.parallel)))
    Path(args.out, f"rank{distributed.rank()}.json").write_text(json.dumps(result))
    distributed.shutdown()


def launch(name: str, args, tmp: Path) -> list[dict]:
    nproc, fields = LAYOUTS[name]
    out = tmp / name
    out.mkdir()
    cmd = [__file__, "--worker", "--out", str(out), "--parallel", json.dumps(fields),
           "--preset", args.preset, "--batch", str(args.batch), "--seq-len", str(args.seq_len)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", *cmd]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    files = [out / f"rank{r}.json" for r in range(nproc)]
    if not all(f.exists() for f in files):  # judged by the ranks' files (gloo may abort at exit)
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-4000:]}")
    return [json.loads(f.read_text()) for f in files]


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-10m")
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--layouts", nargs="*", default=list(LAYOUTS))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--parallel", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    layouts = ["single", *[n for n in args.layouts if n != "single"]]
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: launch(name, args, Path(tmp)) for name in layouts}
    base = sum(results["single"][0]["state"].values())
    print(f"{args.preset}, global batch {args.batch} x {args.seq_len} tokens, fp32, CPU/gloo; "
          "per rank (the largest rank)\n")
    print("| layout | procs | params MiB | grads MiB | optimizer MiB | state x single "
          "| collectives per forward+backward (calls, MiB sent) |")
    print("|---|---|---|---|---|---|---|")
    for name, ranks in results.items():
        worst = max(ranks, key=lambda r: sum(r["state"].values()))
        s = worst["state"]
        comm = ", ".join(f"{k} x{worst['calls'][k]} ({mib(worst['bytes'][k])})"
                         for k in sorted(worst["calls"])) or "none"
        print(f"| {name} | {LAYOUTS[name][0]} | {mib(s['params'])} | {mib(s['grads'])} | "
              f"{mib(s['optimizer'])} | {sum(s.values()) / base:.3f} | {comm} |")


if __name__ == "__main__":
    main()
