"""The training loop: exact resume, crash-safe checkpoints, gradient accumulation, a golden loss
curve, precision, schedules, metrics and the pretrain/sample commands, on a tiny CPU model.

Regenerate the golden curve (only after a deliberate change to the loop's numerics):
    LMSTACK_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_train.py -k golden
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lmstack.cli import pretrain as pretrain_cli
from lmstack.cli import sample as sample_cli
from lmstack.data import prepare
from lmstack.model import ModelConfig, Transformer
from lmstack.model.hf import load_hf
from lmstack.train import (
    IGNORE_INDEX,
    CheckpointError,
    TrainConfig,
    accumulate_gradients,
    compiled_cross_entropy_sum,
    cross_entropy_sum,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model,
    train,
    validate_checkpoint,
)
from lmstack.train.config import (
    CheckpointConfig,
    EvalConfig,
    LoggingConfig,
    OptimConfig,
    PrecisionConfig,
    ScheduleConfig,
)
from lmstack.train.loop import loss_for
from lmstack.train.optim import param_groups
from lmstack.train.parallel import apply_activation_checkpointing
from lmstack.train.precision import Precision
from lmstack.train.schedule import lr_multiplier, run_progress

GOLDEN = Path(__file__).parent / "golden" / "loss_curve.json"
CORPUS = torch.tensor(list("".join(f"{i} * 7 = {7 * i}; " for i in range(3000)).encode()),
                      dtype=torch.long)


class ArraySource:
    """A stand-in for lmstack.data.TokenStream: random windows of a token array, the position
    being the number of batches drawn (each batch is seeded from (seed, position))."""

    def __init__(self, tokens=CORPUS, batch_size: int = 4, seq_len: int = 32, seed: int = 0):
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        self.position = 0

    def next_batch(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.position)
        starts = torch.randint(0, len(self.tokens) - self.seq_len - 1, (self.batch_size,), generator=g)
        rows = torch.stack([self.tokens[s:s + self.seq_len + 1] for s in starts.tolist()])
        self.position += 1
        return rows[:, :-1], rows[:, 1:].clone()  # (B, T) each

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]




def tiny_model(seed: int = 0) -> Transformer:
    return Transformer.build(ModelConfig.from_preset("tiny-llama"), seed=seed)


def quiet_config(**overrides) -> TrainConfig:
    """A CPU fp32 config with no progress bar, TensorBoard or plot (the slow parts)."""
    cfg = dict(batch_size=4, seq_len=32, max_steps=6, device="cpu", seed=0,
               optim=OptimConfig(lr=3e-3), schedule=ScheduleConfig(warmup_steps=2),
               precision=PrecisionConfig(dtype="fp32"),
               checkpoint=CheckpointConfig(every=3, keep_last=2), eval=EvalConfig(every=3),
               logging=LoggingConfig(progress_bar=False, tensorboard=False, plot=False))
    return TrainConfig(**{**cfg, **overrides})


def val_set(n: int = 2):
    source = ArraySource(seed=99)
    return [source.next_batch() for _ in range(n)]


class Recorder:
    """A hook: keeps every StepStats and one draw from each RNG the checkpoint restores."""

    def __init__(self, crash_at: int | None = None):
        self.stats, self.draws, self.crash_at = [], [], crash_at

    def __call__(self, stats):
        if stats.step == self.crash_at:
            raise KeyboardInterrupt("simulated crash")
        self.stats.append(stats)
        self.draws.append((torch.rand(()).item(), float(np.random.rand()), random.random()))


def run(out_dir=None, resume=False, hooks=(), model=None, **cfg):
    model = model or tiny_model()
    cfg = quiet_config(**cfg)
    source = ArraySource(batch_size=cfg.batch_size, seq_len=cfg.seq_len)
    resume_from = latest_checkpoint(Path(out_dir) / "checkpoints") if resume else None
    result = train(model, source, cfg, out_dir=out_dir, val_batches=val_set(), hooks=hooks,
                   resume_from=resume_from)
    return model, source, result


# ----------------------------------------------------------------------------- exact resume

def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    full = Recorder()
    model_full, source_full, _ = run(hooks=[full])

    crashed = Recorder(crash_at=5)  # dies during step 5; the last checkpoint is step 3
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, hooks=[crashed])
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000003"]
    resumed = Recorder()
    model_res, source_res, result = run(tmp_path, resume=True, hooks=[resumed])

    assert [s.step for s in resumed.stats] == [4, 5, 6]
    stitched = crashed.stats[:3] + resumed.stats
    assert [s.loss for s in stitched] == [s.loss for s in full.stats]  # exact, not approximate
    assert [s.lr for s in stitched] == [s.lr for s in full.stats]
    assert [s.grad_norm for s in stitched] == [s.grad_norm for s in full.stats]
    assert crashed.draws[:3] + resumed.draws == full.draws  # torch, numpy and python RNG
    assert source_res.state_dict() == source_full.state_dict()
    for (name, a), b in zip(model_full.state_dict().items(), model_res.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    assert result.step == 6 and len({s.lr for s in full.stats}) > 3  # the lr really changed


def test_sigkill_while_saving_resumes_from_the_previous_checkpoint(tmp_path):
    """A child process is SIGKILLed half-way through writing its step-4 checkpoint."""
    marker = tmp_path / "writing"
    child = f"""
