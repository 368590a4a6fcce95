"""`lmstack quantize`: weight-only int8 / int4 quantization of a model into a quantized directory.

    lmstack quantize runs/demo --method int8 --out runs/demo-int8
    lmstack quantize runs/demo --method int4 --group-size 64 --out runs/demo-int4
    lmstack quantize path/to/hf-model --method gptq-int4 --calibration data/prepared --out q4/
    lmstack quantize runs/demo --method gptq-int4 --calibration notes.txt --damp 0.05 --out q4/
    lmstack quantize runs/demo --method int4 --embedding float --out runs/demo-int4-float-table

MODEL is an HF model directory, an lmstack checkpoint directory or a run directory (its newest
checkpoint). --calibration (read by gptq-int4 only) is a prepared shards directory (`lmstack
prepare`; its train split) or a text file, tokenized with MODEL's tokenizer. OUT holds the
quantized weights, config.json and the tokenizer; `lmstack generate OUT`, `lmstack sample OUT`
and `LLM(OUT)` load it. Reports resident weight bytes before and after, the peak memory of this
process, and how much loading MODEL and OUT raises the peak memory of a fresh process. An
untied token embedding table is stored in the method's bits (--embedding chooses otherwise).
"""

from __future__ import annotations

import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from lmstack.cli import flags
from lmstack.cli.generate import _model_dir
from lmstack.cli.sample import find_tokenizer
from lmstack.compress import quantize_, resident_bytes, save_quantized
from lmstack.data import TokenStream
from lmstack.infer.loading import load_model, load_tokenizer, parse_dtype


@dataclass
class QuantizeArgs:
    method: Literal["int8", "int4", "gptq-int4"]
    """int8 (per output channel), int4 (round to nearest, in groups) or gptq-int4 (GPTQ)."""
    out: str
    """Directory to write the quantized model to (replaced if it exists)."""
    group_size: int = 128
    """int4: inputs per scale and zero (32, 64, 128 or 256)."""
    calibration: str | None = None
    """gptq-int4: a prepared shards directory or a text file of calibration text."""
    calibration_batches: int = 16
    """gptq-int4: calibration windows to read (each one batch)."""
    calibration_seq_len: int = 512
    """gptq-int4: tokens per calibration window (at most the model's max_seq_len)."""
    block_size: int = 128
    """gptq-int4: columns quantized between lazy updates of the rest."""
    damp: float = 0.01
    """gptq-int4: fraction of the Hessian's mean diagonal added to it."""
    embedding: Literal["int8", "int4", "float"] | None = None
    """An untied token embedding table: int8 per row, int4 in --group-size groups, or float;
    none: the method's bits (a tied table, the output head too, stays float)."""
    tokenizer: str | None = None
    """Tokenizer directory; none: MODEL's tokenizer.json, else the run's tokenizer/."""
    device: str = "cpu"
    """Where to quantize: cpu, cuda or cuda:N."""
    dtype: str | None = None
    """float32 or bfloat16 for the float tensors and scales; none: the checkpoint's."""
    measure_load: bool = True
    """Load OUT in a fresh process and report its peak memory."""


def main(argv: list[str]) -> int:
    try:
        quantize(*parse_args(argv))
    except (ValueError, FileNotFoundError) as e:
        print(f"lmstack quantize: error: {e}", file=sys.stderr)
        return 2
    return 0


def parse_args(argv: list[str]) -> tuple[str, QuantizeArgs]:
    """(MODEL, the options)."""
    parser = flags.make_parser("lmstack quantize", __doc__,
                               usage="%(prog)s MODEL --method METHOD --out OUT [options]")
    parser.add_argument("model", metavar="MODEL", help="HF model, checkpoint or run directory")
    flags.add_fields(parser, QuantizeArgs)
    ns = parser.parse_args(argv)
    return ns.model, flags.build(QuantizeArgs, ns)


