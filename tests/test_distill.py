"""Knowledge distillation: the loss (lmstack.compress.distill) against plain cross-entropy and a
hand-computed gradient, and `lmstack distill` end to end: a student distilled from a tiny
pretrained teacher gets closer to it than its own init, the same run under torchrun (gloo,
2 ranks) logs the same losses, and bad teachers and layouts are refused with clear errors."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmstack.cli import distill as distill_cli
from lmstack.cli import pretrain as pretrain_cli
from lmstack.compress.distill import distillation_loss, distillation_sum, kl_sum
from lmstack.data import TokenStream, prepare
from lmstack.model import ModelConfig, Transformer
from lmstack.model.hf import load_hf, save_hf
from lmstack.model.tokenizer import Tokenizer
from lmstack.train import cross_entropy_sum, evaluate

LAUNCH_TIMEOUT_S = 240
TOL = 1e-5
STEPS = 24
STUDENT = '{"dim": 32, "n_layers": 1, "hidden_dim": 64}'  # a quarter of the teacher's parameters


# ----------------------------------------------------------------------------- the loss

def tiny(vocab: int = 64, seed: int = 0) -> Transformer:
    return Transformer.build(ModelConfig.from_preset("tiny-llama", vocab_size=vocab), seed=seed)


def batch(vocab: int = 64, rows: int = 2, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, vocab, (rows, length), generator=g)
    targets = torch.randint(0, vocab, (rows, length), generator=g)
    targets[0, :5] = -100  # some positions are not targets
    return inputs, targets


def test_alpha_0_is_exactly_the_cross_entropy_sum():
    student, teacher = tiny(seed=0), tiny(seed=1)
    inputs, targets = batch()
    loss = distillation_loss(teacher, temperature=3.0, alpha=0.0)(student, inputs, targets)
    assert torch.equal(loss, cross_entropy_sum(student, inputs, targets))


def test_a_student_identical_to_its_teacher_has_no_kl_term():
    student = tiny()
    teacher = copy.deepcopy(student)
    inputs, targets = batch()
    loss = distillation_loss(teacher, temperature=2.0, alpha=1.0)(student, inputs, targets)
    assert abs(loss.item()) < 1e-5
    other = distillation_loss(tiny(seed=1), temperature=2.0, alpha=1.0)(student, inputs, targets)
    assert other.item() > 1e-2  # the check above can fail: another teacher is far off


def test_the_teacher_sees_the_packing_and_stays_frozen():
    """Packed rows: positions restart and attention stays inside each document, for the teacher
    too (ignoring them would give it other logits, a non-zero KL); it gets no gradient."""
    student = tiny()
    teacher = copy.deepcopy(student)
    inputs, targets = batch()
    positions = torch.cat([torch.arange(5), torch.arange(7)]).expand(2, -1)
    segments = torch.cat([torch.zeros(5), torch.ones(7)]).long().expand(2, -1)
    loss = distillation_loss(teacher, alpha=1.0)(student, inputs, targets, positions, segments)
    loss.backward()
    assert abs(loss.item()) < 1e-5
    assert not teacher.training and all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())


def test_the_kl_gradient_is_t_times_the_difference_of_the_softened_distributions():
    """d/dz_s [T^2 KL(softmax(z_t/T) || softmax(z_s/T))] = T (softmax(z_s/T) - softmax(z_t/T))
    at valid positions, 0 elsewhere; the hard term adds softmax(z_s) - onehot(target)."""
    g = torch.Generator().manual_seed(0)
    student = torch.randn(1, 6, 10, generator=g, requires_grad=True)
    teacher = torch.randn(1, 6, 10, generator=g)
    targets = torch.tensor([[3, -100, 1, 9, -100, 0]])
    T, alpha = 2.5, 0.3
    distillation_sum(student, teacher, targets, T, alpha).backward()
    valid = (targets != -100)[..., None]
    soft = T * (torch.softmax(student.detach() / T, -1) - torch.softmax(teacher / T, -1))
    hard = torch.softmax(student.detach(), -1) - torch.nn.functional.one_hot(targets.clamp(min=0), 10)
    expected = torch.where(valid, alpha * soft + (1 - alpha) * hard, 0.0)
    torch.testing.assert_close(student.grad, expected, atol=1e-6, rtol=1e-5)


def test_kl_sum_matches_its_definition_at_valid_positions_only():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 4, 7, generator=g), torch.randn(2, 4, 7, generator=g)
    targets = torch.tensor([[1, 2, -100, 3], [-100, -100, 4, 5]])
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    per_position = (p * (p.log() - q.log())).sum(-1)  # (B, T)
    assert kl_sum(s, t, targets).item() == pytest.approx(per_position[targets != -100].sum().item(), rel=1e-5)


def test_a_vocabulary_mismatch_names_both_sizes():
    inputs, targets = batch(vocab=64)
    with pytest.raises(ValueError, match="teacher scores 80 token ids and the student 64"):
        distillation_loss(tiny(vocab=80))(tiny(vocab=64), inputs, targets)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"temperature": 0.0}, r"--distill.temperature=0.0 is invalid: must be > 0"),
    ({"alpha": 1.5}, r"--distill.alpha=1.5 is invalid: must be in \[0, 1\]"),
])
def test_bad_settings_name_their_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        distillation_loss(tiny(), **kwargs)


# ----------------------------------------------------------------------------- the command

def write_corpus(folder: Path, lines) -> Path:
    folder.mkdir(parents=True)
    for i in range(4):
        (folder / f"doc{i}.txt").write_text("".join(lines(i, j) for j in range(150)))
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    corpus = write_corpus(root / "corpus", lambda i, j: f"{j} plus {i} is {i + j}.\n")
    prepare([corpus], root / "prepared", vocab_size=300, val_fraction=0.1, progress=False,
            num_workers=1)
    return root / "prepared"


def common_flags(out: Path, steps: int) -> list[str]:
    """A checkpoint halfway (a resume point) and at the end; one evaluation, at the end."""
    return ["--out", str(out), "--train.max-steps", str(steps), "--train.batch-size", "8",
            "--train.seq-len", "32", "--train.optim.lr", "3e-3", "--train.schedule.warmup-steps", "4",
            "--train.eval.every", str(steps), "--train.eval.batches", "2",
            "--train.checkpoint.every", str(max(steps // 2, 1)), "--train.device", "cpu",
            "--train.precision.dtype", "fp32", "--train.logging.progress-bar", "false",
            "--train.logging.tensorboard", "false"]


@pytest.fixture(scope="module")
def teacher(data, tmp_path_factory) -> Path:
    """tiny-llama pretrained for 40 steps on the data; its HF export is the teacher."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    argv = ["--data", str(data), "--model.preset", "tiny-llama", *common_flags(out, 40)]
    assert pretrain_cli.main(argv) == 0
    return out / "hf"