import sys, time
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).parent)!r})
import torch
import test_train
from lmstack.model import weights
torch.set_num_threads(1)
real_fsync = weights.fsync
def slow_fsync(path):
    real_fsync(path)
    if path.parent.name.startswith(".tmp-step_00000004") and path.name == "model.safetensors":
        Path({str(marker)!r}).touch()
        time.sleep(300)  # killed here: model file written, the rest not
weights.fsync = slow_fsync
test_train.run({str(tmp_path)!r}, checkpoint=test_train.CheckpointConfig(every=2, keep_last=5))
"""
    proc = subprocess.Popen([sys.executable, "-c", child])
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), f"child never reached the step-4 save (exit code {proc.poll()})"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    ckpts = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000002"]
    assert list(ckpts.glob(".tmp-step_00000004-*"))  # the half-written one, under its temp name
    resumed = Recorder()
    _, _, result = run(tmp_path, resume=True, hooks=[resumed],
                       checkpoint=CheckpointConfig(every=2, keep_last=5))
    full = Recorder()
    run(hooks=[full])
    assert [s.step for s in resumed.stats] == [3, 4, 5, 6]
    assert [s.loss for s in resumed.stats] == [s.loss for s in full.stats[2:]]
    assert [p.name for p in list_checkpoints(ckpts)] == [f"step_0000000{i}" for i in (2, 4, 6)]
    assert not list(ckpts.glob(".tmp-*"))  # the next save cleaned up the debris
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the killed run's step 3 and 4 records were replaced


# ----------------------------------------------------------------------------- gradient accumulation

def masked_batches(k: int = 3, batch_size: int = 2, seq_len: int = 16):
    """k micro-batches whose valid (non -100) target counts differ a lot."""
    source = ArraySource(batch_size=batch_size, seq_len=seq_len, seed=5)
    batches = []
    for i in range(k):
        inputs, targets = source.next_batch()
        targets[:, : (1, 6, 12)[i]] = -100  # 1, 6 and 12 of 16 positions masked per row
        batches.append((inputs, targets))
    return batches


def test_accumulating_k_micro_batches_equals_one_k_times_larger_batch():
    micro = masked_batches()
    assert len({int((t != -100).sum()) for _, t in micro}) == 3
    big = (torch.cat([i for i, _ in micro]), torch.cat([t for _, t in micro]))
    fp32 = Precision("fp32", torch.device("cpu"))
    model_a, model_b = tiny_model(), tiny_model()
    loss_a, valid_a = accumulate_gradients(model_a, micro, cross_entropy_sum, fp32)
    loss_b, valid_b = accumulate_gradients(model_b, [big], cross_entropy_sum, fp32)

    assert valid_a == valid_b == int((big[1] != -100).sum())
    assert loss_a == pytest.approx(loss_b, rel=1e-6, abs=1e-6)
    # the naive mean of per-micro-batch means is measurably different: the test can fail
    naive = sum(cross_entropy_sum(tiny_model(), i, t).item() / int((t != -100).sum()) for i, t in micro) / 3
    assert abs(naive - loss_b) > 1e-3
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_clipping_scales_the_gradients_down_to_the_max_norm():
    model = tiny_model()
    fp32 = Precision("fp32", torch.device("cpu"))
    accumulate_gradients(model, masked_batches(), cross_entropy_sum, fp32)
    params = list(model.parameters())
    norm = fp32.step(torch.optim.SGD(params, lr=0.0), params, max_norm=0.1)
    after = torch.nn.utils.get_total_norm([p.grad for p in params]).item()
    assert norm > 0.5 and after == pytest.approx(0.1, rel=1e-4)


class ListSource(ArraySource):
    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def next_batch(self):
        self.position += 1
        return self.batches[self.position - 1]


def test_train_step_with_grad_accum_reports_the_big_batch_loss():
    micro = masked_batches()
    big = (torch.cat([i for i, _ in micro]), torch.cat([t for _, t in micro]))
    cfg = dict(max_steps=1, batch_size=2, seq_len=16, eval=EvalConfig(every=0))
    accum = train(tiny_model(), ListSource(micro), quiet_config(grad_accum=3, **cfg))
    single = train(tiny_model(), ListSource([big]), quiet_config(**{**cfg, "batch_size": 6}))
    assert accum.losses[0] == pytest.approx(single.losses[0], rel=1e-5)


def test_fused_projections_train_like_separate_ones():
    """fused_projections swaps kernels.FUSED in: the same losses step by step, the same
    parameter names, and q/k/v run as one product."""
    cfg = dict(max_steps=3, batch_size=2, seq_len=16, eval=EvalConfig(every=0))
    plain, fused = tiny_model(), tiny_model()
    a = train(plain, ListSource(masked_batches()), quiet_config(**cfg))
    b = train(fused, ListSource(masked_batches()), quiet_config(fused_projections=True, **cfg))
    assert b.losses == pytest.approx(a.losses, rel=1e-5)
    assert type(fused.layers[0].self_attn.qkv).__name__ == "FusedFanout"
    assert list(fused.state_dict()) == list(plain.state_dict())


# ----------------------------------------------------------------------------- golden curve

def test_golden_loss_curve():
    stats = Recorder()
    run(hooks=[stats], max_steps=20, grad_accum=2,
        schedule=ScheduleConfig(warmup_steps=5, kind="cosine"))
    losses = [s.loss for s in stats.stats]
    if os.environ.get("LMSTACK_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({
            "about": "first 20 train losses of tests/test_train.py::test_golden_loss_curve "
                     "(tiny-llama, seed 0, fp32, CPU, 1 thread)",
            "regenerate": "LMSTACK_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_train.py -k golden",
            "losses": losses}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())["losses"]
    assert len(losses) == len(golden) == 20
    assert losses == pytest.approx(golden, rel=1e-4)
    assert losses[-1] < losses[0] - 1.0  # and it does learn


# ----------------------------------------------------------------------------- bad input

def test_seq_len_longer_than_the_context_is_rejected():
    with pytest.raises(ValueError, match=r"--train.seq-len=256 .*max_seq_len=128"):
        run(seq_len=256)


def test_invalid_config_names_the_flag():
    with pytest.raises(ValueError, match="--train.optim.lr"):
        OptimConfig(lr=-1)
    with pytest.raises(ValueError, match="train.max_steps or train.max_time_s"):
        TrainConfig(max_steps=None)
    cfg = quiet_config()
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match=r"unknown TrainConfig fields \[.lr.\]"):
        TrainConfig.from_dict({"lr": 1.0})
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        Precision("fp16", torch.device("cpu"))


def test_damaged_checkpoints_give_clear_errors(tmp_path):
    run(tmp_path, max_steps=6)  # checkpoints at 3 and 6
    ckpts = tmp_path / "checkpoints"
    newest = ckpts / "step_00000006"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    with pytest.raises(CheckpointError, match=r"step_00000006/model.safetensors is corrupted"):
        load_checkpoint(newest, tiny_model())
    with pytest.warns(UserWarning, match="skipping checkpoint step_00000006"):
        assert latest_checkpoint(ckpts).name == "step_00000003"

    older = ckpts / "step_00000003"
    (older / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match=r"step_00000003/config.json is not valid JSON"):
        validate_checkpoint(older)
    (older / "trainer_state.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"step_00000003 is missing trainer_state.json"):
        validate_checkpoint(older)
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        validate_checkpoint(ckpts / "step_00000099")
    with pytest.warns(UserWarning):
        assert latest_checkpoint(ckpts) is None


def test_checkpoint_for_another_model_is_refused(tmp_path):
    run(tmp_path, max_steps=3)
    other = Transformer.build(ModelConfig.from_preset("tiny-llama", n_layers=1))
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_checkpoint(tmp_path / "checkpoints" / "step_00000003", other)


# ----------------------------------------------------------------------------- pieces of the loop

def test_schedules_warm_up_then_decay_to_the_floor():
    cos = ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert [lr_multiplier(cos, s, 0.0) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert lr_multiplier(cos, 10, 0.0) == 1.0
    assert lr_multiplier(cos, 50, 0.5) == pytest.approx(0.55)
    assert lr_multiplier(cos, 99, 1.0) == pytest.approx(0.1)
    wsd = ScheduleConfig(kind="wsd", warmup_steps=10, min_lr_ratio=0.0, decay_frac=0.2)
    assert lr_multiplier(wsd, 50, 0.8) == 1.0  # stable until the last 20%
    assert lr_multiplier(wsd, 50, 0.9) == pytest.approx(0.5)
    assert lr_multiplier(wsd, 50, 1.0) == pytest.approx(0.0)
    steps = TrainConfig(max_steps=110, schedule=cos)
    assert run_progress(steps, 10, 0.0) == 0.0 and run_progress(steps, 60, 0.0) == 0.5
    timed = TrainConfig(max_steps=None, max_time_s=100.0, schedule=cos)
    assert run_progress(timed, 10_000, 25.0) == 0.25  # a time budget: progress is elapsed time


def test_weight_decay_only_on_matrices_and_only_trainable_params():
    model = tiny_model()
    model.layers[0].requires_grad_(False)  # frozen like a LoRA base
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    frozen = {id(p) for p in model.layers[0].parameters()}
    chosen = {id(p) for p in decay["params"] + no_decay["params"]}
    assert not frozen & chosen
    assert len(chosen) == len([p for p in model.parameters() if p.requires_grad])


def test_frozen_parameters_do_not_move():
    model = tiny_model()
    model.embed_tokens.requires_grad_(False)
    before = model.embed_tokens.weight.clone()
    head = model.lm_head.weight.clone()
    train(model, ArraySource(), quiet_config(max_steps=2))
    assert torch.equal(model.embed_tokens.weight, before)
    assert not torch.equal(model.lm_head.weight, head)


def test_activation_checkpointing_gives_the_same_gradients():
    inputs, targets = ArraySource().next_batch()
    plain, recomputed = tiny_model(), tiny_model()
    apply_activation_checkpointing(recomputed)
    assert list(recomputed.state_dict()) == list(plain.state_dict())  # names unchanged
    for model in (plain, recomputed):
        cross_entropy_sum(model, inputs, targets).backward()
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_bf16_autocast_trains_on_cpu_close_to_fp32():
    fp32 = Recorder()
    run(hooks=[fp32], max_steps=3, eval=EvalConfig(every=0))
    bf16 = Recorder()
    run(hooks=[bf16], max_steps=3, eval=EvalConfig(every=0), precision=PrecisionConfig(dtype="bf16"))
    assert [s.loss for s in bf16.stats] == pytest.approx([s.loss for s in fp32.stats], rel=2e-2)
    assert [s.loss for s in bf16.stats] != [s.loss for s in fp32.stats]  # bf16 really ran


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])  # gpt2: biases, tied head
@pytest.mark.parametrize("checkpointed", [False, True])
def test_cpu_bf16_linear_matches_plain_autocast(preset, checkpointed):
    """The fast-layout bf16 linear (used on CPUs without native bf16) computes the same
    products as autocast's own linear: same loss, gradients equal up to bf16 summation order."""
    inputs, targets = ArraySource().next_batch()
    grads, fns = [], []
    for fast in (False, True):
        model = Transformer.build(ModelConfig.from_preset(preset), seed=0)
        if checkpointed:
            apply_activation_checkpointing(model)
        precision = Precision("bf16", torch.device("cpu"))
        precision.cpu_bf16_linear = fast
        with precision.autocast():
            logits = model(inputs)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        fns.append(logits.grad_fn.name())
        precision.backward(loss)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert fns[0] != "_Bf16LinearBackward" and fns[1] == "_Bf16LinearBackward"
    for name, plain in grads[0].items():
        assert grads[1][name].dtype == torch.float32
        torch.testing.assert_close(grads[1][name], plain, rtol=2e-2, atol=2e-3, msg=name)


