"""One simulated two-node Ray cluster for all tests under tests/ray.

Head and worker node have 4 logical CPUs each (ray.cluster_utils.Cluster: two
raylets on this host), so single-node layouts (up to 4 ranks) and two-node
layouts both run on it. It starts with the first test here and stops after the
last one (not at session end), so no other Ray (tests/gpu) ever runs beside it.

Test modules here call ``ray.cloudpickle.register_pickle_by_value`` on
themselves: the functions they send to ``Controller.run_on_ranks`` must travel by
value, since the rank actors cannot import a test module.
"""

from __future__ import annotations

import pathlib
from typing import Any

import pytest

HERE = pathlib.Path(__file__).resolve().parent
CPUS_PER_NODE = 4
NODE_ARGS = dict(num_cpus=CPUS_PER_NODE, object_store_memory=128 * 2**20)
_CLUSTER = pytest.StashKey[Any]()


def _start() -> Any:
    import ray
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized(), "a Ray instance is already up in this process"
    cluster = Cluster(initialize_head=True, head_node_args=dict(NODE_ARGS, include_dashboard=False))
    try:
        cluster.add_node(**NODE_ARGS)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
    except BaseException:
        cluster.shutdown()
        raise
    return cluster


def _stop(config: pytest.Config) -> None:
    cluster = config.stash.get(_CLUSTER, None)
    if cluster is None:
        return
    import ray

    del config.stash[_CLUSTER]
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def ray_cluster(pytestconfig: pytest.Config) -> Any:
    """The shared two-node cluster (started on first use); the driver is connected to it.

    Module scope so that module fixtures (a started controller) can use it; it
    restarts only if tests from elsewhere ran in between."""
    if _CLUSTER not in pytestconfig.stash:
        pytestconfig.stash[_CLUSTER] = _start()
    return pytestconfig.stash[_CLUSTER]


@pytest.fixture(scope="module")
def ray_session(ray_cluster: Any) -> Any:
    """Another name for ``ray_cluster``."""
    return ray_cluster


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    # called for items under this folder only; after the fixtures' own teardown
    # (a module fixture may still talk to Ray), stop once the next test is elsewhere
    try:
        return (yield)
    finally:
        if nextitem is None or HERE not in pathlib.Path(nextitem.path).resolve().parents:
            _stop(item.config)


def pytest_unconfigure(config: pytest.Config) -> None:
    _stop(config)  # an interrupted run
