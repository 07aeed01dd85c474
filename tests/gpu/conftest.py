"""GPU tier: a local Ray offering every GPU of this host. The test modules skip
themselves without CUDA.

Run on a GPU machine: install the torch wheel for its CUDA, then
``pip install ".[gpu,test]" && python -m pytest tests/gpu -q``. (This project's own test
hosts have no package registry: they install a prebuilt bundle instead,
``source .devbundle/install.sh``, and run the same command.) NVLink multicast stays
off: the rank actors set the variables in their runtime_env.

Under a time limit, stop the run with SIGINT (``timeout -s INT``): pytest then reports where
it was. ``ray.init`` in this process installs a SIGTERM handler that raises SystemExit, so a
SIGTERM shows as a failure (``F``) of whichever test was running.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.fixture(scope="module")
def gpu_ray() -> Any:
    """A local Ray with num_gpus = this host's GPU count; stopped after the module."""
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized(), "another Ray instance is up in this process"
    n = gpu_count()
    ray.init(num_gpus=n, num_cpus=max(os.cpu_count() or 1, n + 2), include_dashboard=False)
    yield ray
    ray.shutdown()
