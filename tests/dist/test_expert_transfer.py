"""Expert weights move between EP ranks over gloo exactly as the plan says: weights that
encode their own expert id go through many random expert slots, and after every move every
slot on every rank holds the expert the new slots name. The same through ExpertMover, in
its background thread on the EP moves group, while the main thread keeps running
collectives on the EP group (as steps do)."""
from __future__ import annotations

import random

import torch

from raymoe.actors.engine.expert_mover import ExpertMover, MoveChunk
from raymoe.actors.models.expert_map import ExpertMap
from raymoe.cluster.expert_moves import plan_layer_moves
from raymoe.cluster.layout import RankLayout
from raymoe.comm.expert_transfer import receive_expert_copies, write_arrivals
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
            arrivals = receive_expert_copies(g, [w13, w2], plan_layer_moves(slots, new, ep), per_rank)
            write_arrivals([w13, w2], arrivals)
            slots = new
            for s in range(per_rank):
                want13, want2 = _expert_tensors(slots[first + s])
                assert torch.equal(w13[s], want13) and torch.equal(w2[s], want2), f"rank {rank} slot {first + s}"
    finally:
        destroy_distributed()


def _mover_worker(rank: int, world: int, init_methods: list[str], ep: int, seed: int) -> None:
    layout = RankLayout(dp=world, ep=ep)
    init_distributed(rank, world, init_methods[0], torch.device("cpu"))
    try:
        groups = build_groups(layout, rank, torch.device("cpu"), expert_moves=True)
        assert groups.ep_moves is not None and groups.ep_moves.device_group is not groups.ep.device_group
        per_rank, layers = 3, 3
        rng = random.Random(seed)
        slots = torch.tensor([_expert_slots(rng, per_rank * ep) for _ in range(layers)])
        first = groups.ep.rank_in_group * per_rank
        weights = [
            [torch.stack([_expert_tensors(int(row[first + s]))[i] for s in range(per_rank)]) for i in range(2)]
            for row in slots
        ]
        expert_map = ExpertMap(slots.clone(), NUM_LOGICAL, torch.device("cpu"))
        mover = ExpertMover(
            moves_group=groups.ep_moves,
            agreement_group=groups.world,
            expert_map=expert_map,
            layer_weights=weights,
            slots_per_rank=per_rank,
            ranks_per_node=None,
        )

        def consistent() -> None:
            """Every layer's weights hold what its map says: all old or all new, never mixed."""
            for layer in range(layers):
                for s in range(per_rank):
                    want13, want2 = _expert_tensors(int(expert_map.physical_to_logical_cpu[layer, first + s]))
                    assert torch.equal(weights[layer][0][s], want13) and torch.equal(weights[layer][1][s], want2)

        for _ in range(3):
            new = torch.tensor([_expert_slots(rng, per_rank * ep) for _ in range(layers)])
            mover.start([MoveChunk([0, 1], new[:2]), MoveChunk([2], new[2:])])  # two chunks
            steps = 0
            while mover.busy:  # "steps": collectives on the EP group while the copies travel
                x = torch.full((4,), float(rank))
                groups.ep.all_reduce(x)
                assert torch.equal(x, torch.full((4,), float(sum(groups.ep.ranks))))
                mover.advance()
                consistent()
                steps += 1
            assert steps >= 2 and mover.layers_done == layers
            assert torch.equal(expert_map.physical_to_logical, new)
            consistent()
    finally:
        destroy_distributed()


def test_expert_mover_in_background_ep4(run_world):
    run_world(_mover_worker, 4, 4, 7)


def test_random_moves_ep2(run_world):
    run_world(_worker, 2, 2, 11)


def test_random_moves_ep4_with_moe_tp(run_world):
    # 4 ranks, ep = 2: two EP groups (moe_tp = 2) move independently
    run_world(_worker, 4, 2, 23)


def test_random_moves_ep4(run_world):
    run_world(_worker, 4, 4, 5)
