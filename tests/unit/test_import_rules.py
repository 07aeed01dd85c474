"""The layer table of ARCHITECTURE.md, enforced on every import (ast, no execution).

| folder  | may import                                                              |
| cluster | stdlib, numpy, torch (tensor math, not torch.distributed), yaml, raymoe.cluster |
| comm    | anything but ray, and of raymoe only raymoe.cluster / raymoe.comm        |
| actors  | anything but raymoe.deploy                                              |
| deploy  | anything                                                                |

And nowhere (code, tests, benchmarks) a bare ``import cluster|comm|actors|deploy|configs``:
those names are taken on PyPI; every import is ``raymoe.<folder>``.
"""
from __future__ import annotations

import ast
import pathlib
import sys
from typing import Iterator, Optional

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
LAYERS = ("cluster", "comm", "actors", "deploy")
BARE = {"cluster", "comm", "actors", "deploy", "configs"}
SKIP_DIRS = {"build", "dist", "__pycache__"}


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_violation(layer: str, module: str) -> Optional[str]:
    """Why ``layer`` may not import ``module``; None when it may."""
    top = module.split(".")[0]
    if layer == "cluster":
        if _under(module, "torch.distributed"):
            return "cluster may not import torch.distributed (pure planning: no process groups)"
        if top in sys.stdlib_module_names or top in ("numpy", "torch", "yaml") or _under(module, "raymoe.cluster"):
            return None
        return "cluster may import only stdlib, numpy, torch (tensor math), yaml and raymoe.cluster"
    if layer == "comm":
        if top == "ray":
            return "comm may not import ray"
        if top == "raymoe" and not (_under(module, "raymoe.cluster") or _under(module, "raymoe.comm")):
            return "comm may import only raymoe.cluster and raymoe.comm of raymoe"
        return None
    if layer == "actors":
        if _under(module, "raymoe.deploy"):
            return "actors may not import raymoe.deploy"
        return None
    assert layer == "deploy", layer
    return None


def _package_of(rel: pathlib.Path) -> Optional[str]:
    """raymoe package of a repo-relative .py path (cluster/x.py -> raymoe.cluster)."""
    if rel.parts[0] not in LAYERS:
        return None
    return ".".join(("raymoe",) + rel.parts[:-1])


def imported_modules(tree: ast.AST, package: Optional[str]) -> Iterator[tuple[int, str, bool]]:
    """(line, dotted module, is_relative) for every import, anywhere in the file.

    ``from a.b import c`` yields ``a.b.c`` (a prefix test then covers both a.b and
    a.b.c); relative imports resolve against ``package``; ``torch.distributed``
    reached as an attribute of ``torch`` counts as an import of it.
    """
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, False
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                if package is None:
                    continue
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                yield node.lineno, base if alias.name == "*" else f"{base}.{alias.name}", bool(node.level)
        elif (
            isinstance(node, ast.Attribute)
            and node.attr == "distributed"
            and isinstance(node.value, ast.Name)
            and node.value.id == "torch"
        ):
            yield node.lineno, "torch.distributed", False


def check_source(source: str, rel: pathlib.Path) -> list[str]:
    """Every rule broken by one file, as 'path:line: rule' strings."""
    tree = ast.parse(source, filename=str(rel))
    package = _package_of(rel)
    problems = []
    for line, module, relative in imported_modules(tree, package):
        if not relative and module.split(".")[0] in BARE:
            problems.append(f"{rel}:{line}: bare 'import {module}': use raymoe.{module}")
            continue
        if package is not None:
            why = layer_violation(rel.parts[0], module)
            if why:
                problems.append(f"{rel}:{line}: imports {module}: {why}")
    return problems


def _python_files() -> list[pathlib.Path]:
    out = []
    for path in sorted(REPO.rglob("*.py")):
        rel = path.relative_to(REPO)
        dirs = rel.parts[:-1]
        if any(d.startswith(".") or d in SKIP_DIRS or d.endswith(".egg-info") for d in dirs):
            continue
        out.append(rel)
    return out


def test_layer_table_and_bare_imports_hold_everywhere():
    files = _python_files()
    assert any(f.parts[0] == "cluster" for f in files) and any(f.parts[0] == "tests" for f in files)
    problems = [p for rel in files for p in check_source((REPO / rel).read_text(), rel)]
    assert not problems, "import rules broken (see ARCHITECTURE.md, 'Layers'):\n" + "\n".join(problems)


# ---- the checker itself catches what it must ------------------------------------------------


@pytest.mark.parametrize(
    "rel, source, broken",
    [
        ("cluster/x.py", "import torch.distributed as dist", "torch.distributed"),
        ("cluster/x.py", "from torch import distributed", "torch.distributed"),
        ("cluster/x.py", "from torch.distributed import ProcessGroup", "torch.distributed"),
        ("cluster/x.py", "import torch\ntorch.distributed.barrier()", "torch.distributed"),
        ("cluster/x.py", "import ray", "only stdlib"),
        ("cluster/x.py", "def f():\n    from raymoe.comm.group import GroupCoordinator", "only stdlib"),
        ("cluster/x.py", "from ..comm import group", "only stdlib"),
        ("cluster/x.py", "import requests", "only stdlib"),
        ("comm/x.py", "import ray", "comm may not import ray"),
        ("comm/x.py", "from ray.util import placement_group", "comm may not import ray"),
        ("comm/x.py", "from raymoe.actors.rank import RankWorker", "only raymoe.cluster and raymoe.comm"),
        ("comm/x.py", "from raymoe import deploy", "only raymoe.cluster and raymoe.comm"),
        ("actors/engine/x.py", "from raymoe.deploy.launch import start_controller", "may not import raymoe.deploy"),
        ("actors/engine/x.py", "from ...deploy import launch", "may not import raymoe.deploy"),
        ("tests/unit/test_x.py", "import comm.group", "bare 'import comm.group'"),
        ("benchmarks/x.py", "from cluster.layout import RankLayout", "bare 'import cluster.layout"),
        ("deploy/x.py", "import actors", "bare 'import actors'"),
    ],
)
def test_checker_flags_broken_rules(rel, source, broken):
    problems = check_source(source, pathlib.PurePosixPath(rel))
    assert len(problems) == 1 and broken in problems[0], problems
    assert problems[0].startswith(f"{rel}:{source.count(chr(10)) + 1}:"), problems


@pytest.mark.parametrize(
    "rel, source",
    [
        ("cluster/x.py", "from __future__ import annotations\nimport dataclasses, yaml, numpy as np"),
        ("cluster/x.py", "import torch\nfrom raymoe.cluster.layout import RankLayout\nfrom .layout import GROUP_KINDS"),
        ("comm/x.py", "import torch.distributed as dist\nfrom raymoe.cluster.layout import RankLayout"),
        ("comm/x.py", "from raymoe.comm.group import GroupCoordinator\nimport numpy"),
        ("actors/models/x.py", "import ray, torch, safetensors\nfrom raymoe.comm.groups import Groups"),
        ("actors/x.py", "from ..cluster.config import Config"),
        ("deploy/x.py", "import ray\nfrom raymoe.actors.controller import Controller\nimport fastapi"),
        ("tests/unit/test_x.py", "import ray\nfrom raymoe.deploy.launch import start_controller"),
    ],
)
def test_checker_allows_what_the_table_allows(rel, source):
    assert check_source(source, pathlib.PurePosixPath(rel)) == []
