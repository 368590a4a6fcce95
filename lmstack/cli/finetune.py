"""`lmstack finetune`: adapt a model to chat data (full, LoRA or QLoRA) through the training loop.

    lmstack finetune --base runs/demo/hf --data chat.jsonl --method lora --lora.r 16 --out runs/ft
    lmstack finetune --base runs/demo --data chat.jsonl --val-data val.jsonl --method qlora --out runs/ftq
    lmstack finetune --base path/to/hf --data chat.jsonl --method full --train.optim.lr 2e-5 --out runs/ftf
    lmstack finetune --base runs/demo/hf --data chat.jsonl --out runs/ft --resume
    torchrun --nproc-per-node 2 -m lmstack finetune --base runs/demo/hf --data chat.jsonl \
        --method qlora --out runs/ft2 --train.parallel.dp-shard 2      (docs/distributed.md)

BASE is an HF model directory, an lmstack checkpoint or a run directory (its newest checkpoint).
DATA is .jsonl, one {"messages": [{"role": ..., "content": ...}, ...]} per line, rendered with
the tokenizer's chat template; only assistant tokens are targets (lmstack.data.sft has the rules
for malformed records, truncation and packing). LoRA and QLoRA freeze the base and train
adapters on --lora.targets; QLoRA stores the base's linear weights as NF4 first.

OUT receives checkpoints/ (LoRA and QLoRA: the adapters only, naming BASE), metrics.jsonl,
tensorboard/, loss_curve.png, run_config.json, adapter/ (PEFT format; LoRA and QLoRA) and hf/
(the fine-tuned model, adapters merged, with the tokenizer).

Under torchrun every rank loads BASE whole, adapts it, and FSDP2 (--train.parallel.dp-shard) or
DDP (--train.parallel.dp-replicate) spreads it over the ranks; each data-parallel rank reads its
rows of every global batch, checkpoints are sharded, and rank 0 alone prints and writes the run
files, the adapter and hf/. Tensor and pipeline parallelism are refused for fine-tuning.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch.distributed.device_mesh import DeviceMesh

from lmstack.cli import flags
from lmstack.cli.pretrain import HELP, resume_point
from lmstack.cli.sample import find_checkpoint, find_tokenizer
from lmstack.data.sft import SFTBatches, fixed_batches, load_sft
from lmstack.finetune import (
    LoRAConfig,
    apply_lora,
    dequantize_nf4,
    lora_state_dict,
    quantize_nf4,
    remove_lora,
    require_nf4,
    save_adapter,
    use_adapter,
)
from lmstack.infer.loading import load_model
from lmstack.model import ModelConfig, Transformer
from lmstack.model.hf import save_hf
from lmstack.model.tokenizer import Tokenizer
from lmstack.train import (
    TrainConfig,
    TrainResult,
    distributed,
    resolve_device,
    train,
)
from lmstack.train.checkpoint import seed_everything, validate_checkpoint
from lmstack.train.dcp import export_hf
from lmstack.train.distributed import RankSlice
from lmstack.train.loop import check_seq_len


@dataclass
class FinetuneArgs:
    base: str
    """The model to start from: an HF model directory, a checkpoint or a run directory."""
    data: str
    """Chat records, .jsonl with a "messages" list per line."""
    out: str = "runs/finetune"
    """Run directory for checkpoints, metrics, plots, the adapter and the final HF export."""
    method: Literal["full", "lora", "qlora"] = "lora"
    """full: train every weight; lora: adapters over the frozen base; qlora: adapters over an
    NF4 base."""
    val_data: str | None = None
    """Held-out chat records for the validation loss (assistant tokens only); none: no evaluation."""
    tokenizer: str | None = None
    """Tokenizer directory; none: BASE's tokenizer.json, else its run's tokenizer/."""
    strict: bool = False
    """Stop at the first malformed record instead of skipping and counting it."""
    pack: bool = True
    """Pack several conversations per row (attention stays inside each one)."""
    resume: bool = False
    """Continue from the newest valid checkpoint in OUT/checkpoints."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# fine-tuning's own defaults for the loop's settings (a config of the loop, not a second one)