def quantize(model_path: str, args: QuantizeArgs) -> Path:
    """Load, quantize, save and report; return the written directory."""
    directory = _model_dir(model_path)
    tokenizer = _tokenizer(directory, args.tokenizer)
    model = load_model(directory, args.device, parse_dtype(args.dtype))
    before = resident_bytes(model)
    batches = _calibration(args, tokenizer, model) if args.method == "gptq-int4" and args.calibration else None
    kept = quantize_(model, args.method, args.group_size, batches, args.block_size, args.damp,
                     embedding=args.embedding)
    after = resident_bytes(model)
    out = save_quantized(model, args.out, tokenizer, method=args.method)
    print(f"{args.method}: kept in float: {kept or 'none'}")
    print(f"resident weights: {_mib(before)} -> {_mib(after)} ({after / before:.2f}x)")
    print(f"peak RSS of this process (float model loaded and quantized): {_mib(_peak_rss())}")
    if args.measure_load:
        print(_loading_report(directory, out, args.device))
    print(f"wrote {out}")
    return out


def _tokenizer(directory: Path, explicit: str | None):
    """--tokenizer, else the model directory's, else the run's tokenizer/, else None."""
    if explicit is not None:
        found = load_tokenizer(explicit)
        if found is None:
            raise FileNotFoundError(f"--tokenizer {explicit}: no tokenizer.json there")
        return found
    found = load_tokenizer(directory)
    if found is None:
        try:
            found = load_tokenizer(find_tokenizer(directory))
        except FileNotFoundError:
            return None
    return found


def _calibration(args: QuantizeArgs, tokenizer, model) -> list[torch.Tensor]:
    """(1, T) token windows from a prepared shards directory or a text file."""
    path, seq_len = Path(args.calibration), min(args.calibration_seq_len, model.config.max_seq_len)
    if path.is_dir():
        stream = TokenStream(path, "train", batch_size=1, seq_len=seq_len, mode="sequential")
        if stream.vocab_size > model.config.vocab_size:
            raise ValueError(f"--calibration {path}: its vocabulary ({stream.vocab_size}) is larger "
                             f"than the model's ({model.config.vocab_size}); prepare it with the "
                             "model's tokenizer")
        return [stream.next_batch()[0] for _ in range(min(args.calibration_batches, stream.windows_per_epoch))]
    if not path.is_file():
        raise FileNotFoundError(f"--calibration {path}: no such file or directory")
    if tokenizer is None:
        raise ValueError(f"--calibration {path} is text, and MODEL has no tokenizer to read it "
                         "with: pass --tokenizer DIR, or a prepared shards directory")
    ids = torch.tensor(tokenizer.encode(path.read_text()))
    if len(ids) < 2:
        raise ValueError(f"--calibration {path} holds too little text; give more")
    seq_len = min(seq_len, len(ids))
    windows = ids[:len(ids) // seq_len * seq_len].view(-1, seq_len)[:args.calibration_batches]
    return list(windows.split(1))


def _peak_rss() -> int:
    """Peak resident memory of this process in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # ru_maxrss: bytes on macOS, else KiB


LOAD = """
import sys
from pathlib import Path
from lmstack.infer.loading import load_model
def status(key):  # bytes, from Linux's /proc/self/status (kB)
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith(key))) * 1024
before = status("VmRSS:")
Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) counts from here on
load_model(sys.argv[1], sys.argv[2])
print(before, status("VmHWM:"))
"""


def _loading_report(source: Path, out: Path, device: str) -> str:
    """How far loading raises the peak memory of a fresh process, for the float model and for
    the quantized one (Linux: read from /proc; getrusage in a child would count what its
    parent held)."""
    if not Path("/proc/self/clear_refs").exists():
        return "peak memory of loading: not measured (needs Linux's /proc)"
    rises = [_mib(_loading_rise(path, device)) for path in (source, out)]
    return f"peak memory of loading in a fresh process: float {rises[0]}, quantized {rises[1]}"


def _loading_rise(path: Path, device: str) -> int:
    done = subprocess.run([sys.executable, "-c", LOAD, str(path), device], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise ValueError(f"loading {path} in a fresh process failed:\n{done.stderr.strip()[-2000:]}")
    before, peak = map(int, done.stdout.split())
    return peak - before


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
