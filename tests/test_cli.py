"""The ``hf-cage`` entry point: its help names only the commands that exist; no command is a usage error."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hf_cage.cli import SUBCOMMANDS, build_parser, main


def test_help_lists_exactly_the_registered_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    subparsers = build_parser()._subparsers._group_actions[0]
    assert sorted(subparsers.choices) == sorted(SUBCOMMANDS)
    for name in SUBCOMMANDS:
        assert name in text
    # No command the package does not have is promised (training runs in Python or through the recipes).
    for missing in ("train", "publish"):
        assert missing not in subparsers.choices
        assert f"{{{missing}" not in text and f"  {missing} " not in text


def test_bare_command_prints_help_on_stderr_and_exits_2(capsys):
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "usage: hf-cage" in captured.err and "export" in captured.err


def test_the_module_entry_point_exits_2_without_a_command():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "hf_cage.cli"], capture_output=True, text=True, env=env)
    assert result.returncode == 2, result.stderr
    assert "usage: hf-cage" in result.stderr and result.stdout == ""
