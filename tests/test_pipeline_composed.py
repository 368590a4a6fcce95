"""Pipeline stages composed with data and tensor parallelism (lmstack.train.pipeline +
distributed): one torchrun launch of 4 gloo ranks on (pp=2) x (dp=2 or tp=2) meshes, against
single-process runs.

  * PP2 x FSDP2 (dp-shard 2), PP2 x dp-replicate 2 and PP2 x TP2: each dp group reads its rows
    of the global batch; per-step losses, global grad norms (clipping active), validation
    losses and final weights match one process within 1e-5 (fp32). PP x TP x DP is refused.
  * A sharded checkpoint of PP2 x FSDP2 at step 5 resumes under PP2 x dp-replicate 2 (in the
    launch) and in one process (here), each giving the uninterrupted run.
  * Stage-only construction: on an 8-layer model each rank holds its stage's parameters alone
    (at most 0.6x the whole model's bytes, dp-replicate; half that again sharded), and they
    equal `Transformer.build(config, seed=0)`'s exactly.

As in test_pipeline.py the ranks write result files the tests judge (gloo can abort at
teardown), the launch under a timeout. This file is also the ranks' program.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline import (  # noqa: E402
    assert_close_weights,
    assert_same_run,
    free_port,
    model_config,
    records,
    run,
    run_config,
)

from lmstack.model import Transformer  # noqa: E402
from lmstack.train import distributed  # noqa: E402
from lmstack.train.pipeline import StageModule  # noqa: E402

NPROC = 4
LAUNCH_TIMEOUT_S = 420
BIG_LAYERS = 8  # the stage-only memory check: most bytes sit in the blocks

RUNS = {
    # 4 global rows x 2 micro-batches; each dp rank 2 x 2 = 4 rows in 2 pipeline microbatches
    "pp-fsdp": {"n_layers": 3, "batch_size": 4, "grad_accum": 2, "out_dir": True, "checkpoint_every": 5,
                "parallel": {"pp": 2, "dp_shard": 2, "pp_schedule": "1f1b", "microbatches": 2}},
    # 3 rows per dp rank in 2 microbatches: one padding row on each
    "pp-replicate": {"n_layers": 3, "batch_size": 6, "grad_accum": 1,
                     "parallel": {"pp": 2, "dp_replicate": 2, "pp_schedule": "gpipe", "microbatches": 2}},
    # pp-fsdp's step-5 checkpoint, resumed with whole weights per replica
    "resumed-replicate": {"n_layers": 3, "batch_size": 4, "grad_accum": 2, "resume": "pp-fsdp",
                          "parallel": {"pp": 2, "dp_replicate": 2, "pp_schedule": "1f1b",
                                       "microbatches": 2}},
    # tensor + sequence parallel inside each stage: stages pass (B, T / 2, C) slices
    "pp-tp": {"n_layers": 3, "batch_size": 4, "grad_accum": 2,
              "parallel": {"pp": 2, "tp": 2, "pp_schedule": "1f1b", "microbatches": 2}},
}
BUILDS = {"stage-replicate": {"pp": 2, "dp_replicate": 2}, "stage-shard": {"pp": 2, "dp_shard": 2}}


def whole(model) -> dict[str, torch.Tensor]:
    """This rank's stage with every DTensor gathered (a collective over its dp group)."""
    return {k: v.contiguous() for k, v in distributed.full_tensors(model.state_dict()).items()}


def local_param_bytes(model) -> int:
    def local(p):
        return p.to_local() if isinstance(p, DTensor) else p
    return sum(local(p).numel() * local(p).element_size() for p in model.parameters())


# ----------------------------------------------------------------------------- launched ranks

