"""`lmstack finetune` under torchrun (CPU, gloo, 2 processes) against the same command in one
process: LoRA and QLoRA under FSDP2, full fine-tuning under DDP, and a sharded checkpoint
resumed in one process.

Rank 0 writes metrics.jsonl, the PEFT adapter and hf/ after every rank has joined the last
collective (the adapters' gather), so the tests judge those files, not torchrun's exit code
alone (gloo can abort at teardown after the work is done); each launch has test_distributed's
timeout. The LoRA dropout is 0: each rank draws dropout masks for its own rows, so with dropout
a run equals the single-process one in distribution only.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import launch  # noqa: E402

from lmstack.cli import finetune as finetune_cli  # noqa: E402
from lmstack.finetune import read_adapter  # noqa: E402
from lmstack.finetune.qlora import compute_dtype  # noqa: E402
from lmstack.model import ModelConfig, Transformer  # noqa: E402
from lmstack.model.hf import save_hf  # noqa: E402
from lmstack.model.tokenizer import Tokenizer  # noqa: E402
from lmstack.train import TrainConfig  # noqa: E402
from lmstack.train.config import ParallelConfig  # noqa: E402

STEPS, HALF = 8, 4
TOL = 1e-5
# fields of metrics.jsonl that must agree; tokens and valid_tokens count every rank's rows, so
# ranks that read the whole global batch instead of their slice would count double
EXACT = ("step", "lr", "tokens", "valid_tokens", "tokens_seen")
CLOSE = ("loss", "grad_norm", "val_loss")  # grad_norm (up to 35 here) relative to its size


# ----------------------------------------------------------------------------- the runs

def chat(a: int, b: int) -> dict:
    return {"messages": [{"role": "system", "content": "add"},
                         {"role": "user", "content": f"{a}+{b}="},
                         {"role": "assistant", "content": str(a + b)}]}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny Llama saved as an HF directory, with its tokenizer and chat files. Its shapes let
    every NF4 weight's scale groups split over 2 FSDP2 shards (dim 256; a 512-row head)."""
    root = tmp_path_factory.mktemp("base")
    tok = Tokenizer.train([f"{a}+{b}={a + b} hello world" for a in range(10, 60)
                           for b in range(10, 30)], vocab_size=300)
    config = ModelConfig.from_preset("tiny-llama", vocab_size=512, dim=256, hidden_dim=512)
    save_hf(Transformer.build(config, seed=0), root / "base")
    tok.save(root / "base")
    write_jsonl(root / "chat.jsonl", [chat(10 + i, 20 + 2 * i) for i in range(24)])
    write_jsonl(root / "val.jsonl", [chat(40 + i, 11) for i in range(4)])
    return root


def finetune_flags(root: Path, out: Path, method: str, *extra: str) -> list[str]:
    """8 steps of 4 packed rows, fp32, a checkpoint and an evaluation at steps 4 and 8."""
    return ["finetune", "--base", str(root / "base"), "--data", str(root / "chat.jsonl"),
            "--val-data", str(root / "val.jsonl"), "--out", str(out), "--method", method,
            "--lora.r", "4", "--lora.dropout", "0", "--train.max-steps", str(STEPS),
            "--train.batch-size", "4", "--train.seq-len", "64", "--train.optim.lr", "1e-3",
            "--train.schedule.warmup-steps", "2", "--train.checkpoint.every", str(HALF),
            "--train.eval.every", str(HALF), "--train.eval.batches", "2", "--train.device", "cpu",
            "--train.precision.dtype", "fp32", "--train.logging.progress-bar", "false",
            "--train.logging.tensorboard", "false", "--train.logging.plot", "false", *extra]


