"""A synthetic chat task that shows fine-tuning learn: small sums as user/assistant turns.

    python benchmarks/finetune_task.py --threads 1             # LoRA, then QLoRA, demo-sized base
    python benchmarks/finetune_task.py --preset tiny-llama --high 9 --pretrain-steps 300 --lr 1e-2 --max-steps 150 --threads 1
    python benchmarks/finetune_task.py --base runs/demo/hf     # over another HF model + tokenizer

On CPU cores shared with other processes, --threads 1 runs faster than several spinning threads.

The user asks "7+18=", the assistant answers "25" (a, b in 0..--high). Held-out conversations use
(a, b) pairs the fine-tuning data lacks. Held-out exact match is measured by greedy decoding up to the end-of-turn
token, before and after fine-tuning through `lmstack.train`'s loop with packed SFT batches
(assistant tokens only in the loss). QLoRA also reports the bytes of its NF4 base weights against
the same weights in bf16.

Without --base the base is the demo's model shape (llama-10m; --preset for another) over a
tokenizer trained on the task's text, pretrained for --pretrain-steps steps on plain-text sums
("7+8=15" lines, every pair, no chat markup): it learns the sums but not the chat format, so
before fine-tuning it does not answer a chat prompt. Fine-tuning teaches the format (and the stop at
the end of turn) from the training pairs' conversations. Prints one table row per method, with the
fine-tuning's CPU time (process time: every thread's, so --threads 1 makes it the core-seconds).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch

from lmstack.data.sft import Example, SFTBatches, load_sft
from lmstack.finetune import apply_lora, base_weight_bytes, quantize_nf4
from lmstack.model import ModelConfig, Transformer, generate, load_hf, save_hf
from lmstack.model.tokenizer import Tokenizer
from lmstack.train import (
    CheckpointConfig,
    EvalConfig,
    LoggingConfig,
    OptimConfig,
    PrecisionConfig,
    ScheduleConfig,
    TrainConfig,
    train,
)


def addition_records(pairs: list[tuple[int, int]]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"{a}+{b}="},
                          {"role": "assistant", "content": str(a + b)}]} for a, b in pairs]


def split_pairs(n_test: int, seed: int, high: int = 9) -> tuple[list, list]:
    """All (a, b) with 0 <= a, b <= high, shuffled; the first n_test are held out."""
    pairs = [(a, b) for a in range(high + 1) for b in range(high + 1)]
    random.Random(seed).shuffle(pairs)
    return pairs[n_test:], pairs[:n_test]


def write_jsonl(records: list[dict], path: Path) -> Path:
    import json
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def task_tokenizer(pairs: list[tuple[int, int]]) -> Tokenizer:
    """A small byte-level BPE (ChatML template) trained on the task's text, chats and lines."""
    tok = Tokenizer.train([], vocab_size=300)
    texts = [tok.apply_chat_template(r["messages"]) for r in addition_records(pairs)]
    return Tokenizer.train(texts + plain_lines(pairs), vocab_size=300)


def plain_lines(pairs: list[tuple[int, int]]) -> list[str]:
    return [f"{a}+{b}={a + b}\n" for a, b in pairs]


@torch.no_grad()
def plain_exact_match(model: torch.nn.Module, tokenizer: Tokenizer,
                      pairs: list[tuple[int, int]]) -> float:
    """The base's own skill: greedy "a+b=" continuations up to the newline."""
    was_training = model.training
    model.eval()
    prompts = [tokenizer.encode(f"{a}+{b}=") for a, b in pairs]
    outs = generate(model, prompts, max_new_tokens=4)
    right = sum(tokenizer.decode(out).split("\n")[0] == str(a + b)
                for (a, b), out in zip(pairs, outs, strict=True))
    model.train(was_training)
    return right / len(pairs)


@torch.no_grad()
def exact_match(model: torch.nn.Module, tokenizer: Tokenizer, records: list[dict],
                batch_size: int = 64) -> float:
    """Fraction of held-out records whose greedy answer, up to the end of turn, is exact."""
    end = tokenizer.token_to_id("<|im_end|>")
    was_training = model.training
    model.eval()
    right = 0
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        prompts = [tokenizer.apply_chat_template(r["messages"][:-1], add_generation_prompt=True,
                                                 tokenize=True) for r in chunk]
        outs = generate(model, prompts, max_new_tokens=6, stop_tokens=[end])
        for r, out in zip(chunk, outs, strict=True):
            answer = tokenizer.decode([t for t in out if t != end]).strip()
            right += answer == r["messages"][-1]["content"]
    model.train(was_training)
    return right / len(records)


# Steps that reached the task's bar for every seed tried, inside 5 CPU minutes (docs/finetuning.md);
# a QLoRA step costs more (NF4 products), and fewer of them sufficed.
DEFAULT_STEPS = {"lora": 1400, "qlora": 900}


def new_base(tokenizer: Tokenizer, preset: str, seed: int) -> Transformer:
    config = ModelConfig.from_preset(preset, vocab_size=tokenizer.vocab_size)
    return Transformer.build(config, seed=seed)


