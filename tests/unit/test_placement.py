"""Placement: bundles per node, actor locations -> ranks, and the shortfall message."""

from __future__ import annotations

import random

import pytest

from raymoe.cluster.layout import RankLayout
from raymoe.cluster.placement import ActorLocation, assign_ranks, describe_shortfall, placement_fits, plan_placement


@pytest.mark.parametrize(
    "kw, device",
    [
        (dict(tp=1), "cpu"),
        (dict(tp=4), "cpu"),
        (dict(tp=2, dp=2, ep=4), "cuda"),
        (dict(tp=2, dp=4, nodes=2), "cuda"),
        (dict(tp=2, dp=2, cp=2, nodes=4), "cpu"),
        (dict(tp=8, dp=2, nodes=2), "cuda"),
    ],
)
def test_plan_placement_one_bundle_per_node(kw, device):
    layout = RankLayout(**kw)
    nodes = kw.get("nodes", 1)
    per_node = layout.world_size // nodes
    plan = plan_placement(layout, device)
    want = {"CPU": float(per_node)}
    if device == "cuda":
        want["GPU"] = float(per_node)
    assert list(plan.bundles) == [want] * nodes
    assert plan.strategy == ("STRICT_PACK" if nodes == 1 else "STRICT_SPREAD")
    assert plan.num_cpus_per_rank == 1.0
    assert plan.num_gpus_per_rank == (1.0 if device == "cuda" else 0.0)
    # the per-rank asks add up to the bundles
    assert plan.num_cpus_per_rank * layout.world_size == sum(b["CPU"] for b in plan.bundles)
    assert plan.num_gpus_per_rank * layout.world_size == sum(b.get("GPU", 0.0) for b in plan.bundles)
    plan.bundles[0]["CPU"] = -1.0  # bundles are independent dicts
    assert all(b["CPU"] == per_node for b in plan.bundles[1:])


def _located(layout: RankLayout, gpus: bool, seed: int) -> list[ActorLocation]:
    """Actors as Ray might report them: GPU ids shuffled within each node, list shuffled."""
    rng = random.Random(seed)
    rpn = layout.ranks_per_node
    out = []
    for node in range(layout.nodes):
        ids = list(range(rpn))
        rng.shuffle(ids)
        for gpu in ids:
            out.append(dict(bundle=node, node_id=f"node-{node}", ip=f"10.0.0.{node}", gpu_ids=(gpu,) if gpus else ()))
    rng.shuffle(out)
    return [ActorLocation(actor_index=i, **p) for i, p in enumerate(out)]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("kw", [dict(tp=2, dp=4, nodes=2), dict(tp=4, nodes=1), dict(tp=2, dp=3, nodes=3)])
def test_assign_ranks_orders_by_node_then_gpu_id(kw, seed):
    layout = RankLayout(**kw)
    located = _located(layout, gpus=True, seed=seed)
    ranks = assign_ranks(layout, located)
    assert sorted(p.actor_index for p in ranks) == list(range(layout.world_size))
    rpn = layout.ranks_per_node
    for rank, p in enumerate(ranks):
        node, local = divmod(rank, rpn)
        assert p.bundle == node and p.node_id == f"node-{node}"
        assert p.gpu_ids == (local,), "local rank = position in the node's GPU-id order"


@pytest.mark.parametrize("seed", range(3))
def test_assign_ranks_on_cpu_orders_by_actor_index_within_node(seed):
    layout = RankLayout(tp=2, dp=2, nodes=2)
    ranks = assign_ranks(layout, _located(layout, gpus=False, seed=seed))
    for node in range(2):
        on_node = ranks[node * 2 : node * 2 + 2]
        assert all(p.bundle == node for p in on_node)
        assert [p.actor_index for p in on_node] == sorted(p.actor_index for p in on_node)


def test_assign_ranks_rejects_wrong_total():
    layout = RankLayout(tp=4)
    located = _located(layout, gpus=True, seed=0)
    with pytest.raises(ValueError, match="3 actors placed for a world of 4"):
        assign_ranks(layout, located[:3])


