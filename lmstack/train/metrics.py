"""Per-step statistics and where they go: a JSONL file, TensorBoard, a tqdm bar, a PNG at the end.

`StepStats` is also what hooks receive, so a monitor sees exactly what is logged.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from lmstack.train.config import LoggingConfig

METRICS_FILE, PLOT_FILE, TENSORBOARD_DIR = "metrics.jsonl", "loss_curve.png", "tensorboard"


@dataclass
class StepStats:
    """What one optimizer step did."""

    step: int  # optimizer steps completed, counting this one
    loss: float  # mean loss per valid target token over all micro-batches (and ranks)
    lr: float
    grad_norm: float  # global L2 norm before clipping
    tokens: int  # input tokens processed this step
    valid_tokens: int  # target tokens that counted in the loss (not ignore_index)
    tokens_seen: int  # input tokens processed since step 0
    tokens_per_s: float
    mfu: float | None  # model FLOPs utilisation in [0, 1]; None without logging.peak_flops
    step_time_s: float
    elapsed_s: float  # training time since step 0, across resumes
    val_loss: float | None = None  # set on steps that ran an evaluation
    val_ppl: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class MetricsLog:
    """Appends StepStats to OUT/metrics.jsonl, TensorBoard and the progress bar."""

    def __init__(self, out_dir: str | Path | None, cfg: LoggingConfig, start_step: int,
                 total_steps: int | None):
        self.cfg = cfg
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.jsonl = None
        self.tb = None
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            path = self.out_dir / METRICS_FILE
            _truncate_after(path, start_step)  # a resumed run rewrites the steps it repeats
            self.jsonl = path.open("a")
            if cfg.tensorboard:
                from torch.utils.tensorboard import SummaryWriter  # slow import: only when used
                self.tb = SummaryWriter(str(self.out_dir / TENSORBOARD_DIR))
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not cfg.progress_bar)

    def log(self, stats: StepStats) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(stats.to_dict()) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            for name, value in _scalars(stats).items():
                self.tb.add_scalar(name, value, stats.step)
        postfix = {"loss": f"{stats.loss:.4f}", "tok/s": f"{stats.tokens_per_s:,.0f}"}
        if stats.mfu is not None:
            postfix["mfu"] = f"{100 * stats.mfu:.1f}%"
        if stats.val_loss is not None:
            postfix["val"] = f"{stats.val_loss:.4f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.out_dir is not None and self.cfg.plot:
            plot_loss_curve(read_metrics(self.out_dir / METRICS_FILE), self.out_dir / PLOT_FILE)


def _scalars(stats: StepStats) -> dict[str, float]:
    out = {"train/loss": stats.loss, "train/lr": stats.lr, "train/grad_norm": stats.grad_norm,
           "train/tokens_per_s": stats.tokens_per_s}
    if stats.mfu is not None:
        out["train/mfu"] = stats.mfu
    if stats.val_loss is not None:
        out["val/loss"], out["val/ppl"] = stats.val_loss, stats.val_ppl
    return out


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_after(path: Path, step: int) -> None:
    if path.is_file():
        kept = [r for r in read_metrics(path) if r["step"] <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def plot_loss_curve(records: list[dict], png: str | Path) -> None:
    """Train loss per step and validation loss where measured."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, works headless

    fig = Figure(figsize=(7, 4), dpi=120)
    ax = fig.add_subplot()
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1, label="train")
    val = [r for r in records if r.get("val_loss") is not None]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
