"""`lmstack serve`: an OpenAI-compatible HTTP server over the inference engine.

    lmstack serve runs/demo                                  # http://127.0.0.1:8000/v1
    lmstack serve path/to/hf-model --port 8080 --api-key sk-local --max-num-seqs 32
    lmstack serve runs/demo --dtype bfloat16 --compile --max-model-len 1024

    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "demo", "messages": [{"role": "user", "content": "Hello"}]}'

MODEL is what `lmstack generate` takes (HF model, checkpoint or run directory) and the engine
flags are the same as generate's. Routes: /v1/models, /v1/completions, /v1/chat/completions,
/tokenize, /detokenize, /health, /metrics (see docs/serving.md). SIGTERM drains: in-flight
requests finish for up to --drain-timeout-s, the rest are aborted, and the server exits 0.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lmstack.cli import flags
from lmstack.cli.generate import HELP, _model_dir, _tokenizer
from lmstack.infer import LLM, EngineConfig
from lmstack.serve import ServeConfig, build_app, run


@dataclass
class ServeArgs:
    tokenizer: str | None = None
    """Tokenizer directory or tokenizer.json; none: MODEL's, else the run's tokenizer/."""
    log_level: str = "info"
    """uvicorn's log level: debug, info, warning or error."""
    server: ServeConfig = field(default_factory=ServeConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


def main(argv: list[str]) -> int:
    try:
        model, args = parse_args(argv)
        path, tokenizer = _model_dir(model), _tokenizer(model, args.tokenizer)
        if tokenizer is None:
            raise ValueError(f"no tokenizer found for {model}; pass --tokenizer DIR")
    except (ValueError, FileNotFoundError) as e:
        print(f"lmstack serve: error: {e}", file=sys.stderr)
        return 2
    name = args.server.model_name or Path(model).resolve().name
    app = build_app(functools.partial(LLM, path, tokenizer, **vars(args.engine)), args.server, name)
    run(app, args.log_level)
    return 1 if app.state.lmstack.status == "failed" else 0


def parse_args(argv: list[str]) -> tuple[str, ServeArgs]:
    """(MODEL, the options); server and engine flags are not prefixed: --port, --max-num-seqs."""
    parser = flags.make_parser("lmstack serve", __doc__, "%(prog)s MODEL [options]")
    parser.add_argument("model", metavar="MODEL", help="HF model, checkpoint or run directory")
    flags.add_fields(parser, ServeArgs, flat=True, helps=HELP, skip={"engine.compile_cache"})
    ns = parser.parse_args(argv)
    return ns.model, flags.build(ServeArgs, ns)
