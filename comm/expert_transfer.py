"""Move expert weights between EP ranks with batched point-to-point on the EP device group."""

from __future__ import annotations

from typing import Sequence

import torch

from raymoe.cluster.expert_moves import ExpertMove
from raymoe.comm.group import GroupCoordinator


def move_expert_weights(
    ep: GroupCoordinator, weights: Sequence[torch.Tensor], moves: Sequence[ExpertMove], slots_per_rank: int
) -> int:
    """Apply one layer's moves to this rank's expert tensors, in place.

    ``weights``: this rank's tensors of the layer, each [slots_per_rank, ...] (e.g. w13,
    w2); slot s of this rank is physical slot ep.rank_in_group * slots_per_rank + s.
    ``moves``: the same list on every rank of ``ep`` (see cluster/expert_moves.py).
    Incoming copies land in buffers first and are written only after every send
    has completed, so a slot can be both a source and a destination. Returns the
    number of bytes this rank received.
    """
    me = ep.rank_in_group
    first = me * slots_per_rank
    arrivals: list[tuple[int, list[torch.Tensor]]] = []
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
            arrivals.append((m.physical_slot - first, buffers))
        elif m.src_rank == me:
            sends += [(w[m.src_slot - first], dst) for w in weights]
    ep.p2p_ops(sends, recvs)
    for slot, buffers in arrivals:
        for w, b in zip(weights, buffers):
            w[slot].copy_(b)
    return sum(b.numel() * b.element_size() for b, _ in recvs)
