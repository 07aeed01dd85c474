"""The import layers (the README's "Layers"), enforced on every import (ast, no execution).

| layer                        | may import                                                          |
| cluster                      | stdlib, numpy, torch (tensor math, not torch.distributed), yaml, raymoe.cluster |
| comm                         | anything but ray, and of raymoe only raymoe.cluster / raymoe.comm    |
| actors/engine, actors/models | anything but ray, and of raymoe only raymoe.cluster / raymoe.comm /  |
|                              | raymoe.actors.engine / raymoe.actors.models (not the actor modules)  |
| actors (top-level modules)   | anything but raymoe.deploy                                          |
| deploy                       | anything                                                            |

And nowhere (code, tests, benchmarks) a bare ``import cluster|comm|actors|deploy|configs``:
those names are taken on PyPI; every import is ``raymoe.<folder>``.

No import cycles among raymoe's modules, counting every import (function-local ones
too), and importing the engine in-process pulls in neither ray nor an actor module.
"""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys
from typing import Iterator, Mapping, Optional

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
LAYERS = ("cluster", "comm", "actors", "deploy")
IN_PROCESS = ("actors/engine", "actors/models")  # run in tests and in any actor: no ray
IN_PROCESS_MAY_IMPORT = ("raymoe.cluster", "raymoe.comm", "raymoe.actors.engine", "raymoe.actors.models")
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
    if layer in IN_PROCESS:
        if top == "ray":
            return "actors/engine and actors/models never import ray (they run in-process, in tests and in any actor)"
        if _under(module, "raymoe.deploy"):
            return "actors may not import raymoe.deploy"
        if top == "raymoe" and not any(_under(module, allowed) for allowed in IN_PROCESS_MAY_IMPORT):
            return (
                "actors/engine and actors/models may import only raymoe.cluster, raymoe.comm, "
                "raymoe.actors.engine and raymoe.actors.models of raymoe (not the actor modules)"
            )
        return None
    if layer == "actors":
        if _under(module, "raymoe.deploy"):
            return "actors may not import raymoe.deploy"
        return None
    assert layer == "deploy", layer
    return None


def _layer_of(rel: pathlib.PurePath) -> str:
    """The layer row of a file under a code folder: actors/engine/x.py -> actors/engine."""
    sub = "/".join(rel.parts[:2])
    return sub if len(rel.parts) > 2 and sub in IN_PROCESS else rel.parts[0]


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
            why = layer_violation(_layer_of(rel), module)
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
    assert not problems, "import rules broken (see the README, 'Layers'):\n" + "\n".join(problems)


def _module_name(rel: pathlib.PurePath) -> str:
    """raymoe module of a .py path under a code folder (actors/engine/core.py -> raymoe.actors.engine.core)."""
    parts = rel.with_suffix("").parts
    return ".".join(("raymoe",) + (parts[:-1] if parts[-1] == "__init__" else parts))


def import_graph(sources: Mapping[pathlib.PurePath, str]) -> dict[str, set[str]]:
    """raymoe module -> the raymoe modules it imports, anywhere in the file (function-local too)."""
    modules = {_module_name(rel): rel for rel in sources}
    graph = {}
    for name, rel in modules.items():
        targets = set()
        for _, imported, _ in imported_modules(ast.parse(sources[rel]), _package_of(rel)):
            # ``from a.b import c`` names module a.b.c when there is one, else a.b
            target = imported if imported in modules else imported.rpartition(".")[0]
            if target in modules and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def import_cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def test_no_import_cycles():
    sources = {rel: (REPO / rel).read_text() for rel in _python_files() if rel.parts[0] in LAYERS}
    graph = import_graph(sources)
    assert "raymoe.actors.models.spec" in graph["raymoe.actors.models.layers"], "the graph misses imports"
    cycles = import_cycles(graph)
    assert not cycles, "import cycles (every import counts, function-local ones too):\n" + "\n".join(map(str, cycles))


@pytest.mark.parametrize("module", ["raymoe.actors.engine.core", "raymoe.actors.engine.local"])
def test_in_process_engine_imports_no_ray_and_no_actor_module(module):
    code = f"import json, sys\nimport {module}\nprint(json.dumps(sorted(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    loaded = json.loads(run.stdout.splitlines()[-1])
    assert module in loaded
    assert [m for m in loaded if _under(m, "ray")] == []
    outside = [
        m
        for m in loaded
        if _under(m, "raymoe.actors") and m != "raymoe.actors" and not any(_under(m, a) for a in IN_PROCESS_MAY_IMPORT)
    ]
    assert outside == [], f"{module} pulls in {outside}"


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
        ("actors/engine/x.py", "import ray", "never import ray"),
        ("actors/models/x.py", "from ray.util import placement_group", "never import ray"),
        ("actors/engine/x.py", "from raymoe.actors.rank import RankWorker", "not the actor modules"),
        ("actors/engine/x.py", "from ..controller import Controller", "not the actor modules"),
        ("actors/models/x.py", "def f():\n    from raymoe.actors.rank_group import RankGroup", "not the actor modules"),
        ("actors/engine/x.py", "from raymoe.actors import step_executor", "not the actor modules"),
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
        ("actors/models/x.py", "import torch, safetensors\nfrom raymoe.comm.groups import Groups"),
        (
            "actors/engine/x.py",
            "from raymoe.actors.models.spec import ModelSpec\nfrom .rank_context import RankContext",
        ),
        ("actors/x.py", "import ray\nfrom raymoe.actors.engine.core import EngineCore"),
        ("actors/x.py", "from ..cluster.config import Config"),
        ("deploy/x.py", "import ray\nfrom raymoe.actors.controller import Controller\nimport fastapi"),
        ("tests/unit/test_x.py", "import ray\nfrom raymoe.deploy.launch import start_controller"),
    ],
)
def test_checker_allows_what_the_table_allows(rel, source):
    assert check_source(source, pathlib.PurePosixPath(rel)) == []


def test_cycle_check_counts_function_local_imports():
    sources = {
        pathlib.PurePosixPath("actors/engine/a.py"): "from raymoe.actors.engine.b import B",
        pathlib.PurePosixPath("actors/engine/b.py"): "def f():\n    from raymoe.actors.engine import a",
        pathlib.PurePosixPath("actors/engine/c.py"): "import raymoe.actors.engine.a",
        pathlib.PurePosixPath("cluster/d.py"): "from . import e",
        pathlib.PurePosixPath("cluster/e.py"): "from .d import X",
    }
    assert import_cycles(import_graph(sources)) == [
        ["raymoe.actors.engine.a", "raymoe.actors.engine.b"],
        ["raymoe.cluster.d", "raymoe.cluster.e"],
    ]