def run_both(root: Path, method: str, layout: str) -> dict:
    """The command in this process, then under torchrun with --train.parallel.<layout> 2."""
    one, two = root / f"{method}-one", root / f"{method}-{layout}"
    assert finetune_cli.main(finetune_flags(root, one, method)[1:]) == 0
    proc = launch(2, finetune_flags(root, two, method, f"--train.parallel.{layout}", "2"), root,
                  module=True)
    assert (two / "hf" / "model.safetensors").is_file(), proc.stderr[-6000:]
    return {"one": one, "two": two, "proc": proc}


@pytest.fixture(scope="module")
def lora(base) -> dict:
    return run_both(base, "lora", "dp-shard")


@pytest.fixture(scope="module")
def qlora(base) -> dict:
    pytest.importorskip("torchao")
    return run_both(base, "qlora", "dp-shard")


@pytest.fixture(scope="module")
def full(base) -> dict:
    return run_both(base, "full", "dp-replicate")


# ----------------------------------------------------------------------------- judging

def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").open()]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def metric_diffs(one: list[dict], two: list[dict]) -> dict[str, float]:
    """The largest difference of each CLOSE field over the steps (grad_norm's relative to
    max(1, norm)); the EXACT fields equal."""
    assert len(one) == len(two)
    for a, b in zip(one, two, strict=True):
        assert {k: a[k] for k in EXACT} == {k: b[k] for k in EXACT}
    diffs = {}
    for key in CLOSE:
        pairs = [(a[key], b[key]) for a, b in zip(one, two, strict=True) if a[key] is not None]
        assert all(y is not None for _, y in pairs), key
        scale = (lambda x: max(1.0, abs(x))) if key == "grad_norm" else (lambda x: 1.0)
        diffs[key] = max(abs(x - y) / scale(x) for x, y in pairs)
    return diffs


def adapters(out: Path) -> dict[str, torch.Tensor]:
    return read_adapter(out / "adapter")[1]


def hf_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "hf" / "model.safetensors")


def assert_same_run(run: dict, tol: float = TOL) -> dict[str, float]:
    one, two = records(run["one"]), records(run["two"])
    assert len(two) == STEPS  # rank 0 alone writes the metrics
    assert sum(r["val_loss"] is not None for r in two) == 2
    diffs = metric_diffs(one, two)
    diffs["hf"] = max_diff(hf_weights(run["one"]), hf_weights(run["two"]))
    print(run["two"].name, diffs)
    assert all(d <= tol for d in diffs.values()), diffs
    assert run["proc"].stdout.count(f"step {STEPS}: train loss") == 1  # rank 0 alone prints
    return diffs


def shard_files(checkpoint: Path) -> list[str]:
    return sorted(p.name for p in checkpoint.glob("shard-*.safetensors"))


# ----------------------------------------------------------------------------- tests

def test_lora_under_fsdp2_is_the_single_process_run_and_saves_its_adapter(lora):
    assert_same_run(lora)
    ref, sharded = adapters(lora["one"]), adapters(lora["two"])
    assert len(ref) == 28  # 7 linears x 2 layers x (A, B)
    assert max_diff(ref, sharded) <= TOL
    # the adapters moved: a parity of untrained adapters would prove nothing
    assert max(v.abs().max().item() for k, v in ref.items() if k.endswith("lora_B")) > 1e-3
    ckpt = lora["two"] / "checkpoints" / f"step_{STEPS:08d}"
    assert len(shard_files(ckpt)) == 2
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["weights"] == "trainable" and state["base"]["method"] == "lora"


def test_full_fine_tuning_under_ddp_is_the_single_process_run(full):
    assert_same_run(full)
    assert not (full["two"] / "adapter").exists()
    base = load_file(full["one"].parent / "base" / "model.safetensors")
    assert max_diff(base, hf_weights(full["two"])) > 1e-3  # it trained every weight
    ckpt = full["two"] / "checkpoints" / f"step_{STEPS:08d}"
    assert json.loads((ckpt / "trainer_state.json").read_text())["weights"] == "all"


