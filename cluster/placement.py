"""Placement: rank layout + device kind -> Ray placement-group bundles; actor locations -> ranks.

One bundle per *node* of the layout, holding that node's ranks_per_node ranks
(strategy STRICT_PACK for one node, STRICT_SPREAD for several). Ray then
guarantees what the layout assumes: exactly ranks_per_node ranks on each node
and distinct nodes for distinct bundles. Several rank actors share a bundle;
Ray still gives each one its own GPU. (One bundle per rank with PACK cannot
promise an equal split over nodes.)

Pure: no ray import. The actors layer feeds Ray's answers in as plain values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from raymoe.cluster.layout import RankLayout

CPUS_PER_RANK = 1


class ClusterCapacityError(RuntimeError):
    """The Ray cluster cannot supply what the layout needs."""


@dataclass(frozen=True)
class PlacementPlan:
    bundles: tuple[dict[str, float], ...]  # one per node
    strategy: str
    num_cpus_per_rank: float
    num_gpus_per_rank: float


def plan_placement(layout: RankLayout, device: str) -> PlacementPlan:
    rpn = layout.ranks_per_node
    gpus = 1 if device == "cuda" else 0
    bundle = {"CPU": float(rpn * CPUS_PER_RANK)}
    if gpus:
        bundle["GPU"] = float(rpn * gpus)
    strategy = "STRICT_PACK" if layout.nodes == 1 else "STRICT_SPREAD"
    return PlacementPlan(
        bundles=tuple(dict(bundle) for _ in range(layout.nodes)),
        strategy=strategy,
        num_cpus_per_rank=float(CPUS_PER_RANK),
        num_gpus_per_rank=float(gpus),
    )


@dataclass(frozen=True, kw_only=True)
class ActorLocation:
    """What a started rank actor reports about where Ray put it."""

    actor_index: int  # index in the list of started actors
    bundle: int  # bundle (= layout node) it was started in
    node_id: str
    ip: str
    gpu_ids: tuple[int, ...]  # Ray-assigned GPU ids; empty on CPU


def assign_ranks(layout: RankLayout, located: Sequence[ActorLocation]) -> list[ActorLocation]:
    """Order located actors by rank: node by node (bundle order), then by GPU id.

    Returns ``ranks`` with ``ranks[r]`` the actor that becomes global rank r, so
    local rank = index on the node = position in the GPU-id order.
    """
    if len(located) != layout.world_size:
        raise ValueError(f"{len(located)} actors placed for a world of {layout.world_size}")
    ordered: list[ActorLocation] = []
    for node in range(layout.nodes):
        on_node = [p for p in located if p.bundle == node]
        if len(on_node) != layout.ranks_per_node:
            raise ValueError(f"bundle {node} holds {len(on_node)} rank actors, layout wants {layout.ranks_per_node}")
        if len({p.node_id for p in on_node}) != 1:
            raise ValueError(f"bundle {node} spans several Ray nodes: {sorted({p.node_id for p in on_node})}")
        gpus = [g for p in on_node for g in p.gpu_ids]
        if len(gpus) != len(set(gpus)):
            raise ValueError(f"node {on_node[0].ip}: two ranks were given the same GPU: {sorted(gpus)}")
        ordered.extend(sorted(on_node, key=lambda p: (p.gpu_ids, p.actor_index)))
    return ordered


def _fitting(plan: PlacementPlan, nodes: Sequence[Mapping[str, object]]) -> list[Mapping[str, object]]:
    need = plan.bundles[0]
    return [n for n in nodes if all(float(n["resources"].get(k, 0)) >= v for k, v in need.items())]  # type: ignore[union-attr]


def placement_fits(plan: PlacementPlan, nodes: Sequence[Mapping[str, object]]) -> bool:
    """Whether ``nodes`` (as describe_shortfall's) can hold ``plan``, one bundle a node."""
    return len(_fitting(plan, nodes)) >= len(plan.bundles)


def describe_shortfall(plan: PlacementPlan, nodes: Sequence[Mapping[str, object]], *, can_grow: bool = True) -> str:
    """Say what the cluster lacks for ``plan``.

    ``nodes``: alive Ray nodes, each {"ip": str, "resources": {"CPU": n, "GPU": n, ...}}.
    ``can_grow``: whether nodes can join (not a Ray started by this process, which is this
    machine alone).
    """
    need = plan.bundles[0]
    want = ", ".join(f"{int(v)} {k}" for k, v in sorted(need.items()))
    fitting = _fitting(plan, nodes)
    have = (
        "; ".join(
            f"{n['ip']}: " + ", ".join(f"{int(float(n['resources'].get(k, 0)))} {k}" for k in sorted(need))  # type: ignore[union-attr]
            for n in nodes
        )
        or "no alive nodes"
    )
    lines = [
        f"the layout needs {len(plan.bundles)} node(s) with at least {want} each (placement strategy {plan.strategy});",
        f"the cluster has {len(nodes)} node(s): {have};",
        f"{len(fitting)} node(s) could hold one share.",
    ]
    if not can_grow:
        lines.append("No node can join a Ray started here: lower parallel.nodes / the parallel degrees.")
    elif len(fitting) < len(plan.bundles):
        missing = len(plan.bundles) - len(fitting)
        lines.append(f"Add {missing} node(s) with {want}, or lower parallel.nodes / the parallel degrees.")
    else:
        lines.append("Enough nodes exist in total: other jobs may hold the resources.")
    return " ".join(lines)