def rank_main(spec_path: str) -> None:
    """One rank: the stage-only builds, then each run; writes <name>-rank<R>.json and the
    weights of its stage gathered whole (<name>-weights<R>.safetensors)."""
    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    distributed.init_distributed(torch.device("cpu"))
    rank = distributed.rank()
    jobs = [(name, "build", {"n_layers": BIG_LAYERS, "batch_size": 4, "grad_accum": 1, "parallel": p})
            for name, p in BUILDS.items()] + [(name, "run", s) for name, s in RUNS.items()]
    for name, kind, job in jobs:
        try:
            mesh = distributed.build_mesh(run_config(job).parallel)
            record = {"pp_rank": mesh["pp"].get_local_rank(), "dp_rank": distributed.dp_rank(mesh)}
            if kind == "build":
                model = distributed.build_model(model_config(BIG_LAYERS), run_config(job), mesh,
                                                torch.device("cpu"))
                record.update(stage=isinstance(model, StageModule), param_bytes=local_param_bytes(model))
            else:
                resume = job.get("resume")
                ckpt = out / resume / "checkpoints" / "step_00000005" if resume else None
                model, losses, norms, val_loss = run(job, mesh, out / name if job.get("out_dir") else None,
                                                     resume_from=ckpt)
                record.update(losses=losses, grad_norms=norms, val_loss=val_loss)
            save_file(whole(model), out / f"{name}-weights{rank}.safetensors")
        except Exception as e:  # every rank reports what it raised
            record = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        (out / f"{name}-rank{rank}.json").write_text(json.dumps(record))
    distributed.shutdown()


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    """One torchrun launch of 4 ranks, (pp=2) x (dp=2), running every build and run."""
    out = tmp_path_factory.mktemp("pipeline_composed")
    (out / "spec.json").write_text(json.dumps({"out": str(out)}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
           str(NPROC), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
           __file__, str(out / "spec.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    (out / "torchrun.log").write_text(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return out


def stage_weights(out: Path, name: str) -> list[dict[str, torch.Tensor]]:
    """Per pp stage, its weights; every dp rank of a stage holds the same ones."""
    found = records(out, name, NPROC)
    stages: dict[int, dict[str, torch.Tensor]] = {}
    for rank, record in enumerate(found):
        assert "error" not in record, f"rank {rank}: {record.get('traceback')}"
        weights = load_file(out / f"{name}-weights{rank}.safetensors")
        first = stages.setdefault(record["pp_rank"], weights)
        assert sorted(first) == sorted(weights)
        for key, value in weights.items():  # the dp ranks' replicas agree exactly
            torch.testing.assert_close(value, first[key], rtol=0, atol=0, msg=key)
    assert sorted(stages) == [0, 1]
    return [stages[0], stages[1]]


def merged(stages: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    assert not set(stages[0]) & set(stages[1])  # the stages' names are disjoint
    return {**stages[0], **stages[1]}


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("name", ["pp-fsdp", "pp-replicate", "pp-tp"])
def test_stages_with_data_parallel_train_like_one_process(launched, name):
    """10 steps of the same global batch: every rank logs the single-process losses, grad
    norms (the global norm over both stages and every shard: clipping agrees) and validation
    losses; the stages end with its weights, the same on every dp rank."""
    expected = assert_same_run(records(launched, name, NPROC), RUNS[name])
    assert_close_weights(merged(stage_weights(launched, name)), expected)


def test_a_pp_fsdp_checkpoint_resumes_on_other_layouts(launched):
    """pp-fsdp's step-5 checkpoint, resumed under pp2 x dp-replicate 2 and in one process:
    both give the last 5 single-process losses and its final weights."""
    spec = RUNS["pp-fsdp"]
    expected = assert_same_run(records(launched, "pp-fsdp", NPROC), spec)
    steps = sorted((launched / "pp-fsdp" / "checkpoints").glob("step_*"))
    assert [p.name for p in steps] == ["step_00000005", "step_00000010"]
    _, losses, norms, _ = run({**spec, "parallel": {}})
    for record in records(launched, "resumed-replicate", NPROC):
        assert "error" not in record, record.get("traceback")
        assert record["losses"] == pytest.approx(losses[5:], abs=1e-5, rel=0)
        assert record["grad_norms"] == pytest.approx(norms[5:], abs=1e-5, rel=1e-5)
    assert_close_weights(merged(stage_weights(launched, "resumed-replicate")), expected)
    model, one_losses, _, _ = run({**spec, "parallel": {}}, resume_from=steps[0])
    assert one_losses == pytest.approx(losses[5:], abs=1e-5, rel=0)
    assert_close_weights(model.state_dict(), expected)


@pytest.mark.parametrize("name", ["stage-replicate", "stage-shard"])
def test_each_rank_builds_only_its_stage_with_one_process_weights(launched, name):
    """8 layers on 2 stages: a rank's parameters are its stage's (<= 0.6x the whole model's
    bytes with whole weights per replica, half that sharded), and gathered they are exactly
    the single-process build's."""
    single = Transformer.build(model_config(BIG_LAYERS), seed=0)
    full_bytes = sum(p.numel() * p.element_size() for p in single.parameters())
    limit = 0.6 if name == "stage-replicate" else 0.3
    for rank, record in enumerate(records(launched, name, NPROC)):
        assert "error" not in record, f"rank {rank}: {record.get('traceback')}"
        assert record["stage"]
        assert record["param_bytes"] <= limit * full_bytes, (rank, record["param_bytes"], full_bytes)
    stages = stage_weights(launched, name)
    assert "embed_tokens.weight" in stages[0] and "lm_head.weight" in stages[1]
    expected = single.state_dict()
    weights = merged(stages)
    assert sorted(weights) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=0, msg=key)


def test_stages_with_both_data_and_tensor_parallel_are_refused():
    """Checked before any collective (as every rank does): pp x tp x dp is not supported."""
    cfg = run_config({"batch_size": 4, "grad_accum": 1,
                      "parallel": {"pp": 2, "tp": 2, "dp_shard": 2}})
    with pytest.raises(ValueError, match=r"pp=2 with tp=2 and dp-replicate x dp-shard=2: pipeline "
                                         r"stages compose with data parallelism .* or with tensor"):
        distributed.check_parallel(model_config(3), cfg, world_size=8)


if __name__ == "__main__":
    rank_main(sys.argv[1])
