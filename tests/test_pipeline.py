"""Pipeline parallelism (lmstack.train.pipeline): the stages chained equal the model, and
2 stages under torchrun (gloo, CPU) train like one process, GPipe and 1F1B, with masked
targets and microbatches that need padding rows, and their sharded checkpoints resume in one
process; too many stages fail on every rank.

Launched runs are judged by the result files each rank writes, not by torchrun's exit code
alone: gloo sometimes aborts at teardown after the work is done.

This file is also the ranks' program: `torchrun ... tests/test_pipeline.py SPEC.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from test_train import ArraySource, ListSource, quiet_config  # noqa: E402

from lmstack.model import ModelConfig, Transformer  # noqa: E402
from lmstack.train import distributed, train  # noqa: E402
from lmstack.train.config import CheckpointConfig, EvalConfig, OptimConfig, ParallelConfig  # noqa: E402
from lmstack.train.optim import make_optimizer  # noqa: E402
from lmstack.train.pipeline import split_stage, stage_layers  # noqa: E402

STEPS = 10
LAUNCH_TIMEOUT_S = 240


def model_config(n_layers: int = 3) -> ModelConfig:
    return ModelConfig.from_preset("tiny-llama", n_layers=n_layers)


def step_batches(batch_size: int, grad_accum: int, seed: int = 7) -> list:
    """STEPS x grad_accum micro-batches with a different number of masked targets in each row."""
    source = ArraySource(batch_size=batch_size, seq_len=16, seed=seed)
    batches = []
    for i in range(STEPS * grad_accum):
        inputs, targets = source.next_batch()
        for row in range(batch_size):
            targets[row, : (3 * i + 5 * row) % 15] = -100
        batches.append((inputs, targets))
    return batches


ADAM_EPS = 1e-6
"""Adam's eps in the parity runs. Where a gradient element is near 0, AdamW's step moves its
weight by up to lr / eps per unit of gradient: with eps 1e-8 a 1e-10 rounding difference between
reduction orders (a TP shard's partial sums) moves it by ~1e-5, the tolerance; 1e-6 keeps that
near 1e-7."""


def run_config(spec: dict):
    cfg = quiet_config(batch_size=spec["batch_size"], grad_accum=spec["grad_accum"], seq_len=16,
                       max_steps=STEPS, eval=EvalConfig(every=5),
                       checkpoint=CheckpointConfig(every=spec.get("checkpoint_every", 3), keep_last=2),
                       activation_checkpointing=spec.get("activation_checkpointing", False),
                       parallel=ParallelConfig(**spec.get("parallel", {})))
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, eps=ADAM_EPS))


def run(spec: dict, mesh=None, out_dir=None, resume_from=None):
    """The run a spec describes: (model, losses, grad norms, val loss). Under a mesh the model
    is distributed.build_model's and each data-parallel rank reads its rows of every batch. A
    resumed single-process run starts from other weights (seed 1): the checkpoint must replace them."""
    cfg = run_config(spec)
    if mesh is None:
        model = Transformer.build(model_config(spec["n_layers"]), seed=1 if resume_from else 0)
    else:
        model = distributed.build_model(model_config(spec["n_layers"]), cfg, mesh, torch.device("cpu"))
    rank, size = distributed.dp_rank(mesh), distributed.dp_size(mesh)

    def rows(batches):
        return [tuple(t.chunk(size)[rank] for t in batch) for batch in batches]

    norms = []
    result = train(model, ListSource(rows(step_batches(spec["batch_size"], spec["grad_accum"]))),
                   cfg, val_batches=rows(step_batches(spec["batch_size"], 1, seed=9)[:3]),
                   hooks=[lambda stats: norms.append(stats.grad_norm)], mesh=mesh, out_dir=out_dir,
                   resume_from=resume_from)
    return model, result.losses, norms, result.val_loss


# ----------------------------------------------------------------------------- launched ranks

RUNS = {
    # 4 rows, 2 microbatches of 2
    "gpipe": {"n_layers": 3, "batch_size": 4, "grad_accum": 1,
              "parallel": {"pp": 2, "pp_schedule": "gpipe", "microbatches": 2}},
    # 3 x 2 = 6 rows, 4 microbatches: 2 padding rows (evaluation: 3 rows padded to 8)
    "1f1b-padded": {"n_layers": 3, "batch_size": 3, "grad_accum": 2,
                    "parallel": {"pp": 2, "pp_schedule": "1f1b", "microbatches": 4}},
    # the same with each block's activations recomputed in backward
    "1f1b-recompute": {"n_layers": 3, "batch_size": 3, "grad_accum": 2, "activation_checkpointing": True,
                       "parallel": {"pp": 2, "pp_schedule": "1f1b", "microbatches": 4}},
    "too-many-stages": {"n_layers": 1, "batch_size": 2, "grad_accum": 1,
                        "parallel": {"pp": 2, "pp_schedule": "gpipe"}},
    # a sharded checkpoint every 5 steps (each stage writes its part)
    "checkpointed": {"n_layers": 2, "batch_size": 2, "grad_accum": 1, "out_dir": True,
                     "checkpoint_every": 5, "parallel": {"pp": 2, "pp_schedule": "gpipe"}},
}


def rank_main(spec_path: str) -> None:
    """One rank: each run of the spec on the mesh, one after another; for each, write
    <run>-rank<R>.json and the weights this rank trained (<run>-weights<R>.safetensors: under
    pp > 1 build_model's stage, all that the rank holds)."""
    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    distributed.init_distributed(torch.device("cpu"))
    rank = distributed.rank()
    for name, run_spec in spec["runs"].items():
        try:
            mesh = distributed.build_mesh(run_config(run_spec).parallel)
            model, losses, norms, val_loss = run(run_spec, mesh,
                                                 out / name if run_spec.get("out_dir") else None)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                      out / f"{name}-weights{rank}.safetensors")
            record = {"losses": losses, "grad_norms": norms, "val_loss": val_loss}
        except Exception as e:  # every rank reports what it raised
            record = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        (out / f"{name}-rank{rank}.json").write_text(json.dumps(record))
    distributed.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    """One torchrun launch of 2 ranks (one stage each) running every run of RUNS: one start-up
    of the processes for all the tests that read its results."""
    out = tmp_path_factory.mktemp("pipeline")
    (out / "spec.json").write_text(json.dumps({"out": str(out), "runs": RUNS}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
           "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
           __file__, str(out / "spec.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    (out / "torchrun.log").write_text(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return out


def records(out: Path, name: str, nproc: int = 2) -> list[dict]:
    """Every rank's record of run `name` (the test fails naming the rank that wrote none)."""
    found = []
    for rank in range(nproc):
        path = out / f"{name}-rank{rank}.json"
        assert path.is_file(), (f"rank {rank} wrote no result for {name}:\n"
                                f"{(out / 'torchrun.log').read_text()[-3000:]}")
        found.append(json.loads(path.read_text()))
    return found


def rank_weights(out: Path, name: str, rank: int) -> dict[str, torch.Tensor]:
    return load_file(out / f"{name}-weights{rank}.safetensors")


def merged_weights(out: Path, name: str, nproc: int = 2) -> dict[str, torch.Tensor]:
    """The stages' weights as one state_dict."""
    weights = {}
    for rank in range(nproc):
        stage = rank_weights(out, name, rank)
        assert not set(stage) & set(weights)  # the stages' names are disjoint
        weights.update(stage)
    return weights


def assert_same_run(ranks: list[dict], spec: dict) -> dict[str, torch.Tensor]:
    """Every rank logged the single-process run's losses, gradient norms and validation loss;
    returns that run's final weights."""
    for rank, record in enumerate(ranks):
        assert "error" not in record, f"rank {rank}: {record.get('traceback')}"
    model, losses, norms, val_loss = run({**spec, "parallel": {}})
    for record in ranks:
        assert record["losses"] == pytest.approx(losses, abs=1e-5, rel=0)
        assert record["grad_norms"] == pytest.approx(norms, abs=1e-5, rel=1e-5)
        assert record["val_loss"] == pytest.approx(val_loss, abs=1e-5, rel=0)
    assert max(norms) > 1.0  # clipping was active: the ranks agreed on the global norm
    return model.state_dict()


def assert_close_weights(weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(weights) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=1e-5, msg=key)


# ----------------------------------------------------------------------------- in one process

def test_layers_split_evenly_earlier_stages_one_longer():
    assert [list(stage_layers(7, 3, s)) for s in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [list(stage_layers(2, 2, s)) for s in range(2)] == [[0], [1]]
    with pytest.raises(ValueError, match=r"--train.parallel.pp=3 pipeline stages exceed the "
                                         r"model's 2 layers"):
        stage_layers(2, 3, 0)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_stages_chained_are_the_model(preset):
    """Stage by stage, with the model's own modules under the model's names."""
    config = ModelConfig.from_preset(preset, n_layers=3, tie_embeddings=False)
    model = Transformer.build(config, seed=0)
    stages = [split_stage(model, 3, s) for s in range(3)]
    tokens = torch.randint(0, config.vocab_size, (2, 12))
    x = tokens
    for stage in stages:
        x = stage(x)
    torch.testing.assert_close(x, model(tokens), rtol=0, atol=0)
    names = [name for stage in stages for name in stage.state_dict()]
    assert sorted(names) == sorted(model.state_dict())
    assert stages[1].embed_tokens is None and stages[1].lm_head is None
    assert list(stages[2].layers) == ["2"]


def test_stage_optimizers_number_their_state_as_one_process_does():
    model = Transformer.build(model_config(3), seed=0)
    single = make_optimizer(model, OptimConfig())
    single_order = [p for group in single.param_groups for p in group["params"]]
    positions = []
    for s in range(3):
        stage = split_stage(model, 3, s)
        optimizer = make_optimizer(stage, OptimConfig())
        stage_order = [p for group in optimizer.param_groups for p in group["params"]]
        mine = stage.optimizer_positions(optimizer)
        assert all(single_order[i] is p for i, p in zip(mine, stage_order, strict=True))
        positions += mine
    assert sorted(positions) == list(range(len(single_order)))


def test_tied_embeddings_are_refused():
    model = Transformer.build(ModelConfig.from_preset("tiny-gpt2"), seed=0)  # tied
    with pytest.raises(ValueError, match="needs untied embeddings"):
        split_stage(model, 2, 0)


def test_pipeline_flags_are_checked():
    with pytest.raises(ValueError, match=r"--train.parallel.microbatches=1 .*1f1b needs at least"):
        ParallelConfig(pp=2, microbatches=1)
    with pytest.raises(ValueError, match=r"--train.parallel.pp-schedule='zb'"):
        ParallelConfig(pp=2, pp_schedule="zb")
    assert ParallelConfig(pp=2, pp_schedule="gpipe", microbatches=1).pp_microbatches == 1
    with pytest.raises(ValueError, match="needs a torchrun launch"):
        run({"n_layers": 2, "batch_size": 2, "grad_accum": 1, "parallel": {"pp": 2}})


# ----------------------------------------------------------------------------- 2 stages, torchrun

@pytest.mark.parametrize("name", ["gpipe", "1f1b-padded", "1f1b-recompute"])
def test_two_stages_train_like_one_process(launched, name):
    """10 steps, the same global batch: every rank logs the same losses, gradient norms
    (clipped globally) and validation loss as one process; the stages end with its weights."""
    expected = assert_same_run(records(launched, name), RUNS[name])
    assert_close_weights(merged_weights(launched, name), expected)


def test_more_stages_than_layers_fail_on_every_rank(launched):
    for record in records(launched, "too-many-stages"):
        assert "--train.parallel.pp=2 pipeline stages exceed the model's 1 layers" in record["error"]


def test_a_checkpoint_of_stages_resumes_in_one_process(launched):
    """The stages' sharded checkpoint at step 5 holds the whole model and its optimizer state
    (numbered as one process numbers it): 5 more steps in one process give the last 5 steps
    of the uninterrupted single-process run, and its final weights."""
    spec = RUNS["checkpointed"]
    expected = assert_same_run(records(launched, "checkpointed"), spec)
    steps = sorted((launched / "checkpointed" / "checkpoints").glob("step_*"))
    assert [p.name for p in steps] == ["step_00000005", "step_00000010"]
    _, losses, _, _ = run({**spec, "parallel": {}})
    model = Transformer.build(model_config(spec["n_layers"]), seed=1)  # the checkpoint overwrites it
    result = train(model, ListSource(step_batches(spec["batch_size"], spec["grad_accum"])),
                   run_config({**spec, "parallel": {}}), resume_from=steps[0],
                   val_batches=step_batches(spec["batch_size"], 1, seed=9)[:3])
    assert result.losses == pytest.approx(losses[5:], abs=1e-5, rel=0)
    assert_close_weights(model.state_dict(), expected)


if __name__ == "__main__":
    rank_main(sys.argv[1])
