"""The code is formatted and linted as pyproject.toml's [tool.ruff] says (what CI checks)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("command", [["format", "--check"], ["check"]], ids=["format", "lint"])
def test_ruff_is_clean(command: list[str]) -> None:
    run = subprocess.run([sys.executable, "-m", "ruff", *command, str(REPO)], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, (
        f"ruff {' '.join(command)} (fix with: ruff format . && ruff check --fix .):\n{run.stdout}{run.stderr}"
    )
