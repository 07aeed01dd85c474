"""A controller with 4 CPU rank actors (dp2 tp2 ep2) on Ray: groups checked with real
collectives through Controller.run_on_ranks, barriers, health, shutdown; and layouts the
cluster cannot place fail in bounded time, saying what is missing.

The tests of the started controller share one bring-up (module fixture) and run
in file order; the last one shuts it down.
"""

from __future__ import annotations

import itertools
import os
import sys
import time

import pytest
import ray
import torch

from raymoe.cluster.config import config_from_dict
from raymoe.cluster.layout import GROUP_KINDS
from raymoe.cluster.placement import ClusterCapacityError
from raymoe.deploy.launch import start_controller

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

DEGREES = dict(dp=2, tp=2, ep=2)
WORLD = 4


def expected_members(kind: str, rank: int) -> list[int]:
    """dp2 x tp2 (tp fastest), ep2 x moe_tp2, enumerated independently of the layout code."""
    attn = list(itertools.product(range(2), range(2)))  # (dp, tp); index = rank
    moe = list(itertools.product(range(2), range(2)))  # (ep, moe_tp)
    key = {
        "world": lambda r: 0,
        "tp": lambda r: attn[r][0],
        "cp": lambda r: attn[r],
        "attn": lambda r: attn[r][0],
        "dp": lambda r: attn[r][1],
        "ep": lambda r: moe[r][1],
        "moe_tp": lambda r: moe[r][0],
    }[kind]
    return [r for r in range(WORLD) if key(r) == key(rank)]


def _placement_groups(state: str) -> list[str]:
    return [pg_id for pg_id, pg in ray.util.placement_group_table().items() if pg["state"] == state]


def _wait_for_cpus(want: float, timeout_s: float = 30.0) -> float:
    deadline = time.monotonic() + timeout_s
    while True:
        have = ray.available_resources().get("CPU", 0.0)
        if have == want or time.monotonic() > deadline:
            return have
        time.sleep(0.2)


# ---- run on every rank (travel by value) ----------------------------------------------


def _whoami(ctx) -> dict:
    return {
        "rank": ctx.rank,
        "pid": os.getpid(),
        "coord": (ctx.coord.dp, ctx.coord.cp, ctx.coord.tp, ctx.coord.ep, ctx.coord.moe_tp),
        "device": str(ctx.device),
        "threads": torch.get_num_threads(),
    }


def _group_views(ctx) -> dict:
    """Per kind: global ranks gathered over the device group, pids over the cpu group."""
    out = {}
    for kind in GROUP_KINDS:
        g = ctx.groups[kind]
        out[kind] = {
            "device": g.all_gather(torch.tensor([ctx.rank])).tolist(),
            "cpu": g.all_gather_object(os.getpid()),
        }
    return out


def _all_reduce(ctx, kind: str) -> list[float]:
    x = torch.tensor([ctx.rank + 1.0, 1.0, 10.0 * ctx.rank])
    ctx.groups[kind].all_reduce(x)
    return x.tolist()


def _barrier_wait(ctx) -> float:
    """Rank 0 arrives 1 s late at a world barrier; returns how long this rank waited."""
    g = ctx.groups.world
    g.barrier()
    t0 = time.perf_counter()
    if ctx.rank == 0:
        time.sleep(1.0)
    g.barrier()
    return time.perf_counter() - t0


# ---- one started controller ------------------------------------------------------------


@pytest.fixture(scope="module")
def started(ray_cluster):
    cpus_before = _wait_for_cpus(ray.cluster_resources()["CPU"])  # nothing else holds CPUs
    cfg = config_from_dict({"parallel": dict(DEGREES, placement_timeout_s=60)})
    controller = start_controller(cfg)
    yield controller, cpus_before
    ray.get(controller.shutdown.remote())  # a no-op when the last test shut it down
    ray.kill(controller)


