"""`lmstack generate`: run prompts through the batched inference engine (`lmstack.infer.LLM`).

    lmstack generate runs/demo --prompt "Once upon a time" --max_tokens 64 --temperature 0.8
    lmstack generate path/to/hf-model --prompts_file prompts.txt --temperature 0 --json true
    lmstack generate runs/demo --prompt "Hello" --stream true --engine.dtype bfloat16

MODEL is an HF model directory, an lmstack checkpoint directory, or a run directory (its newest
checkpoint). The tokenizer is MODEL's tokenizer.json, else the run's tokenizer/, else --tokenizer.
Sampling flags are SamplingParams' fields; engine flags (--engine.*) are EngineConfig's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import jsonargparse

from lmstack.cli.sample import find_checkpoint, find_tokenizer
from lmstack.infer import LLM, EngineConfig, RequestOutput, SamplingParams
from lmstack.infer.loading import load_tokenizer


@dataclass
class GenerateArgs:
    prompt: str | None = None
    """One prompt."""
    prompts_file: str | None = None
    """A text file with one prompt per line (blank lines skipped)."""
    tokenizer: str | None = None
    """Tokenizer directory or tokenizer.json (default: found next to the model)."""
    stream: bool = False
    """Print text as it is generated (one prompt only)."""
    json: bool = False
    """Print one JSON object per prompt: text, token ids, finish reason and timing."""


def main(argv: list[str]) -> int:
    parser = _parser()
    try:
        ns = parser.parse_args(argv)
        args = GenerateArgs(**{k: ns[k] for k in asdict(GenerateArgs())})
        params = SamplingParams(**{f.name: ns[f.name] for f in fields(SamplingParams)})
        llm = LLM(_model_dir(ns["model"]), _tokenizer(ns["model"], args.tokenizer),
                  **ns["engine"].as_dict())
        prompts = _prompts(args)
    except (jsonargparse.ArgumentError, ValueError, FileNotFoundError) as e:
        print(f"lmstack generate: error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    outs = _stream(llm, prompts[0], params) if args.stream else llm.generate(prompts, params)
    _report(outs, args.json, time.perf_counter() - start, printed=args.stream)
    return 0


def _parser() -> jsonargparse.ArgumentParser:
    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = jsonargparse.ArgumentParser(prog="lmstack generate", description=__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter,
                                         exit_on_error=False)
    parser.add_argument("model", type=str, help="HF model, checkpoint or run directory")
    parser.add_class_arguments(GenerateArgs, nested_key=None)
    parser.add_class_arguments(SamplingParams, nested_key=None)
    parser.add_class_arguments(EngineConfig, nested_key="engine")
    return parser


def _model_dir(path: str) -> Path:
    path = Path(path)
    return path if (path / "config.json").is_file() else find_checkpoint(path)


def _tokenizer(model: str, explicit: str | None):
    """--tokenizer, else the model directory's tokenizer.json, else the run's tokenizer/."""
    path = explicit or _model_dir(model)
    found = load_tokenizer(path)
    if found is None and explicit is not None:
        raise FileNotFoundError(f"--tokenizer {explicit}: no tokenizer.json there")
    return found if found is not None else load_tokenizer(find_tokenizer(Path(path)))


def _prompts(args: GenerateArgs) -> list[str]:
    if (args.prompt is None) == (args.prompts_file is None):
        raise ValueError("give exactly one of --prompt TEXT or --prompts_file FILE")
    if args.prompt is not None:
        return [args.prompt]
    path = Path(args.prompts_file)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts_file {path}: no such file")
    prompts = [line for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts_file {path} holds no prompts")
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
