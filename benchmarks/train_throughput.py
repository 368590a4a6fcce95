"""Training throughput of lmstack against transformers' LlamaForCausalLM, measured in one run.

Both models have the same config and the same weights (lmstack saves an HF directory, transformers
loads it) and see the same batch. Each computes its own loss: lmstack's `cross_entropy_sum`, and
transformers' own causal-LM loss (`labels=`, summed with `num_items_in_batch=1`); with --compile,
each model's layers and its loss are compiled (lmstack's loop uses `compiled_cross_entropy_sum`
then). Everything else
is lmstack's training step, shared: loss sum / valid-token count, backward, global-norm clipping,
AdamW (`accumulate_gradients`, `Precision.step`, `make_optimizer` from `lmstack.train`).

MFU = tokens/s * flops_per_token / peak. The peak is measured here: square n x n x n matmuls in
the same dtype, every operand layout, the fastest call seen anywhere in the run (it is measured
again between rounds, so a busy moment at the start does not lower it).

    .venv/bin/python benchmarks/train_throughput.py                  # fp32 + bf16, ~2 minutes
    .venv/bin/python benchmarks/train_throughput.py --dtype fp32 --compile --profile

Timings on shared cores are noisy: the two models take turns for --seconds, and the table shows
median steps, their ratio, and the ratio of each model's fastest step. With other processes on
the cores, --threads 1 is steadier: two OpenMP threads stall at every barrier while one of them
waits for a core (steps ~10x slower for seconds at a time).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lmstack.model import ModelConfig, Transformer
from lmstack.model.hf import save_hf
from lmstack.model.transformer import NATIVE_CPU_BF16
from lmstack.train import (
    OptimConfig,
    accumulate_gradients,
    compiled_cross_entropy_sum,
    cross_entropy_sum,
    keep_freed_memory,
)
from lmstack.train.optim import make_optimizer, trainable_parameters
from lmstack.train.parallel import apply_compile
from lmstack.train.precision import Precision

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
Batch = tuple[torch.Tensor, torch.Tensor]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-10m", help="model shape (a Llama preset)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=1, help="timed steps per model per turn")
    p.add_argument("--rounds", type=int, default=3, help="at least this many turns each")
    p.add_argument("--seconds", type=float, default=20.0,
                   help="keep alternating until this much time has passed (per dtype and mode)")
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES),
                   help="training precisions (bf16 = autocast; weights and AdamW stay fp32)")
    p.add_argument("--compile", action="store_true",
                   help="also time both models with every block torch.compiled")
    p.add_argument("--peak-n", type=int, default=1024, help="side of the square peak matmuls")
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="keep_freed_memory() as lmstack's loop does on CPU, for both models (one "
                        "process); --no-keep-freed-memory shows glibc's default")
    p.add_argument("--profile", action="store_true", help="print the top ops of each eager step")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- matmul peak

def best_time(fn: Callable[[], object], min_s: float = 0.3, max_reps: int = 20) -> float:
    """Fastest of repeated calls after one warm-up; stops after min_s of timed calls."""
    fn()
    times: list[float] = []
    while len(times) < max_reps and sum(times) < min_s:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@dataclass
class Peak:
    """Matmul FLOP/s for one dtype, by operand layout (N as stored, T transposed): CPU kernels
    without native support for a dtype differ a lot by layout, and training uses all three."""

    dtype: torch.dtype
    n: int
    by_layout: dict[str, float] = field(default_factory=dict)

    def measure(self, layouts: tuple[str, ...] = ("NN", "NT", "TN")) -> None:
        a, b = torch.randn(self.n, self.n, dtype=self.dtype), torch.randn(self.n, self.n, dtype=self.dtype)
        operands = {"NN": (a, b), "NT": (a, b.t()), "TN": (a.t(), b)}
        for name in layouts:
            x, y = operands[name]
            flops = 2 * self.n**3 / best_time(lambda x=x, y=y: x @ y)
            self.by_layout[name] = max(flops, self.by_layout.get(name, 0.0))

    def remeasure_best(self) -> None:
        self.measure((max(self.by_layout, key=self.by_layout.get),))

    @property
    def flops(self) -> float:
        return max(self.by_layout.values())


# ----------------------------------------------------------------------------- the two models

def build_models(preset: str, folder: Path) -> tuple[Transformer, nn.Module]:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    ours = Transformer.build(ModelConfig.from_preset(preset), seed=0)
    save_hf(ours, folder, dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32)
    return ours, hf


def hf_loss_sum(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """transformers' own causal-LM loss over already shifted targets; num_items_in_batch=1
    makes it a sum, which the shared step divides by the valid-token count as for lmstack."""
    return model(input_ids=inputs, labels=targets, shift_labels=targets, num_items_in_batch=1,
                 use_cache=False).loss


def compile_blocks(model: nn.Module) -> None:
    """lmstack's own compile path (each block; the loop then compiles its loss too); the same
    for transformers: each layer, and its loss function."""
    if isinstance(model, Transformer):
        apply_compile(model)
    else:
        for layer in model.model.layers:
            layer.compile()
        model.loss_function = torch.compile(model.loss_function)


@dataclass
class Trainee:
    """A model with its loss, optimizer and precision, stepping as lmstack's loop does."""

    name: str
    model: nn.Module
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    precision: Precision
    optim: OptimConfig = field(default_factory=OptimConfig)
    times: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.optimizer = make_optimizer(self.model, self.optim)
        self.params = trainable_parameters(self.model)

    def step(self, batch: Batch) -> float:
        loss, _ = accumulate_gradients(self.model, [batch], self.loss_fn, self.precision)
        self.precision.step(self.optimizer, self.params, self.optim.grad_clip)
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def timed_steps(self, batch: Batch, n: int) -> None:
        for _ in range(n):
            start = time.perf_counter()
            self.step(batch)
            self.times.append(time.perf_counter() - start)


