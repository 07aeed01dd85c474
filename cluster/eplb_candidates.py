"""The two candidate placements of one layer that eplb_planner.py chooses between: ``fresh``
(steps 1-4 of its plan: nodes packed, replicas counted and packed, the bins matched to the
current ranks) and ``warm`` (its step 5: each expert's current node kept, improved by swaps,
the fresh plan's replica counts where they fit, then the local search).

Pure (numpy + stdlib). Shapes and conventions as eplb_planner.py's."""

from __future__ import annotations

import numpy as np

from raymoe.cluster.eplb_matching import keep_slots, match_to_current
from raymoe.cluster.eplb_packing import Bins, greedy_replica_counts, pack_greedy, refine, repair_duplicates


def fresh_candidate(load: np.ndarray, current: np.ndarray, ep: int, nodes: int, groups: int) -> np.ndarray:
    """Steps 1-4: pack from scratch, then match the bins to the current ranks."""
    bins = [
        experts[_pack_node(load[experts], ep // nodes, current.size // ep)]
        for experts in _split_nodes(load, nodes, groups)
    ]
    return match_to_current(np.stack(bins), current, ep, nodes=nodes, num_logical=load.size)


def _split_nodes(load: np.ndarray, nodes: int, groups: int) -> np.ndarray:
    """Step 1: logical experts of each node [nodes, E/nodes], sorted (whole groups of
    E/groups consecutive experts when groups > 1)."""
    if nodes == 1:
        return np.arange(load.size)[None, :]
    unit_load = load.reshape(groups, -1).sum(axis=1) if groups > 1 else load
    per_node = unit_load.size // nodes
    empty = np.full(unit_load.size, -1)
    units = np.arange(unit_load.size)
    b = Bins(pack_greedy(unit_load, units, empty, k=per_node, slot_load=np.zeros(unit_load.size)), unit_load, per_node)
    refine(b)
    return np.sort(_experts_of_units(b.slots.reshape(nodes, per_node), load.size, groups), axis=1)


def _experts_of_units(units: np.ndarray, num_experts: int, groups: int) -> np.ndarray:
    """[nodes, units per node] of experts (groups == 1) or groups -> [nodes, experts per node]."""
    if groups == 1:
        return units
    size = num_experts // groups
    return (units[..., None] * size + np.arange(size)).reshape(units.shape[0], -1)


def _pack_node(load: np.ndarray, ranks: int, k: int) -> np.ndarray:
    """Steps 2-3 for one node: local expert id of each of its ranks*k slots."""
    counts = greedy_replica_counts(load, ranks * k, ranks)
    per_replica = load / counts
    items = np.repeat(np.arange(load.size), counts)
    empty = np.full(ranks * k, -1)
    b = Bins(pack_greedy(per_replica[items], items, empty, k=k, slot_load=np.zeros(ranks * k)), load, k)
    repair_duplicates(b)
    refine(b)
    return b.slots


def warm_candidate(
    load: np.ndarray,
    current: np.ndarray,
    ep: int,
    *,
    nodes: int,
    groups: int,
    hint: np.ndarray,
    good_enough: float,
    budget: int,
) -> np.ndarray | None:
    """Step 5; None when some expert's replicas span nodes (no warm start in that layout) or
    when it would change ``budget`` slots (the fresh plan's count) or more. hint [E] = the
    fresh plan's replica counts, reused for a node whose experts it fits; the local searches
    stop once the max rank load is <= good_enough."""
    slots_per_node, k, ranks = current.size // nodes, current.size // ep, ep // nodes
    per_node = current.reshape(nodes, slots_per_node)
    node_experts = _warm_nodes(load, per_node, groups, good_enough * ranks)
    if node_experts is None:
        return None
    out = np.empty_like(current)
    for n, experts in enumerate(node_experts):
        counts = hint[experts]
        if counts.sum() != slots_per_node:
            counts = greedy_replica_counts(load[experts], slots_per_node, ranks)
        local = np.searchsorted(experts, per_node[n]).clip(max=experts.size - 1)
        local = np.where(experts[local] == per_node[n], local, -1)  # -1: expert left the node
        local, budget = _warm_node(load[experts], local, counts, k=k, good_enough=good_enough, budget=budget)
        if local is None:
            return None
        out[n * slots_per_node : (n + 1) * slots_per_node] = experts[local]
    # swaps in a row can carry an expert back to its own rank in another slot
    return keep_slots(out.reshape(ep, k), current.reshape(ep, k)).ravel()


def _warm_nodes(load: np.ndarray, per_node: np.ndarray, groups: int, good_enough: float) -> list[np.ndarray] | None:
    """Experts of each node [nodes][sorted ids]: the current ones, rebalanced by swapping
    experts (whole groups when groups > 1) between nodes (local search, until the heaviest
    node is <= good_enough) when every node holds E/nodes of them; None when some expert
    spans nodes, or (groups > 1) some group does."""
    members = [np.unique(row) for row in per_node]
    if sum(m.size for m in members) != load.size:
        return None
    nodes = len(members)
    if nodes == 1 or any(m.size != load.size // nodes for m in members):
        return None if groups > 1 else members
    unit_load, units = load, members
    if groups > 1:
        size = load.size // groups
        units = [np.unique(m // size) for m in members]
        if any(u.size * size != m.size for u, m in zip(units, members)):
            return None
        unit_load = load.reshape(groups, -1).sum(axis=1)
    b = Bins(np.concatenate(units), unit_load, unit_load.size // nodes)
    refine(b, good_enough)
    node_units = b.slots.reshape(nodes, -1)
    return [np.sort(row) for row in _experts_of_units(node_units, load.size, groups)]


def _warm_node(
    load: np.ndarray, slots: np.ndarray, counts: np.ndarray, *, k: int, good_enough: float, budget: int
) -> tuple[np.ndarray | None, int]:
    """Turn one node's current slots (local expert ids, -1 = free) into ``counts`` replicas
    per expert, changing few slots, then repair and refine. Returns the slots (None once
    ``budget`` slots or more change) and the budget left."""
    origin = slots
    ranks = slots.size // k
    per_replica = load / counts
    slots = slots.copy()
    held = np.flatnonzero(slots >= 0)
    # surplus replicas leave the most loaded ranks: per expert, its slots heaviest rank first
    rank_load = np.bincount(held // k, weights=per_replica[slots[held]], minlength=ranks)
    order = held[np.lexsort((-rank_load[held // k], slots[held]))]
    by_expert = slots[order]
    nth = np.arange(order.size) - np.searchsorted(by_expert, by_expert)
    surplus = np.maximum(np.bincount(slots[held], minlength=load.size) - counts, 0)
    slots[order[nth < surplus[by_expert]]] = -1
    # missing replicas fill the freed slots, heaviest first onto the least loaded ranks
    need = np.repeat(np.arange(load.size), np.maximum(counts - np.bincount(slots[slots >= 0], minlength=load.size), 0))
    slot_load = np.where(slots >= 0, per_replica[slots], 0.0)
    slots = pack_greedy(per_replica[need], need, slots, k=k, slot_load=slot_load)
    b = Bins(slots, load, k)
    repair_duplicates(b)
    # past max_steps, the fresh plan moves less
    refine(b, good_enough, origin=origin, max_changed=budget, max_steps=slots.size // 4 + 16)
    left = budget - int((b.slots != origin).sum())
    return (b.slots, left) if left > 0 else (None, left)


# ---- movement: match packed bins to the current ranks ------------------------------
