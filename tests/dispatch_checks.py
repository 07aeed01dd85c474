"""Comparing two MoE dispatches as groupings: the order of rows inside a group is free
(the Triton kernel places rows by atomics), everything else must match."""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch


def assert_same_grouping(got, want) -> None:
    torch.testing.assert_close(got.weights, want.weights, rtol=1e-6, atol=1e-6)
    for field in ("physical", "ends", "groups"):
        assert torch.equal(getattr(got, field).long(), getattr(want, field).long()), field
    rows, ends = got.rows.long().cpu(), [0] + got.ends.long().tolist() + [got.rows.shape[0]]
    want_rows = want.rows.long().cpu()
    for lo, hi in zip(ends[:-1], ends[1:]):  # each group (and the foreign rows) holds the same tokens
        assert Counter(rows[lo:hi].tolist()) == Counter(want_rows[lo:hi].tolist()), (lo, hi)
    sorted_row = got.sorted_row.long().cpu()
    assert sorted(sorted_row.flatten().tolist()) == list(range(rows.shape[0])), "sorted_row is a permutation"
    tokens = torch.arange(sorted_row.shape[0]).unsqueeze(1).expand_as(sorted_row)
    assert torch.equal(rows[sorted_row], tokens), "each choice's row holds its token"
    # and that row lies in the same group as in the reference
    group_of = torch.bucketize(sorted_row, torch.tensor(ends[1:-1]), right=True)
    want_group = torch.bucketize(want.sorted_row.long().cpu(), torch.tensor(ends[1:-1]), right=True)
    assert torch.equal(group_of, want_group)


def choices_by_slot(d):
    """``d`` with each token's choices reordered by physical slot, then weight (rows not
    valid have every slot -1): for comparing dispatches whose choices come in different
    orders (the torch path's grouped routing keeps transformers' unsorted top-k order)."""
    by_weight = d.weights.argsort(dim=-1, descending=True)
    order = by_weight.gather(1, d.physical.gather(1, by_weight).argsort(dim=-1, stable=True))
    columns = {f: getattr(d, f).gather(1, order) for f in ("weights", "physical", "sorted_row")}
    return dataclasses.replace(d, **columns)
