"""Move expert weights between EP ranks with batched point-to-point on an EP device group."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from raymoe.cluster.expert_moves import ExpertMove
from raymoe.comm.group import GroupCoordinator


@dataclass(frozen=True)
class ExpertArrival:
    """One expert copy that has landed in a buffer of this rank, not yet in its slot."""

    local_slot: int  # slot index in this rank's expert tensors
    buffers: list[torch.Tensor]  # one per expert tensor (e.g. w13, w2)


def receive_expert_copies(
    group: GroupCoordinator, weights: Sequence[torch.Tensor], moves: Sequence[ExpertMove], slots_per_rank: int
) -> list[ExpertArrival]:
    """Send this rank's share of one layer's moves and receive the copies its slots need
    into new buffers; the expert tensors themselves are only read.

    ``weights``: this rank's tensors of the layer, each [slots_per_rank, ...] (e.g. w13,
    w2); slot s of this rank is physical slot group.rank_in_group * slots_per_rank + s.
    ``moves``: the same list on every rank of ``group`` (see cluster/expert_moves.py).
    Landing in buffers lets a slot be both a source and a destination, and lets steps keep
    reading the old slots until ``write_arrivals``.
    """
    me = group.rank_in_group
    first = me * slots_per_rank
    arrivals: list[ExpertArrival] = []
    sends: list[tuple[torch.Tensor, int]] = []
    recvs: list[tuple[torch.Tensor, int]] = []
    for m in moves:
        dst = m.dst_rank(slots_per_rank)
        if dst == me:
            buffers = [torch.empty_like(w[0]) for w in weights]
            if m.src_rank == me:
                for b, w in zip(buffers, weights):
                    b.copy_(w[m.src_slot - first])
            else:
                recvs += [(b, m.src_rank) for b in buffers]
            arrivals.append(ExpertArrival(m.physical_slot - first, buffers))
        elif m.src_rank == me:
            sends += [(w[m.src_slot - first], dst) for w in weights]
    group.p2p_ops(sends, recvs)
    return arrivals


def write_arrivals(weights: Sequence[torch.Tensor], arrivals: Sequence[ExpertArrival]) -> None:
    """Copy landed experts into their slots, in place (CUDA graphs keep their pointers)."""
    for arrival in arrivals:
        for w, b in zip(weights, arrival.buffers):
            w[arrival.local_slot].copy_(b)
