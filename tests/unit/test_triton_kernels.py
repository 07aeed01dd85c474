"""The Triton kernels (MoE dispatch, expert MLP, combine; one-row linear; q/k norm +
rotary) in Triton's CPU interpreter against the torch paths. Skipped where Triton is
not installed (CI's CPU torch has none); GPU hosts run it, and tests/gpu runs the
compiled kernels."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

def _triton_version() -> tuple[int, ...]:
    if importlib.util.find_spec("triton") is None:
        return ()
    from importlib.metadata import version

    return tuple(int(p) for p in version("triton").split(".")[:2])


# Triton 3.6's interpreter cannot loop up to a bound loaded from memory (3.9's can)
pytestmark = pytest.mark.skipif(_triton_version() < (3, 9), reason="needs Triton >= 3.9 (its CPU interpreter)")


def test_triton_kernels_match_the_torch_paths_in_the_interpreter():
    script = Path(__file__).with_name("triton_interpreted.py")
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.rstrip().endswith("all cases passed"), run.stdout
