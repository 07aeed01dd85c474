"""Which expert copies travel where when a layer switches expert slots. Pure.

Every physical slot whose logical expert changes receives it from a slot that
holds that expert in the old slots: its own rank when the rank already
holds a copy (a local copy, no traffic), else a holder rank on its own node when
there is one (intra-node traffic), else any holder rank; among the eligible
holders, the one asked to send the least so far (spreading the traffic), then
the lowest slot. Every rank computes the same list from the same two slot rows,
so the P2P sends and receives pair up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class ExpertMove:
    physical_slot: int  # destination slot (physical id)
    logical_expert: int
    src_rank: int  # EP rank that holds a copy in the old slots
    src_slot: int  # that copy's physical slot

    def dst_rank(self, slots_per_rank: int) -> int:
        return self.physical_slot // slots_per_rank


def plan_layer_moves(
    old_physical_to_logical: Sequence[int],
    new_physical_to_logical: Sequence[int],
    ep: int,
    *,
    ranks_per_node: int | None = None,
) -> list[ExpertMove]:
    """Moves that turn one layer's old expert slots [P] into the new ones [P] (P % ep == 0).

    ranks_per_node: EP ranks per node (rank r on node r // ranks_per_node); None = one node.
    Raises ValueError if the new slots need an expert the old ones lack, or if
    ranks_per_node does not divide ep.
    """
    old, new = list(old_physical_to_logical), list(new_physical_to_logical)
    if len(old) != len(new) or len(old) % ep:
        raise ValueError(f"slot rows of {len(old)} and {len(new)} slots do not fit ep={ep}")
    per_node = ep if ranks_per_node is None else ranks_per_node
    if per_node < 1 or ep % per_node:
        raise ValueError(f"ranks_per_node={ranks_per_node}: must be >= 1 and divide ep={ep}")
    per_rank = len(old) // ep
    holders: dict[int, list[int]] = {}
    for slot, logical in enumerate(old):
        holders.setdefault(logical, []).append(slot)
    sends = [0] * ep
    moves = []
    for slot, (before, after) in enumerate(zip(old, new)):
        if before == after:
            continue
        if after not in holders:
            raise ValueError(f"logical expert {after} has no copy in the old slots")
        rank = slot // per_rank
        local = [s for s in holders[after] if s // per_rank == rank]
        if local:
            src = local[0]
        else:
            node = rank // per_node
            near = [s for s in holders[after] if s // per_rank // per_node == node]
            src = min(near or holders[after], key=lambda s: (sends[s // per_rank], s))
            sends[src // per_rank] += 1
        moves.append(ExpertMove(slot, after, src // per_rank, src))
    return moves


def cross_node_copies(moves: Sequence[ExpertMove], *, slots_per_rank: int, ranks_per_node: int) -> int:
    """Moves whose source rank sits on another node than their destination rank."""
    return sum(m.src_rank // ranks_per_node != m.dst_rank(slots_per_rank) // ranks_per_node for m in moves)
