"""`lmstack generate`: run prompts through the batched inference engine (`lmstack.infer.LLM`).

    lmstack generate runs/demo --prompt "Once upon a time" --max-new-tokens 64 --temperature 0.8
    lmstack generate path/to/hf-model --prompts-file prompts.txt --temperature 0 --json
    lmstack generate runs/demo --prompt "Hello" --stream --dtype bfloat16 --compile
    lmstack generate runs/demo/hf --adapter runs/ft/adapter --prompts-file prompts.txt --temperature 0

MODEL is an HF model directory, an lmstack checkpoint directory, or a run directory (its newest
checkpoint). The tokenizer is --tokenizer, else MODEL's tokenizer.json, else the run's tokenizer/.
Sampling flags are SamplingParams' fields (--max-new-tokens is max_tokens); engine flags are
EngineConfig's (--seed is EngineConfig.seed: each prompt samples its own stream from it).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmstack.cli import flags
from lmstack.cli.sample import find_checkpoint, find_tokenizer
from lmstack.finetune import use_adapter
from lmstack.infer import LLM, EngineConfig, RequestOutput, SamplingParams
from lmstack.infer.loading import load_model, load_tokenizer


@dataclass
class GenerateArgs:
    prompt: str | None = None
    """One prompt."""
    prompts_file: str | None = None
    """A text file with one prompt per line (blank lines skipped)."""
    tokenizer: str | None = None
    """Tokenizer directory or tokenizer.json; none: MODEL's, else the run's tokenizer/."""
    adapter: str | None = None
    """A PEFT LoRA adapter directory (`lmstack finetune`'s OUT/adapter) merged into MODEL."""
    stream: bool = False
    """Print text as it is generated (one prompt only)."""
    json: bool = False
    """Print one JSON object per prompt: text, token ids, finish reason and timing."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    engine: EngineConfig = field(default_factory=EngineConfig)


# the one-line help of fields that have no docstring where they are defined
HELP = {
    "sampling.max_tokens": "Most tokens to add to each prompt (fewer if a stop comes first).",
    "sampling.top_p": "Sample among the most likely tokens holding this much probability (1: all).",
    "sampling.presence_penalty": "Subtracted from the logit of every token already in the output.",
    "sampling.frequency_penalty": "Subtracted from a token's logit once per time it is already in "
                                  "the output.",
    "sampling.stop_token_ids": "Token ids that end generation (besides end-of-text).",
    "sampling.ignore_eos": "Keep generating past the end-of-text token.",
    "engine.enable_prefix_caching": "Share the KV-cache blocks of prompts' common prefixes.",
}


def main(argv: list[str]) -> int:
    try:
        model, args = parse_args(argv)
        llm = LLM(_model(model, args.adapter), _tokenizer(model, args.tokenizer), **vars(args.engine))
        prompts = _prompts(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"lmstack generate: error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    if args.stream:
        outs = _stream(llm, prompts[0], args.sampling)
    else:
        outs = llm.generate(prompts, args.sampling)
    _report(outs, args.json, time.perf_counter() - start, printed=args.stream)
    return 0


def parse_args(argv: list[str]) -> tuple[str, GenerateArgs]:
    """(MODEL, the options). Sampling and engine flags are not prefixed: --temperature, --device."""
    usage = "%(prog)s MODEL (--prompt PROMPT | --prompts-file PROMPTS-FILE) [options]"
    parser = flags.make_parser("lmstack generate", __doc__, usage)
    parser.add_argument("model", metavar="MODEL", help="HF model, checkpoint or run directory")
    flags.add_fields(parser, GenerateArgs, flat=True, helps=HELP,
                     rename={"sampling.max_tokens": "max-new-tokens"},
                     skip={"sampling.seed", "engine.compile_cache"})  # --seed is engine.seed
    ns = parser.parse_args(argv)
    return ns.model, flags.build(GenerateArgs, ns)


def _model_dir(path: str) -> Path:
    path = Path(path)
    return path if (path / "config.json").is_file() else find_checkpoint(path)


def _model(path: str, adapter: str | None) -> Path | torch.nn.Module:
    """MODEL's directory for the engine to load, or with --adapter the model loaded here with
    the adapter merged in (a plain model, so every engine path serves it)."""
    if adapter is None:
        return _model_dir(path)
    return use_adapter(load_model(_model_dir(path)), adapter)


def _tokenizer(model: str, explicit: str | None):
    """--tokenizer, else the model directory's tokenizer.json, else the run's tokenizer/."""
    path = explicit or _model_dir(model)
    found = load_tokenizer(path)
    if found is None and explicit is not None:
        raise FileNotFoundError(f"--tokenizer {explicit}: no tokenizer.json there")
    return found if found is not None else load_tokenizer(find_tokenizer(Path(path)))


def _prompts(args: GenerateArgs) -> list[str]:
    if (args.prompt is None) == (args.prompts_file is None):
        raise ValueError("give exactly one of --prompt TEXT or --prompts-file FILE")
    if args.prompt is not None:
        return [args.prompt]
    path = Path(args.prompts_file)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts-file {path}: no such file")
    prompts = [line for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts-file {path} holds no prompts")
    if args.stream and len(prompts) > 1:
        raise ValueError("--stream prints one prompt's text; give a single prompt")
    return prompts


def _stream(llm: LLM, prompt: str, params: SamplingParams) -> list[RequestOutput]:
    print(prompt, end="", flush=True)
    last = None
    for last in llm.stream(prompt, params):
        print(last.delta_text, end="", flush=True)
    print()
    return [last]


def _report(outs: list[RequestOutput], as_json: bool, seconds: float, printed: bool) -> None:
    for out in outs:
        if as_json:
            m = out.metrics
            print(json.dumps({"request_id": out.request_id, "text": out.text,
                              "token_ids": out.token_ids, "finish_reason": out.finish_reason,
                              "prompt_tokens": len(out.prompt_token_ids),
                              "ttft_s": m.first_token_time - m.arrival_time,
                              "latency_s": m.finish_time - m.arrival_time}))
        elif not printed:
            print(out.text)
            print("-" * 40)
    tokens = sum(len(o.token_ids) for o in outs)
    print(f"{len(outs)} requests, {tokens} tokens in {seconds:.2f}s "
          f"({tokens / max(seconds, 1e-9):.1f} tokens/s)", file=sys.stderr)
