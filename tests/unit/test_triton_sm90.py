"""Every Triton kernel compiles for the H100/H200 (sm_90) at the served models' shapes and
block sizes, on a machine without a GPU (Triton's bundled ptxas): the compiler refuses code
that the CPU interpreter runs (test_triton_kernels.py), and a kernel may ask for more shared
memory than the GPU has. The cases run in one fresh process (triton_sm90_compiled.py
replaces Triton's driver there)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("triton_sm90_compiled.py")
triton = pytest.importorskip("triton")
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
pytestmark = pytest.mark.skipif(not PTXAS.exists(), reason="needs Triton's bundled ptxas")

sys.path.insert(0, str(SCRIPT.parent))
from triton_sm90_compiled import CASES  # noqa: E402


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[dict, subprocess.CompletedProcess]:
    """Every case compiled: (case -> (None or its traceback, the kernels it compiled); the process)."""
    results = tmp_path_factory.mktemp("sm90") / "results.jsonl"
    run = subprocess.run([sys.executable, str(SCRIPT), str(results)], capture_output=True, text=True, timeout=600)
    lines = results.read_text().splitlines() if results.exists() else []
    return {name: (error, kernels) for name, error, kernels in map(json.loads, lines)}, run


@pytest.mark.parametrize("case", CASES)
def test_kernels_compile_for_sm90(case, compiled):
    results, run = compiled
    assert case in results, f"the compiling process ended (exit {run.returncode}) first:\n{run.stderr[-3000:]}"
    error, kernels = results[case]
    assert error is None, error
    assert kernels, "the case launched no Triton kernel"


def test_every_kernel_is_compiled_by_some_case(compiled):
    """A new kernel (a @triton.jit function launched as ``name[grid]``) needs a case here."""
    results, _ = compiled
    seen = {kernel for _, kernels in results.values() for kernel in kernels}
    root = SCRIPT.parents[2]
    launched = set()
    for source in [*(root / "actors").rglob("*_triton.py"), *(root / "comm").glob("*_triton.py")]:
        text = source.read_text()
        jitted = set(re.findall(r"@triton\.jit\ndef (\w+)\(", text))
        launched |= {name for name in jitted if f"{name}[" in text}
    assert launched and launched <= seen, f"never compiled: {sorted(launched - seen)}"