def test_time_budget_stops_the_run():
    stats = Recorder()
    run(hooks=[stats], max_steps=None, max_time_s=0.3, eval=EvalConfig(every=0))
    assert stats.stats and stats.stats[-1].elapsed_s >= 0.3
    assert all(s.elapsed_s < 0.3 for s in stats.stats[:-1])


def test_metrics_tensorboard_plot_mfu_and_keep_last(tmp_path):
    logging = LoggingConfig(progress_bar=True, tensorboard=True, plot=True, peak_flops=1e12)
    stats = Recorder()
    run(tmp_path, hooks=[stats], max_steps=4, logging=logging,
        checkpoint=CheckpointConfig(every=1, keep_last=2), eval=EvalConfig(every=2))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["val_loss"] is not None for r in records] == [False, True, False, True]
    assert records[-1]["val_ppl"] == pytest.approx(math.exp(records[-1]["val_loss"]), rel=1e-6)
    model = tiny_model()
    expected_mfu = stats.stats[0].tokens_per_s * model.flops_per_token(32) / 1e12
    assert records[0]["mfu"] == pytest.approx(expected_mfu, rel=1e-6)
    assert records[0]["tokens"] == 4 * 32 and records[-1]["tokens_seen"] == 4 * 4 * 32
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000003",
                                                                           "step_00000004"]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_on_cuda_learns_and_checkpoints_the_scaler(tmp_path, dtype):
    stats = Recorder()
    run(tmp_path, hooks=[stats], model=tiny_model().cuda(), max_steps=6, device="cuda",
        precision=PrecisionConfig(dtype=dtype))
    losses = [s.loss for s in stats.stats]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    state = json.loads((tmp_path / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert bool(state["scaler"]) == (dtype == "fp16")  # a GradScaler only for fp16
    resumed = Recorder()
    run(tmp_path, resume=True, hooks=[resumed], model=tiny_model().cuda(), max_steps=8,
        device="cuda", precision=PrecisionConfig(dtype=dtype))
    assert [s.step for s in resumed.stats] == [7, 8]


@pytest.mark.gpu
@needs_cuda
def test_compiled_blocks_train_like_eager_on_cuda():
    eager, compiled = Recorder(), Recorder()
    run(hooks=[eager], model=tiny_model().cuda(), max_steps=3, device="cuda")
    run(hooks=[compiled], model=tiny_model().cuda(), max_steps=3, device="cuda", compile=True,
        activation_checkpointing=True)
    assert [s.loss for s in compiled.stats] == pytest.approx([s.loss for s in eager.stats], rel=1e-3)


# ----------------------------------------------------------------------------- the commands

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"doc{i}.txt").write_text("".join(f"{j} plus {i} is {i + j}.\n" for j in range(200)))
    prepare([corpus], root / "prepared", vocab_size=300, val_fraction=0.1, progress=False,
            num_workers=1)
    return root / "prepared"


def pretrain_flags(data_dir, out, *extra):
    return ["--data", str(data_dir), "--out", str(out), "--model.preset", "tiny-llama",
            "--train.max-steps", "4", "--train.batch-size", "4", "--train.seq-len", "32",
            "--train.eval.every", "2", "--train.eval.batches", "2", "--train.checkpoint.every", "2",
            "--train.device", "cpu", "--train.logging.progress-bar", "false",
            "--train.logging.tensorboard", "false", *extra]


def test_pretrain_resume_and_sample_commands(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain_cli.main(pretrain_flags(data_dir, out)) == 0
    printed = capsys.readouterr().out
    assert "step 4: train loss" in printed and "val perplexity" in printed
    for name in ("hf/config.json", "hf/model.safetensors", "hf/tokenizer.json", "loss_curve.png",
                 "tokenizer/tokenizer.json", "run_config.json", "checkpoints/step_00000004"):
        assert (out / name).exists(), name

    # the HF export holds the final weights
    ckpt_model = load_model(out / "checkpoints" / "step_00000004")
    hf_model = load_hf(out / "hf")
    tokens = torch.arange(10)[None]
    torch.testing.assert_close(hf_model(tokens), ckpt_model(tokens), rtol=1e-5, atol=1e-5)

    # the same --out again: refused unless --resume; with it, training continues at step 5
    assert pretrain_cli.main(pretrain_flags(data_dir, out)) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert pretrain_cli.main(pretrain_flags(data_dir, out, "--train.max-steps", "6", "--resume")) == 0
    assert "resuming from" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]

    assert sample_cli.main([str(out), "--prompt", "3 plus", "--max-new-tokens", "8",
                            "--temperature", "0", "--num-samples", "2"]) == 0
    first, second = capsys.readouterr().out.split("-" * 40 + "\n")
    assert first.startswith("3 plus") and first == second  # greedy: both samples agree


def test_pretrain_command_rejects_a_too_long_seq_len(data_dir, tmp_path, capsys):
    flags = pretrain_flags(data_dir, tmp_path / "run", "--train.seq-len", "256")
    assert pretrain_cli.main(flags) == 2
    assert "--train.seq-len=256 is longer than the model's context (max_seq_len=128)" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_config_file_sits_between_defaults_and_flags(tmp_path, suffix):
    text = {".toml": 'data = "d"\n[train]\nmax_steps = 7\nseq_len = 64\n[train.optim]\nlr = 0.002\n'
                     '[model]\npreset = "tiny-llama"\noverrides = {n_layers = 1}\n',
            ".yaml": "data: d\ntrain:\n  max_steps: 7\n  seq_len: 64\n  optim:\n    lr: 0.002\n"
                     "model:\n  preset: tiny-llama\n  overrides: {n_layers: 1}\n"}[suffix]
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    args = pretrain_cli.parse_args(["--train.seq-len", "32", "--config", str(path)])
    assert args.train.max_steps == 7 and args.train.optim.lr == 0.002  # from the file
    assert args.train.seq_len == 32  # the flag wins, even given before --config
    assert args.train.batch_size == TrainConfig().batch_size  # untouched default
    assert args.model.preset == "tiny-llama" and args.model.overrides == {"n_layers": 1}
    path.write_text(text.replace("0.002", "-1"))
    with pytest.raises(ValueError, match="--train.optim.lr=-1"):
        pretrain_cli.parse_args(["--config", str(path)])
    path.write_text(text + ("[train.logging]\nbogus = 1\n" if suffix == ".toml" else "bogus: 1\n"))
    with pytest.raises(ValueError, match=r"unknown setting '(train\.logging\.)?bogus'"):
        pretrain_cli.parse_args(["--config", str(path)])


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_on_cpu():
    """torch.compile (inductor, C++ on CPU) per block, with activation checkpointing, keeps the
    losses of eager mode: the option is real on the machine where the tests run."""
    eager, compiled = Recorder(), Recorder()
    run(hooks=[eager], max_steps=3)
    model, _, _ = run(hooks=[compiled], max_steps=3, compile=True, activation_checkpointing=True)
    assert all(block._compiled_call_impl is not None for block in model.layers)
    assert [s.loss for s in compiled.stats] == pytest.approx([s.loss for s in eager.stats], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_compiled_cross_entropy_matches_eager_loss_and_gradients(dtype):
    """The loss the loop runs under compile: same sum and same gradients as the eager one, with
    ignored targets in the batch, in fp32 and under bf16 autocast (bf16 logits cast inside)."""
    assert loss_for(cross_entropy_sum, quiet_config(compile=True)) is compiled_cross_entropy_sum
    assert loss_for(cross_entropy_sum, quiet_config()) is cross_entropy_sum
    custom = lambda model, inputs, targets: cross_entropy_sum(model, inputs, targets)  # noqa: E731
    assert loss_for(custom, quiet_config(compile=True)) is custom
    inputs, targets = val_set()[0]
    targets = targets.clone()
    targets[0, :5] = targets[1, -3:] = IGNORE_INDEX
    precision = Precision(dtype, torch.device("cpu"))
    results = []
    for loss_fn in (cross_entropy_sum, compiled_cross_entropy_sum):
        model = tiny_model()
        with precision.autocast():
            loss = loss_fn(model, inputs, targets)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (eager, eager_grads), (compiled, compiled_grads) = results
    assert compiled.dtype == torch.float32
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=0)
    # bf16 gradients may round differently by an ulp or two (bf16: 8 bits of mantissa), as they
    # do where bf16 linears run through CpuBf16Linear (CPUs without native bf16)
    rtol, atol = (1e-4, 1e-6) if dtype == "fp32" else (1e-2, 1e-5)
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


_FAULTS_SCRIPT = """
import resource, sys, torch
from lmstack.train import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def one_round():  # a step's pattern: large tensors freed out of order, a larger one after;
    # above 32 MiB, the most that glibc's default ever serves from the heap
    a, b = torch.ones(10 << 20), torch.ones(9 << 20)
    del a
    c = torch.ones(12 << 20)
    del b, c
for _ in range(3):  # the heap's layout settles over the first rounds
    one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    one_round()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_keep_freed_memory_stops_page_faults_on_reused_buffers():
    """With keep_freed_memory the same large buffers are served again from kept pages; by
    default glibc returns them to the OS and each 4 KiB page faults in again. Each setting runs
    in a fresh process (malloc settings are process-wide and sticky)."""
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], check=True,
                             capture_output=True, text=True)
        return int(out.stdout.split()[-1])

    default, kept = faults("default"), faults("keep")
    assert kept * 5 < default, f"page faults: {kept} kept vs {default} by default"


@pytest.mark.parametrize("native", [False, True])
def test_auto_precision_picks_bf16_only_where_the_cpu_has_native_bf16(native, monkeypatch):
    import lmstack.train.precision as precision

    monkeypatch.setattr(precision, "NATIVE_CPU_BF16", native)
    assert precision.resolve_dtype("auto", torch.device("cpu")) == ("bf16" if native else "fp32")
