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