def test_assign_ranks_rejects_uneven_bundles():
    layout = RankLayout(tp=2, dp=2, nodes=2)
    located = [
        ActorLocation(actor_index=i, bundle=0 if i < 3 else 1, node_id=f"n{i >= 3}", ip="x", gpu_ids=(i,))
        for i in range(4)
    ]
    with pytest.raises(ValueError, match="bundle 0 holds 3 rank actors, layout wants 2"):
        assign_ranks(layout, located)


def test_assign_ranks_rejects_duplicate_gpus():
    layout = RankLayout(tp=4)
    located = [
        ActorLocation(actor_index=i, bundle=0, node_id="n", ip="10.0.0.9", gpu_ids=(min(i, 2),)) for i in range(4)
    ]
    with pytest.raises(ValueError, match="same GPU") as e:
        assign_ranks(layout, located)
    assert "10.0.0.9" in str(e.value)


def test_assign_ranks_rejects_bundle_spanning_nodes():
    layout = RankLayout(tp=2)
    located = [ActorLocation(actor_index=i, bundle=0, node_id=f"node-{i}", ip="x", gpu_ids=(i,)) for i in range(2)]
    with pytest.raises(ValueError, match="spans several Ray nodes") as e:
        assign_ranks(layout, located)
    assert "node-0" in str(e.value) and "node-1" in str(e.value)


# ---- describe_shortfall -------------------------------------------------------------------


def _node(ip: str, **res: float) -> dict:
    return {"ip": ip, "resources": res}


def test_shortfall_names_missing_gpus_and_nodes():
    plan = plan_placement(RankLayout(tp=4, dp=2, nodes=2), "cuda")  # 2 nodes x (4 CPU, 4 GPU)
    msg = describe_shortfall(plan, [_node("10.0.0.1", CPU=16.0, GPU=2.0), _node("10.0.0.2", CPU=2.0)])
    assert "2 node(s) with at least 4 CPU, 4 GPU each" in msg
    assert "STRICT_SPREAD" in msg
    assert "10.0.0.1: 16 CPU, 2 GPU" in msg and "10.0.0.2: 2 CPU, 0 GPU" in msg
    assert "0 node(s) could hold one share" in msg
    assert "Add 2 node(s) with 4 CPU, 4 GPU" in msg


def test_placement_fits_and_a_ray_that_cannot_grow():
    plan = plan_placement(RankLayout(tp=2, dp=2, nodes=2), "cuda")  # 2 nodes x (2 CPU, 2 GPU)
    one = [_node("a", CPU=8.0, GPU=8.0)]
    assert not placement_fits(plan, one)
    assert placement_fits(plan, one + [_node("b", CPU=2.0, GPU=2.0)])
    assert not placement_fits(plan, one + [_node("b", CPU=2.0, GPU=1.0)])
    msg = describe_shortfall(plan, one, can_grow=False)
    assert "No node can join" in msg and "Add" not in msg


def test_shortfall_counts_fitting_nodes():
    plan = plan_placement(RankLayout(tp=2, dp=3, nodes=3), "cpu")  # 3 nodes x 2 CPU
    msg = describe_shortfall(plan, [_node("a", CPU=4.0), _node("b", CPU=2.0)])
    assert "2 node(s) could hold one share" in msg
    assert "Add 1 node(s) with 2 CPU" in msg


def test_shortfall_when_enough_nodes_exist_blames_other_jobs():
    plan = plan_placement(RankLayout(tp=2), "cpu")
    msg = describe_shortfall(plan, [_node("a", CPU=8.0)])
    assert "other jobs may hold the resources" in msg
    assert "Add" not in msg


def test_shortfall_with_no_nodes():
    plan = plan_placement(RankLayout(tp=2), "cuda")
    msg = describe_shortfall(plan, [])
    assert "no alive nodes" in msg and "Add 1 node(s) with 2 CPU, 2 GPU" in msg
