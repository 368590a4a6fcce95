"""Two nodes on one machine: two torchrun invocations (--nnodes 2, one process each, a c10d
rendezvous on the loopback) train together and agree with one process, as data parallel
(DDP) and as two pipeline stages. Each node's rank runs tests/test_pipeline.py's rank program
and is judged by the files it writes, not by torchrun's exit code alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import test_pipeline  # noqa: E402
from test_pipeline import (  # noqa: E402
    assert_close_weights,
    assert_same_run,
    free_port,
    merged_weights,
    rank_weights,
    records,
)

RUNS = {
    # the global batch of 4 rows: 2 on each node
    "ddp": {"n_layers": 2, "batch_size": 4, "grad_accum": 1, "parallel": {"dp_replicate": 2}},
    "pipeline": {"n_layers": 2, "batch_size": 3, "grad_accum": 1,
                 "parallel": {"pp": 2, "pp_schedule": "gpipe", "microbatches": 2}},
}


def node_command(node_rank: int, port: int, spec: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--node-rank", str(node_rank), "--rdzv-id", "lmstack-test", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", test_pipeline.__file__, str(spec)]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("multinode")
    spec = out / "spec.json"
    spec.write_text(json.dumps({"out": str(out), "runs": RUNS}))
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(node_command(i, port, spec), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        logs = [node.communicate(timeout=test_pipeline.LAUNCH_TIMEOUT_S)[0] for node in nodes]
    except subprocess.TimeoutExpired:  # a hang: the tests then fail on the missing results
        for node in nodes:
            node.kill()
        logs = [f"{node.communicate()[0]}\n(killed after {test_pipeline.LAUNCH_TIMEOUT_S} s)"
                for node in nodes]
    (out / "torchrun.log").write_text("\n".join(f"node {i} (exit {node.returncode}):\n{log}"
                                                for i, (node, log) in enumerate(zip(nodes, logs, strict=True))))
    return out


def test_two_nodes_train_data_parallel_like_one_process(two_nodes):
    expected = assert_same_run(records(two_nodes, "ddp"), RUNS["ddp"])
    for rank in range(2):  # each replica ends with the single process's weights
        assert_close_weights(rank_weights(two_nodes, "ddp", rank), expected)


def test_two_nodes_as_pipeline_stages_train_like_one_process(two_nodes):
    expected = assert_same_run(records(two_nodes, "pipeline"), RUNS["pipeline"])
    assert_close_weights(merged_weights(two_nodes, "pipeline"), expected)