def train_config(seconds: float, max_steps: int | None, lr: float, batch_size: int, seq_len: int,
                 seed: int) -> TrainConfig:
    return TrainConfig(batch_size=batch_size, seq_len=seq_len, max_steps=max_steps,
                       max_time_s=seconds, seed=seed, device="cpu",
                       optim=OptimConfig(lr=lr, weight_decay=0.0),
                       schedule=ScheduleConfig(kind="cosine", warmup_steps=10),
                       precision=PrecisionConfig("fp32"), eval=EvalConfig(every=0),
                       checkpoint=CheckpointConfig(every=0),
                       logging=LoggingConfig(progress_bar=False, tensorboard=False, plot=False))


def finetune(model: Transformer, tokenizer: Tokenizer, data: Path, method: str, args) -> dict:
    """Adapt the model in place with LoRA or QLoRA; return the measurements."""
    apply_lora(model, "all-linear", r=args.r, alpha=args.alpha, dropout=0.0)
    if method == "qlora":
        quantize_nf4(model)  # every linear's weight -> NF4; adapters stay fp32
    examples, _ = load_sft(data, tokenizer, args.seq_len)
    batches = SFTBatches(examples, args.batch_size, args.seq_len, seed=args.seed,
                         pad_id=tokenizer.pad_id or 0)
    steps = args.max_steps or DEFAULT_STEPS[method]
    cfg = train_config(args.max_time_s, steps, args.lr, args.batch_size, args.seq_len,
                       args.seed)  # fp32: NF4 bases pick their own product dtype
    start, cpu = time.perf_counter(), time.process_time()
    result = train(model, batches, cfg)
    out = {"steps": result.step, "minutes": (time.perf_counter() - start) / 60,
           "cpu_minutes": (time.process_time() - cpu) / 60, "loss": result.losses[-1]}
    if method == "qlora":
        nf4, bf16 = base_weight_bytes(model)
        out["base_bytes_ratio"] = nf4 / bf16
    return out


def pretrain(model: Transformer, tokenizer: Tokenizer, pairs: list[tuple[int, int]], args) -> None:
    """Plain-text pretraining on every sum, one line a document (every token a target)."""
    ids = [tokenizer.encode(line) for line in plain_lines(pairs)]
    examples = [Example(t[:-1], t[1:]) for t in ids]
    batches = SFTBatches(examples, args.batch_size, args.seq_len, seed=args.seed + 1)
    steps = None if args.pretrain_s else args.pretrain_steps
    train(model, batches, train_config(args.pretrain_s, steps, args.lr, args.batch_size,
                                       args.seq_len, args.seed))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=None, help="an HF model directory with its tokenizer")
    p.add_argument("--methods", nargs="*", default=["lora", "qlora"], choices=["lora", "qlora"])
    p.add_argument("--max-time-s", type=float, default=300.0,
                   help="most fine-tuning seconds per method")
    p.add_argument("--max-steps", type=int, default=None,
                   help="fine-tuning steps per method (default: lora 1400, qlora 900, each "
                        "under 5 CPU minutes on an AVX2 core)")
    p.add_argument("--pretrain-steps", type=int, default=1500,
                   help="without --base: steps of plain-text pretraining of the base")
    p.add_argument("--pretrain-s", type=float, default=None,
                   help="seconds of pretraining instead of steps")
    p.add_argument("--preset", default="llama-10m", help="without --base: the base's shape")
    p.add_argument("--high", type=int, default=19, help="sums of a, b in 0..HIGH")
    p.add_argument("--n-test", type=int, default=40, help="held-out (a, b) pairs")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=3e-3, help="pretraining's and fine-tuning's")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="runs/finetune_task")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_pairs, test_pairs = split_pairs(args.n_test, args.seed, args.high)
    data = write_jsonl(addition_records(train_pairs), out / "train.jsonl")
    test = addition_records(test_pairs)
    if args.base:
        tokenizer, base_state = Tokenizer.load(args.base), None
    else:
        tokenizer = task_tokenizer(train_pairs + test_pairs)
        base = new_base(tokenizer, args.preset, args.seed)
        start = time.perf_counter()
        pretrain(base, tokenizer, train_pairs + test_pairs, args)
        print(f"pretrained the base on plain-text sums for {time.perf_counter() - start:.0f} s: "
              f"held-out sums right as plain text {plain_exact_match(base, tokenizer, test_pairs):.1%}",
              flush=True)
        base_state = {k: v.clone() for k, v in base.state_dict().items()}
        save_hf(base, out / "base")
        tokenizer.save(out / "base")
        print(f"saved the base to {out / 'base'} (fine-tune it again with --base {out / 'base'})",
              flush=True)
    rows = []
    for method in args.methods:
        model = load_hf(args.base) if args.base else new_base(tokenizer, args.preset, args.seed)
        if base_state is not None:
            model.load_state_dict(base_state)
        before = exact_match(model, tokenizer, test)
        measured = finetune(model, tokenizer, data, method, args)
        rows.append({"method": method, "before": before,
                     "after": exact_match(model, tokenizer, test), **measured})
        print(f"{method}: held-out exact match {before:.1%} -> {rows[-1]['after']:.1%}", flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    print("| method | held-out exact match before | after | steps | CPU minutes | minutes | base bytes / bf16 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r.get("base_bytes_ratio", math.nan)
        print(f"| {r['method']} | {r['before']:.1%} | {r['after']:.1%} | {r['steps']} | "
              f"{r['cpu_minutes']:.2f} | {r['minutes']:.2f} | {'-' if math.isnan(ratio) else f'{ratio:.3f}'} |")


if __name__ == "__main__":
    print_table(run(parse_args(sys.argv[1:])))
