"""The command line as a person meets it: help with examples, version, one-line errors."""

from __future__ import annotations

import pytest
from conftest import run_cli

from quantkit import __version__


def test_version() -> None:
    r = run_cli("--version")
    assert r.returncode == 0 and __version__ in r.stdout


def test_top_level_help_lists_commands() -> None:
    r = run_cli("--help")
    assert r.returncode == 0
    for cmd in ("convert", "inspect", "demo", "types", "imatrix"):
        assert cmd in r.stdout


@pytest.mark.parametrize("cmd", ["convert", "inspect", "demo", "imatrix"])
def test_subcommand_help_has_examples(cmd: str) -> None:
    r = run_cli(cmd, "--help")
    assert r.returncode == 0
    assert "Examples:" in r.stdout and f"quantkit {cmd}" in r.stdout


def test_usage_error_exits_2() -> None:
    r = run_cli("convert")
    assert r.returncode == 2 and "Missing argument" in r.stderr


def test_debug_shows_traceback(tmp_path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "QUANTKIT_DEBUG": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "quantkit.cli", "inspect", str(tmp_path / "none.gguf")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode != 0 and "Traceback" in r.stderr
    r = run_cli("inspect", str(tmp_path / "none.gguf"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "no such file" in r.stderr
