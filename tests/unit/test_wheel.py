"""The built wheel holds every module of the tree (setuptools drops unlisted subpackages
silently) and the shipped configs, and nothing from tests/ or benchmarks/.

Builds from a copy of the checkout in tmp_path (about 2 s), so that concurrent runs
never share setuptools' build/ folder and the checkout stays clean.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import zipfile

REPO = pathlib.Path(__file__).resolve().parents[2]
CODE = ("cluster", "comm", "actors", "deploy")


def _ignore(folder: str, names: list[str]) -> set[str]:
    return {n for n in names if n.startswith(".") or n in ("build", "dist", "__pycache__") or n.endswith(".egg-info")}


def _build_wheel(tmp_path: pathlib.Path) -> pathlib.Path:
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=_ignore)
    out = tmp_path / "wheel"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-q",
        "-w",
        str(out),
        str(src),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"wheel build failed:\n{done.stdout}\n{done.stderr}"
    (wheel,) = out.glob("raymoe-*.whl")
    return wheel


def test_wheel_holds_every_module_and_config(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())

    modules = {
        "raymoe/" + p.relative_to(REPO).as_posix()
        for folder in CODE
        for p in (REPO / folder).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    configs = {f"raymoe/configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")}
    assert len(modules) >= 10 and configs
    missing = sorted((modules | configs) - names)
    assert not missing, (
        "the wheel lacks these files: list their package in pyproject.toml "
        "[tool.setuptools] packages and package-dir:\n" + "\n".join(missing)
    )
    if (REPO / "configs" / "README.md").is_file():
        assert "raymoe/configs/README.md" in names

    # nothing beyond the tree: no stale modules, no tests, no benchmarks
    shipped_py = {n for n in names if n.endswith(".py")}
    assert shipped_py == modules, sorted(shipped_py ^ modules)
    stray = [n for n in names if n.split("/")[0] in ("tests", "benchmarks") or "/tests/" in n or "test_" in n]
    assert not stray, stray
    assert not any(n == "raymoe/__init__.py" for n in names), "raymoe is a namespace package"