def test_qlora_under_fsdp2_shards_the_nf4_base_and_matches_one_process(qlora):
    """NF4 is deterministic and FSDP2 gathers the codes exactly, so the first step, from the
    same weights, matches to fp32 rounding. On a CPU without native bf16 the base's products
    run in fp32 (qlora.compute_dtype), and every step matches to 1e-5 (measured on an AVX2 CPU:
    losses 9.5e-7, adapters 9.3e-8). Elsewhere later steps differ by bf16 rounding: the base's
    products run in bf16, and the fp32 noise of another summation order (rank halves
    reduce-scattered instead of one batch) flips roundings of inputs cast to bf16, which grows
    step by step. One process taking the batch as 2 micro-batches (grad_accum 2) differs from
    the plain run by as much (docs/distributed.md), so the tolerances are bf16's, not 1e-5:
    a step's loss within 5e-3 (bf16's resolution at a loss of 4-6 is 1.6e-2), on average within
    1e-3, the merged export within 1e-3 and the adapters within 2e-3. Measured on an
    AVX-512 CPU: 1.1e-3, 2.7e-4, 2.8e-4 (adapters), 4e-5. The same run over the float base
    instead of NF4 is 1e-2 (average loss) and 9e-3 (adapters) away."""
    one, two = records(qlora["one"]), records(qlora["two"])
    assert abs(one[0]["loss"] - two[0]["loss"]) <= TOL
    diffs = metric_diffs(one, two)
    diffs["mean loss"] = sum(abs(a["loss"] - b["loss"]) for a, b in zip(one, two, strict=True)) / STEPS
    diffs["adapter"] = max_diff(adapters(qlora["one"]), adapters(qlora["two"]))
    diffs["hf"] = max_diff(hf_weights(qlora["one"]), hf_weights(qlora["two"]))
    print("qlora", diffs)
    if compute_dtype(torch.device("cpu")) == torch.float32:
        assert max(diffs.values()) <= TOL, diffs
    assert diffs["loss"] <= 5e-3 and diffs["val_loss"] <= 5e-3 and diffs["mean loss"] <= 1e-3
    assert diffs["adapter"] <= 2e-3 and diffs["hf"] <= 1e-3
    assert json.loads((qlora["two"] / "adapter" / "lmstack_adapter.json").read_text()) == \
        {"quantized_base": "nf4"}
    assert qlora["proc"].stdout.count(f"step {STEPS}: train loss") == 1


def test_a_sharded_finetune_checkpoint_resumes_in_one_process(lora, base):
    """Rank 0 and 1's step-4 shards, resumed by the plain command: steps 5-8 and the adapter
    are the uninterrupted single-process run's."""
    ckpt = lora["two"] / "checkpoints" / f"step_{HALF:08d}"
    assert len(shard_files(ckpt)) == 2
    out = base / "resumed"
    shutil.copytree(ckpt, out / "checkpoints" / ckpt.name)
    assert finetune_cli.main(finetune_flags(base, out, "lora", "--resume")[1:]) == 0
    resumed, straight = records(out), records(lora["one"])
    assert [r["step"] for r in resumed] == list(range(HALF + 1, STEPS + 1))
    diffs = metric_diffs(straight[HALF:], resumed)
    diffs["adapter"] = max_diff(adapters(lora["one"]), adapters(out))
    print("resumed", diffs)
    assert all(d <= TOL for d in diffs.values()), diffs


@pytest.mark.parametrize("layout", [{"tp": 2}, {"pp": 2}])
def test_tensor_and_pipeline_parallel_fine_tuning_are_refused_before_any_collective(layout):
    config = ModelConfig.from_preset("tiny-llama")
    cfg = TrainConfig(batch_size=4, parallel=ParallelConfig(**layout))
    with pytest.raises(ValueError, match="data-parallel ranks only .* shard with --train.parallel.dp-shard"):
        finetune_cli.check_layout(config, cfg, 2)