def distill_flags(data: Path, teacher: Path, out: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return ["--teacher", str(teacher), "--data", str(data), "--model.preset", "tiny-llama",
            "--model.overrides", STUDENT, *common_flags(out, steps), *extra]


@pytest.fixture(scope="module")
def single(data, teacher, tmp_path_factory) -> Path:
    """The single-process distillation run: the reference for the torchrun runs."""
    out = tmp_path_factory.mktemp("distill") / "single"
    assert distill_cli.main(distill_flags(data, teacher, out)) == 0
    return out


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def val_batches(data: Path) -> list:
    stream = TokenStream(data, "val", 8, 32, seed=0, mode="sequential")
    return [stream.next_batch() for _ in range(2)]


def mean_kl(student: Transformer, teacher: Transformer, batches: list) -> float:
    """KL(teacher || student) per target token at temperature 1 over `batches`."""
    with torch.no_grad():
        total = sum(kl_sum(student(x), teacher(x), y).item() for x, y in batches)
    return total / sum((y != -100).sum().item() for _, y in batches)


def test_distilled_student_moves_towards_its_teacher(single, teacher, data):
    records = metrics(single)
    losses = [r["loss"] for r in records]
    assert len(losses) == STEPS
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
    student = load_hf(single / "hf")
    untrained = Transformer.build(student.config, seed=0)  # the run's init (--train.seed 0)
    teacher_model = load_hf(teacher)
    batches = val_batches(data)
    distilled, initial = mean_kl(student, teacher_model, batches), mean_kl(untrained, teacher_model, batches)
    assert distilled < 0.5 * initial, (distilled, initial)
    # the reported validation loss is plain cross-entropy, as pretraining's is
    assert records[-1]["val_loss"] == pytest.approx(evaluate(student, batches, cross_entropy_sum), abs=1e-5)
    config = json.loads((single / "run_config.json").read_text())
    assert config["teacher"] == str(teacher) and config["distill"] == {"temperature": 2.0, "alpha": 0.5}


def test_a_resumed_distillation_continues_the_run_exactly(single, data, teacher, tmp_path):
    out = tmp_path / "resumed"
    half = f"step_{STEPS // 2:08d}"
    shutil.copytree(single / "checkpoints" / half, out / "checkpoints" / half)
    assert distill_cli.main(distill_flags(data, teacher, out, "--resume")) == 0
    resumed, whole = metrics(out), metrics(single)[STEPS // 2:]
    assert [r["step"] for r in resumed] == [r["step"] for r in whole]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(resumed, whole, strict=True)) <= TOL


def launch(nproc: int, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """torchrun -m lmstack ...; killed after LAUNCH_TIMEOUT_S (a hang fails, not stalls)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "lmstack", *argv]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent), "OMP_NUM_THREADS": "1"}
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=env,
                              cwd=cwd)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun {' '.join(argv[:3])} hung for {LAUNCH_TIMEOUT_S}s:\n{str(e.stderr)[-4000:]}")


@pytest.mark.parametrize("layout", [["--train.parallel.dp-shard", "2"],
                                    ["--train.parallel.dp-replicate", "2"],
                                    ["--train.parallel.tp", "2"]], ids=["fsdp", "ddp", "tp"])
def test_distill_under_torchrun_logs_the_single_process_losses(single, data, teacher, tmp_path, layout):
    """The teacher whole on each rank, the student sharded (FSDP2), replicated (DDP) or split
    (TP): the same global batches, so the same losses. gloo can abort at teardown after the
    work is done, so the run's files are judged, not torchrun's exit code alone."""
    out = tmp_path / "two"
    proc = launch(2, ["distill", *distill_flags(data, teacher, out), *layout], tmp_path)
    assert (out / "hf" / "model.safetensors").exists(), proc.stderr[-4000:]
    assert proc.stdout.count(f"step {STEPS}: train loss") == 1  # rank 0 alone prints
    one, two = metrics(single), metrics(out)
    assert [r["step"] for r in two] == [r["step"] for r in one]
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(one, two, strict=True))
    assert diff <= TOL, diff
    assert two[-1]["val_loss"] == pytest.approx(one[-1]["val_loss"], abs=TOL)


def test_bad_teachers_and_layouts_are_refused_with_clear_errors(data, teacher, tmp_path, capsys):
    wide = tmp_path / "wide"  # another vocabulary size
    save_hf(Transformer.build(ModelConfig.from_preset("tiny-llama", vocab_size=512), seed=0), wide)
    other_tok = tmp_path / "other_tok"  # the same width, another tokenizer
    other_corpus = write_corpus(tmp_path / "other_corpus", lambda i, j: f"{j} minus {i} makes {j - i}\n")
    tokenizer = Tokenizer.train_from_files(sorted(other_corpus.iterdir()), vocab_size=300)
    save_hf(load_hf(teacher), other_tok)
    tokenizer.save(other_tok)
    cases = {
        "vocab": (["--teacher", str(wide)], r"scores 512 token ids and the student 300.*--data .* has 300"),
        "tokenizer": (["--teacher", str(other_tok)], r"its tokenizer .* is not the one --data was prepared with"),
        "missing": (["--teacher", str(tmp_path / "nowhere")], r"--teacher .*nowhere: no such directory"),
        "pp": (["--train.parallel.pp", "2"], r"a custom loss_fn needs --train.parallel.pp=1"),
        "alpha": (["--distill.alpha", "-0.1"], r"--distill.alpha=-0.1 is invalid"),
    }
    for name, (extra, message) in cases.items():
        argv = distill_flags(data, teacher, tmp_path / name, *extra, steps=1)
        assert distill_cli.main(argv) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("lmstack distill: error: "), (name, err)
        assert re.search(message, err), (name, err)
        assert not (tmp_path / name / "checkpoints").exists(), name  # refused before training
