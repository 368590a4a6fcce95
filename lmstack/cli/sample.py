"""`lmstack sample`: continue a prompt with a trained checkpoint.

    lmstack sample runs/demo --prompt "def fib(n):" --max-new-tokens 200 --temperature 0.8
    lmstack sample runs/demo/checkpoints/step_00001000 --num-samples 4 --top-p 0.9 --seed 1
    lmstack sample runs/demo --adapter runs/ft/adapter --prompt "12+30=" --temperature 0

CHECKPOINT is a checkpoint directory, a run directory (its newest valid checkpoint is used), a
quantized directory (`lmstack quantize`) or an HF model directory. The tokenizer is --tokenizer, else the directory's own
tokenizer.json, else the run's tokenizer/.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from lmstack.cli import flags
from lmstack.finetune import use_adapter
from lmstack.infer.loading import load_model
from lmstack.model import generate
from lmstack.model.tokenizer import Tokenizer
from lmstack.train import latest_checkpoint, resolve_device
from lmstack.train.checkpoint import MODEL_FILE
from lmstack.train.loop import CHECKPOINT_DIR


@dataclass
class SampleArgs:
    prompt: str = ""
    """Text to continue; empty starts a fresh document (after an end-of-text token)."""
    num_samples: int = 1
    """Independent continuations of the prompt, sampled as one batch."""
    max_new_tokens: int = 200
    """Most tokens to add to the prompt (fewer if an end-of-text token comes first)."""
    temperature: float = 0.8
    """0 is greedy decoding."""
    top_k: int = 50
    """Sample among the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Sample among the most likely tokens holding this much probability (1: all)."""
    seed: int = 0
    """Seeds the sampling: the same seed gives the same samples."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda or cuda:N."""
    tokenizer: str | None = None
    """Tokenizer directory; none: the run's tokenizer/."""
    adapter: str | None = None
    """A PEFT LoRA adapter directory (`lmstack finetune`'s OUT/adapter) merged into the model."""


def main(argv: list[str]) -> int:
    try:
        texts = sample(*parse_args(argv))
    except (ValueError, FileNotFoundError) as e:
        print(f"lmstack sample: error: {e}", file=sys.stderr)
        return 2
    for i, text in enumerate(texts):
        if i:
            print("-" * 40)
        print(text)
    return 0


def parse_args(argv: list[str]) -> tuple[str, SampleArgs]:
    """(CHECKPOINT, the options)."""
    parser = flags.make_parser("lmstack sample", __doc__, usage="%(prog)s CHECKPOINT [options]")
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint or run directory")
    flags.add_fields(parser, SampleArgs)
    ns = parser.parse_args(argv)
    return ns.checkpoint, flags.build(SampleArgs, ns)


def sample(checkpoint: str | Path, args: SampleArgs) -> list[str]:
    """Prompt + continuation texts, one per sample."""
    if args.num_samples < 1:
        raise ValueError(f"--num-samples={args.num_samples} must be >= 1")
    ckpt = find_checkpoint(checkpoint)
    tokenizer = Tokenizer.load(args.tokenizer or find_tokenizer(ckpt))
    model = load_model(ckpt, resolve_device(args.device))  # checkpoint, quantized or HF directory
    if args.adapter is not None:
        model = use_adapter(model, args.adapter)
    stop = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    prompt = tokenizer.encode(args.prompt) if args.prompt else stop[:1]
    if not prompt:
        raise ValueError("--prompt is empty and the tokenizer has no end-of-text token to start "
                         "from; give a prompt")
    outs = generate(model, [prompt] * args.num_samples, args.max_new_tokens,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    stop_tokens=stop, seed=args.seed)
    return [args.prompt + tokenizer.decode(out, skip_special_tokens=True) for out in outs]


def find_checkpoint(path: str | Path) -> Path:
    path = Path(path)
    if (path / MODEL_FILE).is_file():
        return path
    found = latest_checkpoint(path / CHECKPOINT_DIR)
    if found is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint (no {MODEL_FILE}) nor a run "
                                f"directory with checkpoints in {path / CHECKPOINT_DIR}")
    return found


def find_tokenizer(ckpt: Path) -> Path:
    """The checkpoint's own tokenizer.json (a quantized directory's), else RUN/tokenizer for
    RUN/checkpoints/step_N (or a tokenizer/ next to the checkpoint)."""
    if (ckpt / "tokenizer.json").is_file():
        return ckpt
    for folder in (ckpt, ckpt.parent, ckpt.parent.parent):
        if (folder / "tokenizer" / "tokenizer.json").is_file():
            return folder / "tokenizer"
    raise FileNotFoundError(f"no tokenizer/ found next to or above {ckpt}; pass --tokenizer DIR")
