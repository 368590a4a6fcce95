"""Quantized models through the engine: decode and prefill speed, and resident bytes, against bf16.

For each shape, the bf16 model (random weights, seed 0) and its int8 and int4 (group 128)
copies, quantized by RTN (GPTQ makes the same modules, so it runs at the same speed), are
served by `LLM`, all engines built first and then timed in turns:
- decode: one request, greedy, `--tokens` new tokens after a 16-token prompt; tokens after the
  first over the time after the first (best of `--rounds`);
- prefill: one `--prefill-len`-token prompt; prompt tokens over the time to its first token;
- weight bytes: what the model holds (parameters and buffers, kernel layouts included), and
  what one decode step reads (everything but the embedding table);
- bound: one request's upper limit at the bandwidth measured in the same run (weight bytes read
  per step over bytes/s of a sum over a tensor far larger than the caches).

    .venv/bin/python benchmarks/quantize_speed.py --threads 2
    .venv/bin/python benchmarks/quantize_speed.py --shapes llama-197m --compile

`--llama-cpp-python PY --gguf DIR` also times llama.cpp on the same weights (bf16, q8_0 and
q4_0 GGUF files in DIR, made as docs/performance.md describes), through `PY`, a Python that has
llama-cpp-python, in a child process with the same threads. Timings on shared cores are noisy:
compare the ratios, which come from the same run.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path

import torch
from decode_shapes import SHAPES, build, decode_rate, measured_bandwidth

from lmstack.compress import quantize_
from lmstack.compress.checkpoint import resident_bytes
from lmstack.infer import LLM, SamplingParams
from lmstack.infer.compiled import CompileCache

FORMATS = ("bf16", "int8", "int4")
LLAMA_CPP_FORMATS = {"bf16": "bf16", "int8": "q8_0", "int4": "q4_0"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["llama-150m", "llama-197m"], choices=list(SHAPES))
    p.add_argument("--tokens", type=int, default=128, help="new tokens per decode run")
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per format (best is kept)")
    p.add_argument("--compile", action="store_true", help="engines with compile=True")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--llama-cpp-python", help="a Python with llama-cpp-python installed")
    p.add_argument("--gguf", type=Path, help="dir with <shape>-{bf16,q8_0,q4_0}.gguf")
    return p.parse_args(argv)


def quantized(model: torch.nn.Module, fmt: str) -> torch.nn.Module:
    if fmt == "bf16":
        return model
    q = copy.deepcopy(model)
    quantize_(q, fmt, group_size=128, progress=False)
    return q


def read_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step reads: everything but the embedding table (one row of it is read),
    unless the head shares it."""
    return resident_bytes(model) - (0 if model.config.tie_embeddings else resident_bytes(model.embed_tokens))


def prefill_rate(llm: LLM, length: int) -> float:
    prompt = [1 + i % 1000 for i in range(length)]
    out = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))[0]
    return length / (out.metrics.first_token_time - out.metrics.arrival_time)


def measure(models: dict[str, torch.nn.Module], args) -> dict[str, dict[str, float]]:
    max_len = max(args.prefill_len, 16 + args.tokens) + 16
    llms = {fmt: LLM(m, max_num_seqs=1, max_model_len=max_len, compile=args.compile,
                     compile_cache=CompileCache(), enable_prefix_caching=False)
            for fmt, m in models.items()}
    prompt = [list(range(1, 17))]
    for llm in llms.values():  # warm up: compiles, probes, the kernels' crossover
        decode_rate(llm, prompt, 16)
        prefill_rate(llm, args.prefill_len)
    rates = {fmt: {"decode": 0.0, "prefill": 0.0} for fmt in llms}
    for _ in range(args.rounds):
        for fmt, llm in llms.items():
            rates[fmt]["decode"] = max(rates[fmt]["decode"], decode_rate(llm, prompt, args.tokens))
            rates[fmt]["prefill"] = max(rates[fmt]["prefill"], prefill_rate(llm, args.prefill_len))
    return rates


LLAMA_CPP_SCRIPT = r"""
import json, sys, time
from llama_cpp import Llama
path, threads, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = Llama(path, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
prompt = list(range(1, 17))
best = 0.0
for _ in range(3):
    llm.reset()
    start, n = None, 0
    for tok in llm.generate(prompt, temp=0.0, top_k=1):
        n += 1
        if n == 1:
            start = time.perf_counter()
        if n == tokens:
            break
    best = max(best, (n - 1) / (time.perf_counter() - start))
print(json.dumps(best))
"""


def llama_cpp_rate(python: str, gguf: Path, threads: int, tokens: int) -> float | None:
    if not gguf.exists():
        return None
    out = subprocess.run([python, "-c", LLAMA_CPP_SCRIPT, str(gguf), str(threads), str(tokens)],
                         capture_output=True, text=True)
    if out.returncode != 0:  # e.g. a build whose instructions this CPU's kernel does not enable
        print(f"  llama.cpp on {gguf.name} exited with {out.returncode}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    bandwidth = measured_bandwidth()
    print(f"{args.threads} threads, compile={args.compile}, bandwidth {bandwidth / 1e9:.1f} GB/s "
          f"measured; decode: 1 request, {args.tokens} new tokens; prefill: one "
          f"{args.prefill_len}-token prompt; ratios against bf16 in the same run")
    print("\n| shape | format | weight MB (x bf16) | bound tok/s | decode tok/s (x bf16) "
          "| of bound | prefill tok/s (x bf16) | llama.cpp decode tok/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for shape in args.shapes:
        base = build(shape, torch.bfloat16)
        models = {fmt: quantized(base, fmt) for fmt in FORMATS}
        rates = measure(models, args)
        held = {fmt: resident_bytes(m) for fmt, m in models.items()}
        for fmt, m in models.items():
            bound = bandwidth / read_bytes(m)
            decode, prefill = rates[fmt]["decode"], rates[fmt]["prefill"]
            peer = None
            if args.llama_cpp_python and args.gguf:
                gguf = args.gguf / f"{shape}-{LLAMA_CPP_FORMATS[fmt]}.gguf"
                peer = llama_cpp_rate(args.llama_cpp_python, gguf, args.threads, args.tokens)
            print(f"| {shape} | {fmt} | {held[fmt] / 1e6:,.0f} ({held[fmt] / held['bf16']:.2f}) "
                  f"| {bound:,.0f} | {decode:,.1f} ({decode / rates['bf16']['decode']:.2f}) "
                  f"| {decode / bound:.0%} | {prefill:,.0f} ({prefill / rates['bf16']['prefill']:.2f}) "
                  f"| {'-' if peer is None else f'{peer:,.1f}'} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
