"""Expert weights move between EP ranks over gloo exactly as the plan says: weights that
encode their own expert id go through many random expert slots, and after every move every
slot on every rank holds the expert the new slots name."""
from __future__ import annotations

import random

import torch

from raymoe.cluster.expert_moves import plan_layer_moves
from raymoe.cluster.layout import RankLayout
from raymoe.comm.expert_transfer import move_expert_weights
from raymoe.comm.groups import build_groups, destroy_distributed, init_distributed

NUM_LOGICAL = 8
ROUNDS = 12


def _expert_tensors(logical: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Content that identifies the expert (and is not constant, so a partial copy shows)."""
    w13 = torch.arange(6 * 4, dtype=torch.float32).view(6, 4) + 1000 * logical
    w2 = torch.arange(4 * 3, dtype=torch.float32).view(4, 3) - 1000 * logical
    return w13, w2


def _expert_slots(rng: random.Random, slots: int) -> list[int]:
    row = list(range(NUM_LOGICAL)) + [rng.randrange(NUM_LOGICAL) for _ in range(slots - NUM_LOGICAL)]
    rng.shuffle(row)
    return row


def _worker(rank: int, world: int, init_methods: list[str], ep: int, seed: int) -> None:
    layout = RankLayout(dp=world, ep=ep)
    init_distributed(rank, world, init_methods[0], torch.device("cpu"))
    try:
        groups = build_groups(layout, rank, torch.device("cpu"))
        g = groups.ep
        per_rank = 3 if ep >= 4 else 6  # P = per_rank * ep >= NUM_LOGICAL
        rng = random.Random(seed)  # the same plans on every rank
        slots = _expert_slots(rng, per_rank * ep)
        first = g.rank_in_group * per_rank
        w13 = torch.stack([_expert_tensors(slots[first + s])[0] for s in range(per_rank)])
        w2 = torch.stack([_expert_tensors(slots[first + s])[1] for s in range(per_rank)])
        for _ in range(ROUNDS):
            new = _expert_slots(rng, per_rank * ep)
            move_expert_weights(g, [w13, w2], plan_layer_moves(slots, new, ep), per_rank)
            slots = new
            for s in range(per_rank):
                want13, want2 = _expert_tensors(slots[first + s])
                assert torch.equal(w13[s], want13) and torch.equal(w2[s], want2), f"rank {rank} slot {first + s}"
    finally:
        destroy_distributed()


def test_random_moves_ep2(run_world):
    run_world(_worker, 2, 2, 11)


def test_random_moves_ep4_with_moe_tp(run_world):
    # 4 ranks, ep = 2: two EP groups (moe_tp = 2) move independently
    run_world(_worker, 4, 2, 23)


def test_random_moves_ep4(run_world):
    run_world(_worker, 4, 4, 5)
