"""Context parallelism's split of a step over the cp ranks of its replica.

The token at position p belongs to cp rank p % cp: that rank holds its KV (see
attention_torch.py) and runs it through every layer; attention gathers the queries of
the replica's step over the cp group, and the MoE and the sampled rows gather their
rows the same way. A gathered tensor holds each member's rows, in step order, padded to
``pad`` rows: member c's rows at [c * pad, c * pad + counts[c]). Every cp rank of a
replica computes the same split from the same step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ContextSplit:
    own: np.ndarray  # [n] int64: the step rows this rank runs, in step order
    gathered_row: np.ndarray  # [T] int64: each step row's row in a gathered [cp * pad] tensor
    counts: np.ndarray  # [cp] int64: rows of each member
    pad: int  # rows each member's share is padded to when gathered

    @property
    def rows(self) -> int:
        return int(self.own.shape[0])

    def valid(self) -> np.ndarray:
        """[cp * pad] bool: the gathered rows that are real."""
        return (np.arange(self.pad)[None, :] < self.counts[:, None]).ravel()


def context_split(positions: np.ndarray, cp: int, rank: int) -> ContextSplit:
    """The split of a step whose tokens sit at ``positions`` [T] over ``cp`` ranks, seen from ``rank``."""
    owner = positions % cp
    counts = np.bincount(owner, minlength=cp).astype(np.int64)
    pad = int(counts.max(initial=0))
    # each row's index among its owner's rows (stable: step order within a member)
    order = np.argsort(owner, kind="stable")
    index_in_owner = np.empty_like(owner)
    index_in_owner[order] = np.arange(owner.shape[0]) - np.repeat(np.cumsum(counts) - counts, counts)
    return ContextSplit(
        own=np.flatnonzero(owner == rank), gathered_row=owner * pad + index_in_owner, counts=counts, pad=pad
    )
