"""`lmstack pretrain`: train a model from scratch on token shards written by `lmstack prepare`.

    lmstack pretrain --data data/stdlib --model.preset llama-10m --train.max-time-s 300 --out runs/demo
    lmstack pretrain --config run.toml --train.optim.lr 1e-3 --train.batch-size 32 --resume
    torchrun --nproc-per-node 4 -m lmstack pretrain --data data/stdlib --out runs/fsdp \
        --train.parallel.dp-shard 2 --train.parallel.tp 2       (docs/distributed.md)

Settings come from three places, each overriding the one before: the dataclass defaults
(lmstack.train.TrainConfig and ModelArgs below), a --config file (TOML or YAML, nested like the
flags and keyed by field name as in run_config.json: a [train.optim] table holds weight_decay),
then flags (--train.optim.weight-decay 0.05).

OUT receives checkpoints/, metrics.jsonl, tensorboard/, loss_curve.png, tokenizer/, run_config.json
and, at the end, hf/ (a Hugging Face model directory with the tokenizer).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch.distributed.device_mesh import DeviceMesh

from lmstack.cli import flags
from lmstack.data import TokenStream, load_meta
from lmstack.model import PRESETS, ModelConfig, Transformer
from lmstack.model.hf import save_hf
from lmstack.model.tokenizer import Tokenizer
from lmstack.train import (
    TrainConfig,
    TrainResult,
    distributed,
    latest_checkpoint,
    list_checkpoints,
    resolve_device,
    train,
)
from lmstack.train.dcp import export_hf
from lmstack.train.loop import CHECKPOINT_DIR, LossFn, check_seq_len, cross_entropy_sum


@dataclass
class ModelArgs:
    """Which model to build."""

    preset: str = "llama-10m"
    """A preset name (see `lmstack info`) or the path of a ModelConfig JSON file."""
    overrides: dict = field(default_factory=dict)
    """ModelConfig fields to change, e.g. '{"n_layers": 4}'; vocab_size always comes from the data."""


@dataclass
class PretrainArgs:
    data: str
    """A directory written by `lmstack prepare` (meta.json, shards, tokenizer/)."""
    out: str = "runs/pretrain"
    """Run directory for checkpoints, metrics, plots and the final HF export."""
    resume: bool = False
    """Continue from the newest valid checkpoint in OUT/checkpoints (start fresh if there is none)."""
    model: ModelArgs = field(default_factory=ModelArgs)
    train: TrainConfig = field(default_factory=TrainConfig)


# the one-line help of fields that have no docstring where they are defined
HELP = {
    "train.optim.beta1": "AdamW's decay rate for the running mean of gradients.",
    "train.optim.beta2": "AdamW's decay rate for the running mean of squared gradients.",
    "train.optim.eps": "Added to AdamW's denominator, against division by zero.",
}


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
        pretrain(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"lmstack pretrain: error: {distributed.rank_prefix()}{e}", file=sys.stderr)
        return 2
    return 0


# ----------------------------------------------------------------------------- settings

def parse_args(argv: list[str]) -> PretrainArgs:
    """Defaults < --config file < flags, whatever order they are given in."""
    config_path, argv = _pop_config(argv)
    defaults = _config_defaults(config_path) if config_path is not None else {}
    parser = flags.make_parser("lmstack pretrain", __doc__,
                               usage="%(prog)s --data DATA [--config FILE] [options]")
    parser.add_argument("--config", metavar="FILE",
                        help="a .toml / .yaml file of settings; flags override it")
    flags.add_fields(parser, PretrainArgs, helps=HELP, defaults=defaults)
    return flags.build(PretrainArgs, parser.parse_args(argv))


def _pop_config(argv: list[str]) -> tuple[str | None, list[str]]:
    rest, path = [], None
    args = iter(argv)
    for arg in args:
        if arg == "--config":
            path = next(args, None)
            if path is None:
                raise ValueError("--config needs a file path")
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return path, rest


def load_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    if path.suffix == ".toml":
        return tomllib.loads(path.read_text())
    if path.suffix in (".yaml", ".yml"):
        return yaml.safe_load(path.read_text()) or {}
    raise ValueError(f"--config {path}: use a .toml, .yaml or .yml file")


def _config_defaults(path: str) -> dict:
    """The file's settings by dest ("train.optim.lr"): they become the flags' defaults."""
    known = set(flags.dests(PretrainArgs))
    settings = _flatten(load_config_file(path), known)
    for key in settings:
        if key not in known:
            raise ValueError(f"--config {path}: unknown setting {key!r}; "
                             "`lmstack pretrain --help` lists them")
    return settings


def _flatten(d: dict, known: set[str], prefix: str = "") -> dict:
    """{"train": {"optim": {"lr": 1}}} -> {"train.optim.lr": 1}; dict-valued settings (such as
    model.overrides) stay whole."""
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name not in known:
            out.update(_flatten(value, known, f"{name}."))
        else:
            out[name] = value
    return out


def model_config(args: ModelArgs, vocab_size: int) -> ModelConfig:
    if args.preset in PRESETS:
        base = ModelConfig.from_preset(args.preset).to_dict()
    elif Path(args.preset).is_file():
        base = ModelConfig.load(args.preset).to_dict()
    else:
        raise ValueError(f"--model.preset={args.preset!r} is neither a preset "
                         f"({', '.join(PRESETS)}) nor a ModelConfig JSON file")
    return ModelConfig.from_dict({**base, **args.overrides, "vocab_size": vocab_size})


# ----------------------------------------------------------------------------- the run

def pretrain(args: PretrainArgs) -> TrainResult:
    """Data -> model -> train loop -> final checkpoint, HF export and summary. Under torchrun
    every rank runs this; rank 0 alone writes the run files and the export, and prints."""
    cfg = args.train
    meta = load_meta(args.data)
    config = model_config(args.model, meta["vocab_size"])
    # before any collective, so every rank fails alike (torchrun then stops the others)
    distributed.check_parallel(config, cfg, distributed.launched_world_size())
    with distributed.launch(resolve_device(cfg.device), cfg.parallel) as (device, mesh):
        return train_on_shards(args, config, meta, device, mesh)


def train_on_shards(args: PretrainArgs, config: ModelConfig, meta: dict, device: torch.device,
                    mesh: DeviceMesh | None, loss_fn: LossFn = cross_entropy_sum,
                    val_loss_fn: LossFn | None = None) -> TrainResult:
    """One rank's run inside a launch: build the model, stream the shards, train, export.
    args: PretrainArgs or any settings with its fields (lmstack distill's); distillation passes
    its loss_fn, and plain cross-entropy as val_loss_fn."""
    cfg, out = args.train, Path(args.out)
    main = distributed.rank() == 0
    resume_from = resume_point(out, args.resume, main)
    model = distributed.build_model(config, cfg, mesh, device)
    check_seq_len(model, cfg.seq_len)
    dp = distributed.dp_size(mesh)
    batches = TokenStream(args.data, "train", cfg.batch_size // dp, cfg.seq_len, seed=cfg.seed,
                          rank=distributed.dp_rank(mesh), world_size=dp)
    val_batches = _val_batches(args, meta)
    tokenizer = Tokenizer.load(Path(args.data) / "tokenizer")
    if main:
        _write_run_files(out, args, tokenizer)
        ranks = f" x {mesh.size()} ranks" if mesh is not None else ""
        print(f"model: {model.num_params():,} parameters on {device}{ranks}; out: {out}")
    result = train(model, batches, cfg, out_dir=out, val_batches=val_batches,
                   resume_from=resume_from, mesh=mesh, loss_fn=loss_fn, val_loss_fn=val_loss_fn)
    if main:
        _export(model, mesh, result, out, tokenizer)
        _print_summary(result, out)
    return result


def _export(model: Transformer, mesh, result: TrainResult, out: Path, tokenizer: Tokenizer) -> None:
    """out/hf: from the model itself, or under a mesh from the final sharded checkpoint (rank 0
    assembles the whole model there)."""
    if mesh is None:
        save_hf(model, out / "hf")
    else:
        export_hf(result.checkpoint, out / "hf")
    tokenizer.save(out / "hf")


def resume_point(out: Path, resume: bool, main: bool = True) -> Path | None:
    """The checkpoint a run in OUT continues from (None: a fresh run); refuses to overwrite one."""
    ckpts = out / CHECKPOINT_DIR
    if not resume:
        if list_checkpoints(ckpts):
            raise ValueError(f"{out} already holds checkpoints; pass --resume to continue "
                             "that run, or choose another --out")
        return None
    path = latest_checkpoint(ckpts)
    if main:
        print(f"resuming from {path}" if path else f"no checkpoint in {ckpts}; starting from step 0")
    return path


def _val_batches(args: PretrainArgs, meta: dict) -> list | None:
    """The first eval.batches windows of the val split, in order: the same every evaluation."""
    cfg = args.train
    val_tokens = sum(s["tokens"] for s in meta["splits"].get("val", {}).get("shards", []))
    if val_tokens <= cfg.seq_len:
        print(f"warning: the val split has {val_tokens} tokens (< seq_len + 1); no evaluation")
        return None
    stream = TokenStream(args.data, "val", cfg.batch_size, cfg.seq_len, seed=cfg.seed,
                         mode="sequential")
    return [stream.next_batch() for _ in range(cfg.eval.batches)]


def _write_run_files(out: Path, args: PretrainArgs, tokenizer: Tokenizer) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "run_config.json").write_text(json.dumps(dataclasses.asdict(args), indent=2) + "\n")
    tokenizer.save(out / "tokenizer")


def _print_summary(result: TrainResult, out: Path) -> None:
    loss = f"{result.losses[-1]:.4f}" if result.losses else "n/a (no steps run)"
    print(f"step {result.step}: train loss {loss}", end="")
    if result.val_loss is not None:
        print(f", val loss {result.val_loss:.4f}, val perplexity {result.val_ppl:.2f}", end="")
    print(f"\ncheckpoint: {result.checkpoint}\nHF model:   {out / 'hf'}")
    if (out / "loss_curve.png").exists():
        print(f"loss curve: {out / 'loss_curve.png'}")