DEFAULTS = {"train.max_steps": 500, "train.seq_len": 256, "train.batch_size": 8,
            "train.optim.weight_decay": 0.0, "train.schedule.warmup_steps": 20,
            "train.eval.every": 100, "train.checkpoint.every": 200}


def main(argv: list[str]) -> int:
    try:
        finetune(parse_args(argv))
    except (ValueError, FileNotFoundError) as e:
        print(f"lmstack finetune: error: {distributed.rank_prefix()}{e}", file=sys.stderr)
        return 2
    return 0


def parse_args(argv: list[str]) -> FinetuneArgs:
    parser = flags.make_parser("lmstack finetune", __doc__,
                               usage="%(prog)s --base BASE --data DATA [--method METHOD] [options]")
    flags.add_fields(parser, FinetuneArgs, helps=HELP, defaults=DEFAULTS)
    return flags.build(FinetuneArgs, parser.parse_args(argv))


# ----------------------------------------------------------------------------- the run

def finetune(args: FinetuneArgs) -> TrainResult:
    """Base -> (adapters) -> SFT batches -> train loop -> adapter + merged HF export. Under
    torchrun every rank runs this; rank 0 alone writes the run files and the export, and prints."""
    cfg, out = args.train, Path(args.out)
    if args.method == "qlora":
        require_nf4()
    base_dir = base_directory(args.base)
    model = load_model(base_dir, "cpu", torch.float32)  # whole, on every rank
    check_seq_len(model, cfg.seq_len)
    # before any collective, so every rank fails alike (torchrun then stops the others)
    check_layout(model.config, cfg, distributed.launched_world_size())
    with distributed.launch(resolve_device(cfg.device), cfg.parallel) as (device, mesh):
        main = distributed.rank() == 0
        resume_from = resume_point(out, args.resume, main)
        tokenizer = load_tokenizer(args.tokenizer, base_dir)
        seed_everything(cfg.seed)  # the adapters' init, the same on every rank
        adapt(model.to(device), args.method, args.lora)
        base = {"path": str(base_dir.resolve()), "method": args.method,
                "lora": dataclasses.asdict(args.lora) if args.method != "full" else None}
        if resume_from is not None:
            check_same_base(resume_from, base)
        batches, val = sft_data(args, tokenizer, mesh)
        if main:
            _write_run_files(out, args, tokenizer)
            _print_sizes(model, args.method, out, mesh)
        if mesh is not None:
            distributed.parallelize(model, cfg, mesh)
        result = train(model, batches, cfg, out_dir=out, val_batches=val,
                       resume_from=resume_from, base=base, mesh=mesh)
        export(model, args, base_dir, tokenizer, out, mesh, result.checkpoint or resume_from)
        if main:
            _print_summary(result, out, args.method)
    return result


def check_layout(config: ModelConfig, cfg: TrainConfig, world_size: int) -> None:
    """A fine-tune splits over data-parallel ranks only; refuse the rest before any collective."""
    p = cfg.parallel
    if p.tp > 1 or p.pp > 1:
        raise ValueError(
            f"--train.parallel.tp={p.tp} / pp={p.pp}: lmstack finetune spreads the base over "
            "data-parallel ranks only (FSDP2 or DDP); TP's styles split nn.Linear weights, not "
            "LoRA / NF4 linears, and pipeline stages take no packed rows. Set tp and pp to 1 and "
            "shard with --train.parallel.dp-shard")
    distributed.check_parallel(config, cfg, world_size)


def base_directory(path: str | Path) -> Path:
    """An HF or checkpoint directory as given (config.json), else a run's newest checkpoint."""
    path = Path(path)
    return path if (path / "config.json").is_file() else find_checkpoint(path)


def load_tokenizer(explicit: str | None, base_dir: Path) -> Tokenizer:
    if explicit is not None:
        return Tokenizer.load(explicit)
    if (base_dir / "tokenizer.json").is_file():
        return Tokenizer.load(base_dir)
    return Tokenizer.load(find_tokenizer(base_dir))


def adapt(model: torch.nn.Module, method: str, lora: LoRAConfig) -> None:
    """full: nothing to do; lora: adapters; qlora: adapters, then the linears' weights -> NF4."""
    if method == "full":
        return
    apply_lora(model, lora.targets, lora.r, lora.alpha, lora.dropout, lora.rslora)
    if method == "qlora":
        quantize_nf4(model, double_quant=lora.double_quant)