def trainee_pair(preset: str, dtype: str, compiled: bool, folder: Path) -> list[Trainee]:
    ours, hf = build_models(preset, folder)
    if compiled:
        compile_blocks(ours)
        compile_blocks(hf)
    cpu = torch.device("cpu")
    loss = compiled_cross_entropy_sum if compiled else cross_entropy_sum  # as the loop picks
    return [Trainee("lmstack", ours, loss, Precision(dtype, cpu)),
            Trainee("transformers", hf, hf_loss_sum, Precision(dtype, cpu))]


def random_batch(vocab: int, batch: int, seq_len: int) -> Batch:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seq_len + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # (B, T) inputs, targets


def race(pair: list[Trainee], batch: Batch, args: argparse.Namespace, peak: Peak) -> None:
    """A first step each (same weights: same loss, or the comparison is void; it also compiles
    and warms the allocator), then alternate, swapping who goes first, re-measuring the peak:
    a burst of load from another process then hits both models, not one."""
    ours, theirs = (t.step(batch) for t in pair)
    if abs(ours - theirs) > 1e-2 * abs(theirs):
        raise RuntimeError(f"initial losses differ: lmstack {ours:.5f}, transformers {theirs:.5f}; "
                           "the two models are not the same computation")
    start, r = time.perf_counter(), 0
    while r < args.rounds or time.perf_counter() - start < args.seconds:
        for t in pair if r % 2 == 0 else pair[::-1]:
            t.timed_steps(batch, args.steps)
        peak.remeasure_best()
        r += 1


def profile_step(trainee: Trainee, batch: Batch, rows: int = 20) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainee.step(batch)
    print(f"\n{trainee.name} {trainee.precision.name}: top ops by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


# ----------------------------------------------------------------------------- main

def measure(args: argparse.Namespace, dtype: str, compiled: bool, peak: Peak, folder: Path) -> dict:
    pair = trainee_pair(args.preset, dtype, compiled, folder / f"{dtype}-{compiled}")
    batch = random_batch(pair[0].model.config.vocab_size, args.batch, args.seq_len)
    race(pair, batch, args, peak)
    if args.profile and not compiled:
        for trainee in pair:
            profile_step(trainee, batch)
    tokens = args.batch * args.seq_len
    ours, hf = (tokens / statistics.median(t.times) for t in pair)
    best_ratio = min(pair[1].times) / min(pair[0].times)
    return dict(preset=args.preset, dtype=dtype, mode="compiled" if compiled else "eager",
                ours=ours, hf=hf, best_ratio=best_ratio, steps=len(pair[0].times),
                flops=pair[0].model.flops_per_token(args.seq_len))


def print_peaks(peaks: dict[str, Peak]) -> None:
    for name, peak in peaks.items():
        cells = "  ".join(f"{k} {v / 1e9:6.1f}" for k, v in peak.by_layout.items())
        print(f"  {name:5} {cells}   peak {peak.flops / 1e9:6.1f}")


def print_table(rows: list[dict], peaks: dict[str, Peak]) -> None:
    """tokens/s and MFU from median steps; 'best' compares the fastest step of each instead,
    the least disturbed by other processes."""
    print("\n| model | precision | mode | steps | tokens/s lmstack | tokens/s HF | ratio | ratio best "
          "| MFU lmstack | MFU HF |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mfu = [tps * r["flops"] / peaks[r["dtype"]].flops for tps in (r["ours"], r["hf"])]
        print(f"| {r['preset']} | {r['dtype']} | {r['mode']} | {r['steps']} | {r['ours']:,.0f} "
              f"| {r['hf']:,.0f} | {r['ours'] / r['hf']:.2f}x | {r['best_ratio']:.2f}x "
              f"| {100 * mfu[0]:.1f}% | {100 * mfu[1]:.1f}% |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        keep_freed_memory()
    peaks = {d: Peak(DTYPES[d], args.peak_n) for d in args.dtype}
    for peak in peaks.values():
        peak.measure()
    print(f"{args.preset}, batch {args.batch} x seq_len {args.seq_len}, {args.threads} threads, "
          "AdamW + clipping; steps = timed steps of each model")
    if "bf16" in args.dtype and not NATIVE_CPU_BF16:
        print("bf16: no native bf16 matmul on this CPU; both models' linears run through "
              "lmstack's CpuBf16Linear (lmstack/train/precision.py)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtype:
            for compiled in (False, True) if args.compile else (False,):
                rows.append(measure(args, dtype, compiled, peaks[dtype], Path(tmp)))
    print(f"\nmatmul GFLOP/s, {args.peak_n}^3, best call in the run, by layout (N as stored, T transposed)")
    print_peaks(peaks)
    print_table(rows, peaks)


if __name__ == "__main__":
    main()
