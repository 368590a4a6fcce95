"""`lmstack demo`: the main job. Prepare the built-in corpus (the Python standard library's own
source), pretrain a small Llama-style model for a fixed time budget, compare its validation
perplexity with the unigram baseline, and print a few samples.

    lmstack demo                           # ~5 minutes of training on CPU; bigger model and budget on GPU
    lmstack demo --max-time-s 60 --preset tiny-llama --num-samples 2
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from lmstack.cli import flags
from lmstack.cli.pretrain import ModelArgs, PretrainArgs, pretrain
from lmstack.data import TokenStream, load_meta, prepare
from lmstack.model import generate, load_hf
from lmstack.model.tokenizer import Tokenizer
from lmstack.train import CheckpointConfig, EvalConfig, OptimConfig, ScheduleConfig, TrainConfig

# (preset, training seconds, batch size, sequence length): one place for the demo's defaults
CPU_DEFAULTS = ("llama-10m", 300, 8, 256)
GPU_DEFAULTS = ("llama-50m", 600, 32, 512)
PROMPTS = ["def ", "import os\n", "class ", "    for i in range("]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = flags.make_parser("lmstack demo", __doc__)
    p.add_argument("--data", default="data/stdlib", help="where the prepared corpus goes")
    p.add_argument("--out", default=None, help="run directory (default: runs/demo-<time>)")
    p.add_argument("--preset", default=None,
                   help="model preset (default: llama-10m on CPU, llama-50m on GPU)")
    p.add_argument("--max-time-s", type=float, default=None,
                   help="seconds of training (default: 300 on CPU, 600 on GPU)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sequences per batch (default: 8 on CPU, 32 on GPU)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (default: 256 on CPU, 512 on GPU)")
    p.add_argument("--vocab-size", type=int, default=8192, help="size of the trained BPE tokenizer")
    p.add_argument("--max-mb", type=float, default=None,
                   help="use a random subset of the corpus of at most this many MB (default: all)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--num-samples", type=int, default=len(PROMPTS),
                   help="samples printed at the end, one per built-in prompt")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    preset, budget, batch, seq = GPU_DEFAULTS if torch.cuda.is_available() else CPU_DEFAULTS
    out = Path(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")

    print(f"== 1. prepare the built-in corpus into {args.data}")
    prepare(None, args.data, vocab_size=args.vocab_size, max_mb=args.max_mb)
    baseline = unigram_baseline(args.data)

    print(f"== 2. pretrain {args.preset or preset} for {args.max_time_s or budget:.0f} s")
    train = TrainConfig(max_time_s=args.max_time_s or budget, max_steps=None,
                        batch_size=args.batch_size or batch, seq_len=args.seq_len or seq,
                        optim=OptimConfig(lr=args.lr), schedule=ScheduleConfig(warmup_steps=30),
                        eval=EvalConfig(every=100, batches=8), checkpoint=CheckpointConfig(every=200))
    result = pretrain(PretrainArgs(data=args.data, out=str(out),
                                   model=ModelArgs(preset=args.preset or preset), train=train))

    print("== 3. results")
    report(result.val_loss, baseline)
    print_samples(out, args.num_samples)
    return 0


def unigram_baseline(data_dir: str) -> float:
    """Cross-entropy (nats/token) on the val split of a model that knows only the train split's
    token frequencies (add-one smoothed): what a model must beat to have learnt any context."""
    vocab = load_meta(data_dir)["vocab_size"]
    train = TokenStream(data_dir, "train", batch_size=1, seq_len=1).all_tokens()
    val = TokenStream(data_dir, "val", batch_size=1, seq_len=1).all_tokens()
    counts = np.bincount(train, minlength=vocab) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val].mean())


def report(val_loss: float | None, baseline: float) -> None:
    print(f"unigram baseline: {baseline:.3f} nats/token, perplexity {math.exp(baseline):.1f}")
    if val_loss is None:
        print("model: no validation loss (the val split is too small)")
        return
    print(f"model:            {val_loss:.3f} nats/token, perplexity {math.exp(val_loss):.1f}  "
          f"(unigram perplexity / model perplexity = {math.exp(baseline - val_loss):.2f})")


def print_samples(out: Path, n: int) -> None:
    model = load_hf(out / "hf").eval()
    tokenizer = Tokenizer.load(out / "tokenizer")
    for i, prompt in enumerate(PROMPTS[:n]):
        ids = generate(model, [tokenizer.encode(prompt)], max_new_tokens=80, temperature=0.8,
                       top_k=50, seed=i, stop_tokens=[tokenizer.eos_id])[0]
        print(f"--- sample {i + 1} ---\n{prompt}{tokenizer.decode(ids, skip_special_tokens=True)}")