def test_ranks_report_their_coordinates(started):
    controller, cpus_before = started
    me = ray.get(controller.run_on_ranks.remote(_whoami))
    assert [m["rank"] for m in me] == list(range(WORLD))
    assert len({m["pid"] for m in me}) == WORLD, "one process per rank"
    # dp2 tp2: rank = dp*2 + tp; ep2 x moe_tp2: rank = ep*2 + moe_tp
    assert [m["coord"] for m in me] == [(r // 2, 0, r % 2, r // 2, r % 2) for r in range(WORLD)]
    assert all(m["device"] == "cpu" and m["threads"] == 1 for m in me)
    assert _wait_for_cpus(cpus_before - WORLD) == cpus_before - WORLD, "the ranks hold one CPU each"


def test_every_group_has_the_layout_members(started):
    controller, _ = started
    views = ray.get(controller.run_on_ranks.remote(_group_views))
    pids = [m["pid"] for m in ray.get(controller.run_on_ranks.remote(_whoami))]
    for rank, view in enumerate(views):
        for kind in GROUP_KINDS:
            want = expected_members(kind, rank)
            assert view[kind]["device"] == want, (rank, kind)
            assert view[kind]["cpu"] == [pids[m] for m in want], (rank, kind)


@pytest.mark.parametrize("kind", GROUP_KINDS)
def test_collectives_per_group_kind(started, kind):
    controller, _ = started
    got = ray.get(controller.run_on_ranks.remote(_all_reduce, kind))
    for rank, sums in enumerate(got):
        members = expected_members(kind, rank)
        assert sums == [sum(m + 1.0 for m in members), float(len(members)), sum(10.0 * m for m in members)]


def test_barrier_over_every_group_kind(started):
    controller, _ = started
    for kind in GROUP_KINDS:
        seconds = ray.get(controller.barrier.remote(kind), timeout=60)
        assert 0 <= seconds < 60, kind
    waited = ray.get(controller.run_on_ranks.remote(_barrier_wait), timeout=60)
    assert all(w > 0.7 for w in waited[1:]), f"the barrier let ranks through early: {waited}"


def test_health_is_ok(started):
    controller, _ = started
    health = ray.get(controller.health.remote())
    assert health["status"] == "ok"
    assert "world=4" in health["layout"]
    pids = [m["pid"] for m in ray.get(controller.run_on_ranks.remote(_whoami))]
    assert [(h["rank"], h["device"], h["pid"]) for h in health["ranks"]] == [(r, "cpu", pids[r]) for r in range(WORLD)]


def test_shutdown_releases_the_placement_group(started):
    controller, cpus_before = started
    assert len(_placement_groups("CREATED")) == 1
    ray.get(controller.shutdown.remote())
    assert _placement_groups("CREATED") == []
    assert _wait_for_cpus(cpus_before) == cpus_before
    with pytest.raises(Exception, match="controller not started"):
        ray.get(controller.run_on_ranks.remote(_whoami))
    assert ray.get(controller.health.remote())["status"] == "starting"


# ---- layouts the cluster cannot place -------------------------------------------------------


@pytest.mark.parametrize(
    "parallel, missing",
    [
        (dict(tp=2, device="cuda"), ["1 node(s) with at least 2 CPU, 2 GPU", "Add 1 node(s)"]),
        (dict(tp=3, nodes=3), ["3 node(s) with at least 1 CPU", "the cluster has 2 node(s)", "Add 1 node(s)"]),
        (dict(tp=4, dp=2, nodes=1), ["1 node(s) with at least 8 CPU", "Add 1 node(s)"]),
    ],
)
def test_unplaceable_layout_fails_in_bounded_time(ray_cluster, parallel, missing):
    timeout_s = 2.0
    cfg = config_from_dict({"parallel": dict(parallel, placement_timeout_s=timeout_s)})
    t0 = time.monotonic()
    with pytest.raises(ClusterCapacityError) as e:
        start_controller(cfg)
    elapsed = time.monotonic() - t0
    assert elapsed < timeout_s + 25, f"took {elapsed:.1f} s with placement_timeout_s={timeout_s}"
    msg = str(e.value)
    assert "parallel.placement_timeout_s" in msg
    for text in missing:
        assert text in msg, msg
    assert _placement_groups("PENDING") == [] and _placement_groups("CREATED") == [], "the reservation leaked"
