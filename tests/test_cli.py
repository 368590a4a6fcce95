"""The command line: help, unknown commands, flag parsing, and `lmstack info` on a preset."""

import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

from lmstack.cli import COMMANDS, flags, main
from lmstack.cli import generate as generate_cli
from lmstack.cli import pretrain as pretrain_cli
from lmstack.cli import sample as sample_cli
from lmstack.infer import SamplingParams

# one spelling per setting in every command that has it
SHARED_FLAGS = ["--prompt", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed",
                "--device", "--tokenizer"]


def command_help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_command_help_shows_an_example_and_kebab_case_flags_only(command, capsys):
    out = command_help(command, capsys)
    assert re.search(rf"^\s+lmstack {command} \S", out, re.MULTILINE), "no example command line"
    assert "Args(" not in out and "<factory>" not in out  # no dataclass reprs
    assert re.findall(r"--[a-z][a-z.-]*_", out) == []  # --max_new_tokens, --train.max_steps
    assert "(default: " in out


@pytest.mark.parametrize("command", ["sample", "generate"])
def test_sample_and_generate_share_flag_names(command, capsys):
    out = command_help(command, capsys)
    assert [flag for flag in SHARED_FLAGS if f"  {flag} " not in out] == []


def test_sample_parses_kebab_case_flags():
    checkpoint, args = sample_cli.parse_args([
        "runs/a", "--prompt", "def f(", "--max-new-tokens", "7", "--temperature", "0.5",
        "--top-k", "3", "--top-p", "0.9", "--seed", "11", "--device", "cpu", "--tokenizer", "tok",
        "--num-samples", "2"])
    assert checkpoint == "runs/a"
    assert args == sample_cli.SampleArgs(prompt="def f(", num_samples=2, max_new_tokens=7,
                                         temperature=0.5, top_k=3, top_p=0.9, seed=11,
                                         device="cpu", tokenizer="tok")


def test_generate_parses_kebab_case_flags_into_sampling_and_engine_settings():
    model, args = generate_cli.parse_args([
        "runs/a", "--prompt", "def f(", "--max-new-tokens", "7", "--temperature", "0.5",
        "--top-k", "3", "--top-p", "0.9", "--seed", "11", "--device", "cpu", "--tokenizer", "tok",
        "--stop", "\n\n", "END", "--dtype", "bfloat16", "--block-size", "4", "--num-blocks", "none",
        "--json", "--stream", "false", "--enable-prefix-caching", "false"])
    assert model == "runs/a"
    assert (args.prompt, args.tokenizer, args.json, args.stream) == ("def f(", "tok", True, False)
    assert args.sampling == SamplingParams(max_tokens=7, temperature=0.5, top_k=3, top_p=0.9,
                                           stop=["\n\n", "END"])
    engine = args.engine
    assert (engine.seed, engine.device, engine.dtype, engine.block_size, engine.num_blocks,
            engine.enable_prefix_caching) == (11, "cpu", "bfloat16", 4, None, False)


def test_generate_reports_invalid_sampling_values(capsys):
    assert main(["generate", "runs/a", "--prompt", "x", "--max-new-tokens", "0"]) == 2
    assert "max_tokens=0 must be >= 1" in capsys.readouterr().err


def test_pretrain_parses_nested_kebab_case_flags():
    args = pretrain_cli.parse_args([
        "--data", "d", "--model.overrides", '{"n_layers": 2}', "--train.max-steps", "none",
        "--train.max-time-s", "5", "--train.optim.weight-decay", "0.05",
        "--train.schedule.warmup-steps", "3", "--train.logging.plot", "false", "--resume"])
    assert (args.data, args.resume, args.model.overrides) == ("d", True, {"n_layers": 2})
    train = args.train
    assert (train.max_steps, train.max_time_s, train.optim.weight_decay) == (None, 5.0, 0.05)
    assert (train.schedule.warmup_steps, train.logging.plot, train.logging.tensorboard) == (3, False, True)


@pytest.mark.parametrize("argv", [["runs/a", "--max_new_tokens", "5"], ["runs/a", "--max-new", "5"]])
def test_underscore_and_abbreviated_flags_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        sample_cli.parse_args(argv)
    assert e.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_a_field_without_docstring_has_no_flag():
    @dataclass
    class Undocumented:
        size: int = 1

    with pytest.raises(TypeError, match=r"Undocumented\.size has no docstring"):
        flags.add_fields(flags.make_parser("lmstack x", None), Undocumented)


def test_unknown_command_is_an_error(capsys):
    assert main(["pretrian"]) == 2
    assert "unknown command 'pretrian'" in capsys.readouterr().err


def test_info_reports_gpt2_parameter_count():
    out = subprocess.run([sys.executable, "-m", "lmstack", "info", "gpt2-124m"],
                         capture_output=True, text=True, check=True).stdout
    assert "124,439,808" in out


def test_demo_runs_end_to_end_on_a_small_budget(tmp_path, capsys):
    """The main job's plumbing: prepare -> pretrain -> baseline report -> HF export -> samples."""
    rc = main(["demo", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
               "--max-mb", "0.3", "--vocab-size", "400", "--preset", "tiny-llama",
               "--max-time-s", "3", "--batch-size", "4", "--seq-len", "64", "--num-samples", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "unigram baseline:" in out and "sample 1" in out
    assert (tmp_path / "run" / "hf" / "config.json").exists()
    assert (tmp_path / "run" / "loss_curve.png").exists()
