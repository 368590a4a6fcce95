"""`lmstack distill`: train a student to match a frozen teacher on shards from `lmstack prepare`.

    lmstack distill --teacher runs/big/hf --data data/stdlib --model.preset llama-10m --out runs/student
    lmstack distill --teacher runs/big --data data/stdlib --distill.temperature 4 --distill.alpha 0.9 --out runs/t4
    lmstack distill --teacher runs/big/hf --data data/stdlib --out runs/student --resume
    torchrun --nproc-per-node 2 -m lmstack distill --teacher runs/big/hf --data data/stdlib \\
        --out runs/student --train.parallel.dp-shard 2                   (docs/distillation.md)

TEACHER is an HF model directory, an lmstack checkpoint or a run directory (its newest
checkpoint) whose vocabulary is the data's tokenizer. The student is built as `lmstack pretrain`
builds its model (--model.preset, vocabulary from the data) and trained by the same loop on the
loss of lmstack.compress.distill; the train loss logged is that loss, the validation loss plain
cross-entropy on the val split, comparable to a pretraining run's. Under torchrun every rank
holds the whole teacher (frozen, never sharded) and the student is parallelised as pretrain's
(--train.parallel.dp-replicate / dp-shard / tp); pipeline stages (pp > 1) are refused.

OUT receives what `lmstack pretrain` writes: checkpoints/, metrics.jsonl, tensorboard/,
loss_curve.png, tokenizer/, run_config.json (naming the teacher) and, at the end, hf/.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmstack.cli import flags
from lmstack.cli.finetune import base_directory
from lmstack.cli.pretrain import HELP, ModelArgs, model_config, train_on_shards
from lmstack.cli.sample import find_tokenizer
from lmstack.compress.distill import DistillConfig, check_same_vocab, distillation_loss
from lmstack.data import load_meta
from lmstack.infer.loading import load_model
from lmstack.model import Transformer
from lmstack.model.tokenizer import Tokenizer
from lmstack.train import TrainConfig, TrainResult, cross_entropy_sum, distributed, resolve_device
from lmstack.train.loop import check_pipeline_loss, check_seq_len


@dataclass
class DistillArgs:
    teacher: str
    """The frozen teacher: an HF model directory, a checkpoint or a run directory."""
    data: str
    """A directory written by `lmstack prepare` with the teacher's tokenizer."""
    out: str = "runs/distill"
    """Run directory for checkpoints, metrics, plots and the student's final HF export."""
    resume: bool = False
    """Continue from the newest valid checkpoint in OUT/checkpoints (start fresh if there is none)."""
    model: ModelArgs = field(default_factory=ModelArgs)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def main(argv: list[str]) -> int:
    try:
        distill(parse_args(argv))
    except (ValueError, FileNotFoundError) as e:
        print(f"lmstack distill: error: {distributed.rank_prefix()}{e}", file=sys.stderr)
        return 2
    return 0


def parse_args(argv: list[str]) -> DistillArgs:
    parser = flags.make_parser("lmstack distill", __doc__,
                               usage="%(prog)s --teacher TEACHER --data DATA [options]")
    flags.add_fields(parser, DistillArgs, helps=HELP)
    return flags.build(DistillArgs, parser.parse_args(argv))


def distill(args: DistillArgs) -> TrainResult:
    """Teacher + data -> student -> the pretraining run with the distillation loss. Every check
    runs before any collective, so under torchrun every rank fails alike."""
    cfg = args.train
    meta = load_meta(args.data)
    config = model_config(args.model, meta["vocab_size"])
    teacher = load_teacher(args.teacher, args.data, meta["vocab_size"])
    check_seq_len(teacher, cfg.seq_len)
    loss_fn = distillation_loss(teacher, args.distill.temperature, args.distill.alpha)
    check_pipeline_loss(cfg, loss_fn)
    distributed.check_parallel(config, cfg, distributed.launched_world_size())
    with distributed.launch(resolve_device(cfg.device), cfg.parallel) as (device, mesh):
        teacher.to(device)  # whole on every rank: it only runs forward, under no_grad
        if distributed.rank() == 0:
            print(f"teacher: {teacher.num_params():,} parameters from {args.teacher}; "
                  f"T={args.distill.temperature}, alpha={args.distill.alpha} "
                  "(train loss: distillation; val loss: cross-entropy)")
        return train_on_shards(args, config, meta, device, mesh, loss_fn=loss_fn,
                               val_loss_fn=cross_entropy_sum)


def load_teacher(path: str, data: str, vocab_size: int) -> Transformer:
    """The teacher in fp32 on the CPU; refuses one whose vocabulary is not the data's."""
    if not Path(path).exists():
        raise FileNotFoundError(f"--teacher {path}: no such directory; pass an HF model directory, "
                                "an lmstack checkpoint or a run directory")
    source = base_directory(path)
    teacher = load_model(source, "cpu", torch.float32)
    try:
        check_same_vocab(vocab_size, teacher.config.vocab_size)
    except ValueError as e:
        raise ValueError(f"--teacher {path}: {e} (--data {data} has {vocab_size})") from e
    check_same_tokenizer(source, Path(data) / "tokenizer", path)
    return teacher


def check_same_tokenizer(teacher_dir: Path, data_tokenizer: Path, flag_value: str) -> None:
    """Same width is not the same vocabulary: compare the tokenizers when the teacher has one."""
    try:
        found = find_tokenizer(teacher_dir)
    except FileNotFoundError:
        print(f"warning: --teacher {flag_value} has no tokenizer; only its vocabulary size was checked")
        return
    if Tokenizer.load(found).fingerprint() != Tokenizer.load(data_tokenizer).fingerprint():
        raise ValueError(f"--teacher {flag_value}: its tokenizer ({found}) is not the one --data was "
                         f"prepared with ({data_tokenizer}); prepare the data with "
                         f"`lmstack prepare --tokenizer {found}`")
