"""The per-layer move plan turns any old expert slots into any new ones, reading only
copies that exist, locally when the destination rank already holds one."""

from __future__ import annotations

import random

import pytest

from raymoe.cluster.expert_moves import cross_node_copies, plan_layer_moves


def _random_expert_slots(rng: random.Random, num_logical: int, slots: int) -> list[int]:
    row = list(range(num_logical)) + [rng.randrange(num_logical) for _ in range(slots - num_logical)]
    rng.shuffle(row)
    return row


@pytest.mark.parametrize("seed", range(40))
def test_moves_turn_old_into_new(seed):
    rng = random.Random(seed)
    ep = rng.choice([1, 2, 4, 8])
    num_logical = rng.choice([4, 8, 16])
    slots = ep * rng.randint(max(1, -(-num_logical // ep)), -(-num_logical // ep) + 3)
    old, new = _random_expert_slots(rng, num_logical, slots), _random_expert_slots(rng, num_logical, slots)
    per_rank = slots // ep
    moves = plan_layer_moves(old, new, ep)
    # simulate: every destination reads the *old* content of its source slot
    result = list(old)
    for m in moves:
        assert old[m.src_slot] == m.logical_expert, "a move reads a slot that does not hold its expert"
        assert m.src_rank == m.src_slot // per_rank
        result[m.physical_slot] = old[m.src_slot]
    assert result == new
    assert {m.physical_slot for m in moves} == {s for s in range(slots) if old[s] != new[s]}
    for m in moves:  # a rank that already holds the expert copies locally
        dst = m.dst_rank(per_rank)
        if any(old[s] == m.logical_expert for s in range(dst * per_rank, (dst + 1) * per_rank)):
            assert m.src_rank == dst


def test_unchanged_expert_slots_move_nothing():
    row = [0, 1, 2, 3, 0, 1]
    assert plan_layer_moves(row, row, 2) == []


def test_remote_sends_are_spread_over_holders():
    # expert 0 is held by ranks 0 and 1; ranks 2 and 3 each need it
    old = [0, 1, 0, 2, 3, 4, 5, 6]
    new = [0, 1, 0, 2, 0, 4, 0, 6]
    sources = sorted(m.src_rank for m in plan_layer_moves(old, new, 4))
    assert sources == [0, 1]


def test_missing_expert_is_an_error():
    with pytest.raises(ValueError, match="no copy"):
        plan_layer_moves([0, 1, 2, 3], [0, 1, 2, 4], 2)


def test_a_holder_on_the_destination_node_sends_first():
    # ranks 0, 1 on node 0; ranks 2, 3 on node 1. Rank 3 needs expert 0: rank 2 holds it on its node
    old = [0, 1, 0, 2, 0, 4, 5, 6]
    new = [0, 1, 0, 2, 0, 4, 0, 6]
    assert [m.src_rank for m in plan_layer_moves(old, new, 4)] == [0]
    assert [m.src_rank for m in plan_layer_moves(old, new, 4, ranks_per_node=2)] == [2]


@pytest.mark.parametrize("seed", range(8))
def test_no_cross_node_copy_when_the_node_holds_the_expert(seed):
    # 256 experts over 32 ranks on 4 nodes, 9 slots per rank
    rng = random.Random(seed)
    ep, ranks_per_node, num_logical, slots = 32, 8, 256, 288
    per_rank = slots // ep
    old, new = _random_expert_slots(rng, num_logical, slots), _random_expert_slots(rng, num_logical, slots)
    moves = plan_layer_moves(old, new, ep, ranks_per_node=ranks_per_node)
    assert moves == plan_layer_moves(tuple(old), tuple(new), ep, ranks_per_node=ranks_per_node)  # deterministic
    result = list(old)
    for m in moves:
        assert old[m.src_slot] == m.logical_expert and m.src_rank == m.src_slot // per_rank
        result[m.physical_slot] = old[m.src_slot]
    assert result == new

    def node(rank: int) -> int:
        return rank // ranks_per_node

    sends = [0] * ep
    for m in moves:
        dst = m.dst_rank(per_rank)
        holders = {s // per_rank for s in range(slots) if old[s] == m.logical_expert}
        if dst in holders:
            assert m.src_rank == dst
            continue
        near = {r for r in holders if node(r) == node(dst)}
        eligible = near or holders
        assert m.src_rank in eligible, "a cross-node copy although the destination's node holds the expert"
        # sends stay spread: the source had sent the least so far among the eligible holders
        assert sends[m.src_rank] == min(sends[r] for r in eligible)
        sends[m.src_rank] += 1
    without_nodes = plan_layer_moves(old, new, ep)
    kw = {"slots_per_rank": per_rank, "ranks_per_node": ranks_per_node}
    assert cross_node_copies(moves, **kw) < cross_node_copies(without_nodes, **kw)
    assert cross_node_copies(moves, **kw) == sum(node(m.src_rank) != node(m.dst_rank(per_rank)) for m in moves)


@pytest.mark.parametrize("ranks_per_node", [0, 3])
def test_ranks_per_node_must_divide_ep(ranks_per_node):
    with pytest.raises(ValueError, match="ranks_per_node"):
        plan_layer_moves([0, 1, 2, 3], [0, 1, 2, 3], 4, ranks_per_node=ranks_per_node)
