"""`lmstack merge-lora`: fold a LoRA adapter into its base and write a plain HF model directory.

    lmstack merge-lora runs/demo/hf runs/ft/adapter --out runs/ft-merged
    lmstack merge-lora path/to/hf path/to/peft-adapter --out merged --dtype bfloat16

BASE is an HF model directory, an lmstack checkpoint or a run directory; ADAPTER is a PEFT LoRA
directory (written by `lmstack finetune` or by `peft`). An adapter trained by QLoRA is merged
into the base's NF4-dequantized weights, the weights it was trained against. The tokenizer
(BASE's, else its run's) is copied into OUT.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lmstack.cli import flags
from lmstack.cli.finetune import base_directory, load_tokenizer
from lmstack.finetune import use_adapter
from lmstack.infer.loading import load_model, parse_dtype
from lmstack.model.hf import DTYPES, save_hf


def parse_args(argv: list[str]):
    parser = flags.make_parser("lmstack merge-lora", __doc__,
                               usage="%(prog)s BASE ADAPTER --out DIR [--dtype DTYPE]")
    parser.add_argument("base", metavar="BASE", help="HF model, checkpoint or run directory")
    parser.add_argument("adapter", metavar="ADAPTER", help="a PEFT LoRA adapter directory")
    parser.add_argument("--out", required=True, help="the merged HF model directory to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="dtype of the written weights (default: float32)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory (default: BASE's, else its run's tokenizer/)")
    return parser.parse_args(argv)


def merge(base: str | Path, adapter: str | Path, out: str | Path, dtype: str = "float32",
          tokenizer: str | None = None) -> Path:
    base_dir = base_directory(base)
    model = use_adapter(load_model(base_dir), adapter, merge=True)
    save_hf(model, out, dtype=parse_dtype(dtype))
    try:
        load_tokenizer(tokenizer, base_dir).save(out)
    except FileNotFoundError:
        print(f"note: no tokenizer found for {base_dir}; {out} holds the weights only",
              file=sys.stderr)
    return Path(out)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        out = merge(args.base, args.adapter, args.out, args.dtype, args.tokenizer)
    except (ValueError, FileNotFoundError) as e:
        print(f"lmstack merge-lora: error: {e}", file=sys.stderr)
        return 2
    print(f"merged {args.adapter} into {args.base}: {out}")
    return 0
