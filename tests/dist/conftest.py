"""Run a function on N gloo processes (torch.multiprocessing, spawn), with a deadline."""
from __future__ import annotations

import time
from typing import Any, Callable

import pytest
import torch.multiprocessing as mp

from ports import free_ports

WORLD_TIMEOUT_S = 120.0


def _run_world(
    fn: Callable[..., Any], world: int, *args: Any, inits: int = 1, timeout_s: float = WORLD_TIMEOUT_S
) -> None:
    """Run ``fn(rank, world, init_methods, *args)`` in ``world`` processes.

    ``init_methods``: ``inits`` tcp:// addresses on free ports, one per
    torch.distributed init the ranks will do (a spawn costs seconds: one spawn
    may init several worlds in turn). ``fn`` must live in an importable module
    (the test file). A failure in any rank re-raises here with that rank's
    traceback; a hang fails after ``timeout_s``.
    """
    init_methods = [f"tcp://127.0.0.1:{port}" for port in free_ports(inits)]
    ctx = mp.start_processes(fn, args=(world, init_methods) + args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"{world} ranks of {fn.__name__} did not finish within {timeout_s:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()


@pytest.fixture
def run_world() -> Callable[..., None]:
    return _run_world
