"""A layout over two Ray nodes (dp2 tp2 ep2, nodes=2): ranks 0-1 on one node and 2-3 on
the other, local ranks by node, and groups that cross nodes work."""

from __future__ import annotations

import sys

import pytest
import ray
import torch

from raymoe.actors.controller import Controller
from raymoe.cluster.config import config_from_dict
from raymoe.cluster.layout import GROUP_KINDS

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

WORLD, RPN = 4, 2
# members written out for dp2 x tp2 (rank = 2*dp + tp) and ep2 x moe_tp2 (rank = 2*ep + moe_tp)
MEMBERS = {
    "world": [[0, 1, 2, 3]],
    "tp": [[0, 1], [2, 3]],
    "cp": [[0], [1], [2], [3]],
    "attn": [[0, 1], [2, 3]],
    "dp": [[0, 2], [1, 3]],
    "ep": [[0, 2], [1, 3]],
    "moe_tp": [[0, 1], [2, 3]],
}


def _where(ctx) -> dict:
    return {
        "rank": ctx.rank,
        "node_id": ray.get_runtime_context().get_node_id(),
        "node": ctx.coord.node,
        "local_rank": ctx.coord.local_rank,
    }


def _collectives(ctx) -> dict:
    out = {}
    for kind in GROUP_KINDS:
        g = ctx.groups[kind]
        x = torch.tensor([float(ctx.rank + 1)])
        out[kind] = {
            "members": g.all_gather(torch.tensor([ctx.rank])).tolist(),
            "sum": g.all_reduce(x).item(),
            "objects": g.all_gather_object(ray.get_runtime_context().get_node_id()),
        }
    ctx.groups.world.barrier()
    return out


@pytest.fixture(scope="module")
def two_node_controller(ray_cluster):
    cfg = config_from_dict({"parallel": dict(dp=2, tp=2, ep=2, nodes=2, placement_timeout_s=60)})
    controller = ray.remote(Controller).options(num_cpus=0).remote(cfg)
    info = ray.get(controller.start.remote())
    yield controller, info
    ray.get(controller.shutdown.remote())
    ray.kill(controller)


def test_ranks_split_over_the_two_nodes_in_order(ray_cluster, two_node_controller):
    controller, info = two_node_controller
    reported = [r["node_id"] for r in info["ranks"]]
    assert [r["rank"] for r in info["ranks"]] == list(range(WORLD))
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(alive) == 2 and set(reported) == alive
    assert reported[0] == reported[1] and reported[2] == reported[3] and reported[0] != reported[2]

    where = ray.get(controller.run_on_ranks.remote(_where))
    assert [w["node_id"] for w in where] == reported, "the ranks run where they reported"
    assert [(w["node"], w["local_rank"]) for w in where] == [divmod(r, RPN) for r in range(WORLD)]


def test_groups_across_nodes_work(two_node_controller):
    controller, info = two_node_controller
    node_of = [r["node_id"] for r in info["ranks"]]
    got = ray.get(controller.run_on_ranks.remote(_collectives), timeout=120)
    crossing = 0
    for rank, per_kind in enumerate(got):
        for kind, members in ((k, next(g for g in MEMBERS[k] if rank in g)) for k in GROUP_KINDS):
            r = per_kind[kind]
            assert r["members"] == members, (rank, kind)
            assert r["sum"] == sum(m + 1.0 for m in members), (rank, kind)
            assert r["objects"] == [node_of[m] for m in members], (rank, kind)
            crossing += len({node_of[m] for m in members}) > 1
    assert crossing > 0, "no group crossed nodes: the test proves nothing"
