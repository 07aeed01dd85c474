"""Context parallelism's split of a step over the cp ranks (context_split.py): every rank
owns the tokens whose position it holds the KV of, and gathering every member's rows,
padded, then indexing by ``gathered_row`` gives back the step's rows in step order."""

from __future__ import annotations

import numpy as np
import pytest

from raymoe.actors.engine.context_split import context_split


@pytest.mark.parametrize("seed", range(20))
def test_gathering_every_members_rows_restores_the_step(seed):
    rng = np.random.default_rng(seed)
    cp = int(rng.integers(1, 5))
    # a step of a few chunks, each a run of consecutive positions from some start
    positions = np.concatenate(
        [s + np.arange(n) for s, n in zip(rng.integers(0, 100, 4), rng.integers(0, 9, 4))]
    ).astype(np.int64)
    values = rng.normal(size=positions.shape[0])
    splits = [context_split(positions, cp, r) for r in range(cp)]
    pad = splits[0].pad
    assert all(s.pad == pad and np.array_equal(s.gathered_row, splits[0].gathered_row) for s in splits)
    gathered = np.full(cp * pad, np.nan)
    for r, s in enumerate(splits):
        assert np.array_equal(s.own, np.flatnonzero(positions % cp == r))  # its KV's tokens
        assert s.rows == s.counts[r]
        gathered[r * pad : r * pad + s.rows] = values[s.own]
    assert np.array_equal(gathered[splits[0].gathered_row], values)
    assert np.array_equal(~np.isnan(gathered), splits[0].valid())


def test_an_empty_step_splits_into_nothing():
    s = context_split(np.zeros(0, dtype=np.int64), 4, 2)
    assert (s.rows, s.pad, s.valid().size, s.gathered_row.size) == (0, 0, 0, 0)