def check_same_base(checkpoint: Path, base: dict) -> None:
    saved = validate_checkpoint(checkpoint).get("base")
    if saved is not None and saved != base:
        raise ValueError(f"{checkpoint} was trained from {saved}, not {base}; resume with the "
                         "--base, --method and --lora settings the run started with")


def sft_data(args: FinetuneArgs, tokenizer: Tokenizer,
             mesh: DeviceMesh | None = None) -> tuple[SFTBatches | RankSlice, list | None]:
    """The training batches (under a mesh this rank's rows of each global batch) and the
    validation batches (whole on every rank: evaluate sums over ranks and divides alike)."""
    cfg, main = args.train, distributed.rank() == 0
    examples, stats = load_sft(args.data, tokenizer, cfg.seq_len, args.strict)
    if main:
        print(stats.summary())
    pad = tokenizer.pad_id or 0
    batches = SFTBatches(examples, cfg.batch_size, cfg.seq_len, args.pack, cfg.seed, pad)
    if mesh is not None:
        batches = RankSlice(batches, distributed.dp_rank(mesh), distributed.dp_size(mesh))
    if args.val_data is None:
        return batches, None
    held_out, stats = load_sft(args.val_data, tokenizer, cfg.seq_len, args.strict)
    if main:
        print(stats.summary())
    return batches, fixed_batches(held_out, cfg.batch_size, cfg.seq_len, args.pack, pad)[:cfg.eval.batches]


def export(model: torch.nn.Module, args: FinetuneArgs, base_dir: Path, tokenizer: Tokenizer,
           out: Path, mesh: DeviceMesh | None = None, checkpoint: Path | None = None) -> None:
    """OUT/adapter (PEFT) for LoRA and QLoRA; OUT/hf, the merged model, for every method.

    Under a mesh the modules hold shards: every rank gathers the adapters (a collective), then
    rank 0 writes the adapter and rebuilds the merged model from BASE and that adapter, as
    `lmstack merge-lora` does; a full fine-tune's export is read from its final sharded
    checkpoint, as `lmstack pretrain` does."""
    adapters = None if args.method == "full" else distributed.full_tensors(lora_state_dict(model))
    if distributed.rank() != 0:
        return
    if adapters is not None:
        save_adapter(model, out / "adapter", base_name_or_path=str(base_dir),
                     quantized_base="nf4" if args.method == "qlora" else None, state=adapters,
                     double_quant=args.lora.double_quant)
    if mesh is None:
        remove_lora(model)  # merged (into the dequantized weights, for QLoRA)
        dequantize_nf4(model)
        save_hf(model, out / "hf")
    elif adapters is None:
        export_hf(checkpoint, out / "hf")
    else:
        merged = use_adapter(load_model(base_dir, "cpu", torch.float32), out / "adapter")
        save_hf(merged, out / "hf")
    tokenizer.save(out / "hf")


def _write_run_files(out: Path, args: FinetuneArgs, tokenizer: Tokenizer) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "run_config.json").write_text(json.dumps(dataclasses.asdict(args), indent=2) + "\n")
    tokenizer.save(out / "tokenizer")


def _print_sizes(model: Transformer, method: str, out: Path, mesh: DeviceMesh | None) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ranks = f" x {mesh.size()} ranks" if mesh is not None else ""
    print(f"{method}: {trainable:,} trainable of {model.num_params():,} parameters{ranks}; out: {out}")


def _print_summary(result: TrainResult, out: Path, method: str) -> None:
    loss = f"{result.losses[-1]:.4f}" if result.losses else "n/a (no steps run)"
    print(f"step {result.step}: train loss {loss}", end="")
    if result.val_loss is not None:
        print(f", val loss {result.val_loss:.4f} (assistant tokens)", end="")
    print(f"\ncheckpoint: {result.checkpoint}")
    if method != "full":
        print(f"adapter:    {out / 'adapter'} (PEFT format)")
    print(f"HF model:   {out / 'hf'} (adapters merged)")
