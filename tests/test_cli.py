"""The command line: help, unknown commands, and `lmstack info` on a preset."""

import subprocess
import sys

from lmstack.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


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
               "--budget-s", "3", "--batch-size", "4", "--seq-len", "64", "--samples", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "unigram baseline:" in out and "sample 1" in out
    assert (tmp_path / "run" / "hf" / "config.json").exists()
    assert (tmp_path / "run" / "loss_curve.png").exists()
