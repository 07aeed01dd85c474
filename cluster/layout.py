"""Rank layout: parallel degrees -> every rank's coordinates and every group's members.

Semantics
---------
Attention side: ``world_size = dp * cp * tp``. A rank's attention coordinates are
(dp, cp, tp) with tp varying fastest, so a TP group is a run of adjacent ranks
(adjacent ranks share a node)::

    rank = (dp_index * cp + cp_index) * tp + tp_index

* ``tp``   tensor parallel: attention heads, dense MLP and vocab are split over it.
* ``cp``   context parallel: a sequence's tokens/KV are split over it.
* ``attn`` the attention group, cp x tp ranks of one DP replica. Attention-side
           collectives (head all-reduce, "is everyone ready") must use this group
           whenever cp > 1; with cp == 1 it has the same members as ``tp``.
* ``dp``   data parallel: ranks with the same (cp, tp) index across DP replicas.
           Each DP replica runs its own batch.

MoE side: the MoE layers span the whole world, split as ``world_size = ep * moe_tp``
(``ep`` must divide the world size; ``moe_tp = world_size // ep``)::

    rank = ep_index * moe_tp + moe_tp_index

* ``ep``     expert parallel: each member holds a different share of the experts.
* ``moe_tp`` ranks holding the same experts, each with a slice of every expert's
             intermediate dimension.
* ``world``  every rank.

Nodes: ``world_size`` must be a multiple of ``nodes``; node n holds the
``ranks_per_node`` consecutive ranks starting at ``n * ranks_per_node``, and a
rank's local rank is its index on its node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GROUP_KINDS = ("world", "tp", "cp", "attn", "dp", "ep", "moe_tp")


@dataclass(frozen=True, kw_only=True)
class RankCoord:
    """Where one rank sits: attention coords (dp, cp, tp), MoE coords (ep, moe_tp), node."""

    rank: int
    dp: int
    cp: int
    tp: int
    ep: int
    moe_tp: int
    node: int
    local_rank: int


@dataclass(frozen=True, kw_only=True)
class RankLayout:
    tp: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1
    nodes: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "dp", "cp", "ep", "nodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"parallel.{name}: must be an integer >= 1, got {value!r}")
        world = self.world_size
        if world % self.ep:
            raise ValueError(
                f"parallel.ep: ep={self.ep} must divide the world size dp*cp*tp = "
                f"{self.dp}*{self.cp}*{self.tp} = {world} (MoE layers span the whole world "
                f"as ep x moe_tp); use an ep in {_divisors(world)}"
            )
        if world % self.nodes:
            raise ValueError(
                f"parallel.nodes: {self.nodes} nodes cannot hold an equal share of "
                f"{world} ranks (dp*cp*tp); use nodes in {_divisors(world)}"
            )

    @classmethod
    def from_config(cls, parallel: Any) -> "RankLayout":
        return cls(tp=parallel.tp, dp=parallel.dp, cp=parallel.cp, ep=parallel.ep, nodes=parallel.nodes)

    @property
    def world_size(self) -> int:
        return self.dp * self.cp * self.tp

    @property
    def moe_tp(self) -> int:
        return self.world_size // self.ep

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nodes

    def rank_of(self, dp: int, cp: int, tp: int) -> int:
        """Global rank of attention coordinates (dp, cp, tp)."""
        assert 0 <= dp < self.dp and 0 <= cp < self.cp and 0 <= tp < self.tp
        return (dp * self.cp + cp) * self.tp + tp

    def coord(self, rank: int) -> RankCoord:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of size {self.world_size}")
        tp = rank % self.tp
        cp = (rank // self.tp) % self.cp
        dp = rank // (self.tp * self.cp)
        return RankCoord(
            rank=rank,
            dp=dp,
            cp=cp,
            tp=tp,
            ep=rank // self.moe_tp,
            moe_tp=rank % self.moe_tp,
            node=rank // self.ranks_per_node,
            local_rank=rank % self.ranks_per_node,
        )

    def groups(self, kind: str) -> list[list[int]]:
        """All groups of one kind, each an ascending list of global ranks.

        Groups come in a fixed global order, so every rank can create them in
        the same sequence (torch.distributed requires that).
        """
        ranks = range(self.world_size)
        if kind == "world":
            return [list(ranks)]
        key = {
            "tp": lambda c: (c.dp, c.cp),
            "cp": lambda c: (c.dp, c.tp),
            "attn": lambda c: (c.dp,),
            "dp": lambda c: (c.cp, c.tp),
            "ep": lambda c: (c.moe_tp,),
            "moe_tp": lambda c: (c.ep,),
        }.get(kind)
        if key is None:
            raise ValueError(f"unknown group kind {kind!r}; kinds are {', '.join(GROUP_KINDS)}")
        by_key: dict[tuple, list[int]] = {}
        for r in ranks:
            by_key.setdefault(key(self.coord(r)), []).append(r)
        return [by_key[k] for k in sorted(by_key)]

    def describe(self) -> str:
        return (
            f"world={self.world_size} (dp={self.dp} x cp={self.cp} x tp={self.tp}; "
            f"ep={self.ep} x moe_tp={self.moe_tp}) on {self.nodes} node(s) x {self.ranks_per_node}"
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
