"""Decode speed across model shapes: every path the engine can take, and the one it chooses.

For each shape, dtype and request count, the engine decodes greedy tokens after a short prompt
(all requests together) on each path:
- eager: the kernels' oneDNN-packed linears (`LLM()`);
- frozen: `compile=True`, every decode step on weights frozen into the graph (inductor's GEMM);
- packed: `compile=True`, every decode step on oneDNN's packed copies inside the graph;
- chosen: `compile=True` as a user gets it: the first steps of each kind take turns among
  frozen, packed and eager, and the fastest is kept.
Decode tokens/s count the tokens after each request's first, over the time after the first
token. The bandwidth bound is weight bytes read per step over the bandwidth measured in the
same run (a sum over a tensor far larger than the caches): one request's upper limit.

    .venv/bin/python benchmarks/decode_shapes.py --threads 2
    .venv/bin/python benchmarks/decode_shapes.py --shapes llama-50m --dtypes fp32 --requests 1 8

Timings on shared cores are noisy: compare the ratios, which come from the same run.
"""

from __future__ import annotations

import argparse
import time

import torch

from lmstack.infer import LLM, SamplingParams
from lmstack.infer.compiled import CompileCache
from lmstack.model import ModelConfig, Transformer

SHAPES = {
    "llama-50m": {},
    "llama-150m": {},
    "llama-197m": dict(dim=1024, n_layers=16, n_heads=16, n_kv_heads=4, hidden_dim=2816,
                       vocab_size=8192, head_dim=64),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PATHS = {  # engine options per path
    "eager": dict(compile=False),
    "frozen": dict(compile=True, compile_probe_steps=0, compile_frozen_rows=10**6),
    "packed": dict(compile=True, compile_probe_steps=0, compile_frozen_rows=0),
    "chosen": dict(compile=True),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    p.add_argument("--requests", type=int, nargs="+", default=[1, 8], help="requests decoding together")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds per path (best is kept)")
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def build(shape: str, dtype: torch.dtype) -> Transformer:
    base = "llama-150m" if shape == "llama-197m" else shape
    cfg = ModelConfig.from_preset(base, **SHAPES[shape])
    return Transformer.build(cfg, seed=0).to(dtype).eval()


def measured_bandwidth(gib: float = 1.0) -> float:
    """Bytes/s of reading a tensor much larger than the caches (best of a few)."""
    x = torch.ones(int(gib * 2**30) // 4)
    best = float("inf")
    for _ in range(6):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def decode_rate(llm: LLM, prompts: list[list[int]], n: int) -> float:
    """Decode tokens/s of requests running together: tokens after each one's first, over the
    time from the first first token to the last finish."""
    outs = llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    start = min(o.metrics.first_token_time for o in outs)
    end = max(o.metrics.finish_time for o in outs)
    return sum(len(o.token_ids) - 1 for o in outs) / (end - start)


def chosen_path(llm: LLM) -> str:
    """What the engine ended up running for its decode steps (after its probes)."""
    decode = llm.runner.decode
    kept = {"eager" if p.choice is None else f"{p.choice.value} compiled" if p.decided else "undecided"
            for p in decode.probes.values()}
    return ", ".join(sorted(kept)) or "rows rule (untimed)"


def measure(model: Transformer, count: int, args) -> dict[str, tuple[float, str]]:
    """Every path's best rate, all engines built first and timed in turns: a path measured
    last in a process that already holds other paths' compiled code ran slower."""
    prompts = [list(range(1 + i, 17 + i)) for i in range(count)]
    llms = {path: LLM(model, max_num_seqs=count, num_blocks=8 * count, compile_cache=CompileCache(),
                      enable_prefix_caching=False, **PATHS[path]) for path in args.paths}
    for llm in llms.values():
        decode_rate(llm, prompts, args.tokens)  # warm up: compiles, and runs the probes
    rates = dict.fromkeys(llms, 0.0)
    for _ in range(args.rounds):
        for path, llm in llms.items():
            rates[path] = max(rates[path], decode_rate(llm, prompts, args.tokens))
    return {path: (rate, chosen_path(llms[path]) if path == "chosen" else "")
            for path, rate in rates.items()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    bandwidth = measured_bandwidth()
    print(f"{args.threads} threads, {args.tokens} new tokens per request after a 16-token prompt, "
          f"bandwidth {bandwidth / 1e9:.1f} GB/s measured; tokens/s (ratio to the best path)")
    print("\n| shape | dtype | requests | bound | " + " | ".join(args.paths) + " | chosen runs |")
    print("|---|---|---:|---:|" + "---:|" * len(args.paths) + "---|")
    for shape in args.shapes:
        for name in args.dtypes:
            model = build(shape, DTYPES[name])
            weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                               if n != "embed_tokens.weight")
            for count in args.requests:
                rates = measure(model, count, args)
                best = max(r for r, _ in rates.values())
                cells = " | ".join(f"{rates[p][0]:,.1f} ({rates[p][0] / best:.2f})" for p in args.paths)
                bound = count * bandwidth / weight_bytes  # one read of the weights per step
                note = rates.get("chosen", (0, ""))[1]
                print(f"| {shape} | {name} | {count} | {bound:,.1f} | {cells} | {note} |", flush=True)


if __name__ == "__main__":
    main()
