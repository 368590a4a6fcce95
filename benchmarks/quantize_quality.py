"""Validation perplexity of trained models after quantization: bf16 against int8, int4 RTN and
GPTQ int4 (group 128), on the same validation windows.

Each RUN is a `lmstack pretrain` / `lmstack demo` run directory (its hf/ export is loaded in
bf16); DATA is the prepared corpus it was trained on. GPTQ calibrates on windows of the train
split, never the validation split.

    .venv/bin/lmstack demo --out runs/q-demo
    .venv/bin/lmstack pretrain --data data/stdlib --model.preset llama-50m --train.max-time-s 600 \
        --train.max-steps null --train.batch-size 8 --out runs/q-50m
    .venv/bin/python benchmarks/quantize_quality.py --data data/stdlib --runs runs/q-demo runs/q-50m

Goals (issue 14): int8 within 1% of bf16, int4 RTN g128 within 5%, GPTQ closer to bf16 than RTN.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from lmstack.compress import describe, quantize_
from lmstack.data import TokenStream
from lmstack.model import load_hf
from lmstack.train.loop import evaluate, perplexity

METHODS = ("int8", "int4", "gptq-int4")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the prepared corpus the runs trained on")
    p.add_argument("--runs", nargs="+", required=True, type=Path, help="run directories (with hf/)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--val-batches", type=int, default=32, help="validation windows of --seq-len")
    p.add_argument("--calibration-batches", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--embedding", choices=["int8", "int4", "float"],
                   help="the token table's format (int4 is for the int4 methods; default: each "
                        "method's bits, as `lmstack quantize` does)")
    return p.parse_args(argv)


def windows(data: str, split: str, count: int, seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    stream = TokenStream(data, split, batch_size=1, seq_len=seq_len, seed=0)
    return [stream.next_batch() for _ in range(count)]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    val = windows(args.data, "val", args.val_batches, args.seq_len)
    calibration = [x for x, _ in windows(args.data, "train", args.calibration_batches, args.seq_len)]
    tokens = sum(int(y.numel()) for _, y in val)
    print(f"validation: {len(val)} windows x {args.seq_len} tokens ({tokens:,}); GPTQ calibration: "
          f"{len(calibration)} train windows; group size {args.group_size}")
    print("\n| model | params | bf16 ppl | int8 ppl (vs bf16) | int4 RTN ppl | GPTQ int4 ppl |")
    print("|---|---:|---:|---:|---:|---:|")
    for run in args.runs:
        base = load_hf(run / "hf", dtype=torch.bfloat16).eval()
        ppl = {"bf16": perplexity(evaluate(base, val))}
        for method in METHODS:
            model = copy.deepcopy(base)
            start = time.perf_counter()
            kept = quantize_(model, method, group_size=args.group_size,
                             calibration=calibration if method == "gptq-int4" else None,
                             progress=False, embedding=_table(args.embedding, method))
            seconds = time.perf_counter() - start
            ppl[method] = perplexity(evaluate(model, val))
            names = sorted({name.rsplit(".", 1)[-1] for name in kept})
            table = describe(model)["embedding"]
            print(f"  {run.name} {method}: quantized in {seconds:.1f} s; token table {table}; kept in "
                  f"bf16: {len(kept)} linears {names} (the group size does not divide their inputs)",
                  flush=True)
        cells = " | ".join(f"{ppl[m]:.3f} ({ppl[m] / ppl['bf16'] - 1:+.2%})" for m in METHODS)
        params = sum(p.numel() for p in base.parameters())
        print(f"| {run.name} | {params / 1e6:.1f}M | {ppl['bf16']:.3f} | {cells} |", flush=True)


def _table(embedding: str | None, method: str) -> str | None:
    """--embedding for this method: an int4 table goes with the int4 methods only (int8 keeps int8)."""
    return "int8" if embedding == "int4" and method == "int8" else embedding


if __name__ == "__main__":
    main()
