"""`lmstack <command>`: the only place where layers are wired together.

Each command lives in its own module `lmstack/cli/<name>.py` exposing `main(argv) -> int | None`;
modules are imported only when their command runs, so `lmstack --help` stays instant. Flags are
kebab-case everywhere (`--max-new-tokens`), built from dataclass fields by `lmstack.cli.flags`.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "info": "show a preset's or config file's shape, parameter count and FLOPs per token",
    "prepare": "tokenize a corpus into token shards (+ meta.json)",
    "pretrain": "train a model from scratch on prepared shards",
    "finetune": "fine-tune a model on chat data (full, LoRA or QLoRA)",
    "merge-lora": "merge a LoRA adapter into its base and write an HF model directory",
    "sample": "generate text from a checkpoint",
    "generate": "run the batched inference engine on prompts",
    "serve": "an OpenAI-compatible HTTP server over the inference engine",
    "quantize": "quantize a model's weights to int8 / int4 (RTN or GPTQ) into a new directory",
    "distill": "train a student model to match a frozen teacher on prepared shards",
    "demo": "prepare the built-in corpus, pretrain a small model and sample from it",
}


def usage() -> str:
    lines = ["usage: lmstack <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help}" for name, help in COMMANDS.items()]
    lines += ["", "`lmstack <command> --help` shows a command's options and examples."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"lmstack: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"lmstack.cli.{name.replace('-', '_')}")  # merge-lora
    return module.main(rest) or 0
