"""Matching a packed plan to the current expert slots: ranks (and nodes) are
interchangeable, so the packed bins go to the current ranks that share the most experts
with them, and inside a rank every expert that stays keeps the slot it has. Pure."""

from __future__ import annotations

from collections import Counter

import numpy as np


def _overlap(new_rows: np.ndarray, cur_rows: np.ndarray, num_logical: int) -> np.ndarray:
    """[m, m]: slots new bin i and current bin j could share, sum over experts of
    min(replicas in i, replicas in j), from the sparse pairs of bins holding an expert."""
    m = new_rows.shape[0]
    new_key, new_cnt = _bin_expert_counts(new_rows, num_logical)
    cur_key, cur_cnt = _bin_expert_counts(cur_rows, num_logical)
    cur_e = cur_key % num_logical
    order = np.argsort(cur_e, kind="stable")
    start = np.searchsorted(cur_e[order], new_key % num_logical)
    reps = np.bincount(cur_e, minlength=num_logical)[new_key % num_logical]
    picks = order[np.repeat(start, reps) + np.arange(int(reps.sum())) - np.repeat(np.cumsum(reps) - reps, reps)]
    pairs = np.repeat(new_key // num_logical, reps) * m + cur_key[picks] // num_logical
    weight = np.minimum(np.repeat(new_cnt, reps), cur_cnt[picks])
    return np.bincount(pairs, weights=weight, minlength=m * m).reshape(m, m)


def _bin_expert_counts(rows: np.ndarray, num_logical: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (bin * E + expert) keys of rows [m, k] and how often each occurs."""
    keys = (np.arange(rows.shape[0])[:, None] * num_logical + rows).ravel()
    return np.unique(keys, return_counts=True)


def _greedy_match(overlap: np.ndarray) -> np.ndarray:
    """perm [m]: new bin i -> current bin perm[i], greedily by largest overlap first (pairs of
    one overlap level taken in rounds: the first free pair per row, then per column)."""
    m = overlap.shape[0]
    perm, taken = np.full(m, -1, dtype=np.int64), np.zeros(m, dtype=bool)
    for level in np.unique(overlap[overlap > 0])[::-1].tolist():
        rows, cols = np.nonzero(overlap == level)
        while True:
            free = (perm[rows] < 0) & ~taken[cols]
            rows, cols = rows[free], cols[free]
            if rows.size == 0:
                break
            first = np.unique(rows, return_index=True)[1]
            first = first[np.unique(cols[first], return_index=True)[1]]
            perm[rows[first]], taken[cols[first]] = cols[first], True
    perm[perm < 0] = np.flatnonzero(~taken)
    return perm


def keep_slots(new_ranks: np.ndarray, cur_ranks: np.ndarray) -> np.ndarray:
    """Arrange each rank's new experts [ranks, k] so that every one already in one of the
    rank's slots (cur_ranks [ranks, k]) stays in that slot."""
    out = np.empty_like(new_ranks)
    plain = _no_repeats(new_ranks) & _no_repeats(cur_ranks)
    new, cur = new_ranks[plain], cur_ranks[plain]
    stays = (cur[:, :, None] == new[:, None, :]).any(2)
    kept = (new[:, :, None] == cur[:, None, :]).any(2)
    rows = np.where(stays, cur, -1)
    rows[~stays] = new[~kept]  # per rank as many leaving slots as arriving experts
    out[plain] = rows
    for r in np.flatnonzero(~plain).tolist():  # ranks with a repeated expert: by multiset
        want, row = Counter(new_ranks[r].tolist()), [-1] * new_ranks.shape[1]
        for pos, e in enumerate(cur_ranks[r].tolist()):
            if want[e] > 0:
                row[pos], want[e] = e, want[e] - 1
        rest = iter(want.elements())
        out[r] = [e if e >= 0 else next(rest) for e in row]
    return out


def _no_repeats(rows: np.ndarray) -> np.ndarray:
    ordered = np.sort(rows, axis=1)
    return ~(ordered[:, 1:] == ordered[:, :-1]).any(1)


def match_to_current(bins: np.ndarray, current: np.ndarray, ep: int, *, nodes: int, num_logical: int) -> np.ndarray:
    """bins [nodes, P/nodes] (rank-major) -> row [P]: nodes then ranks matched to current (step 4)."""
    ranks, k = ep // nodes, current.size // ep
    cur_nodes = current.reshape(nodes, -1)
    node_perm = _greedy_match(_overlap(bins, cur_nodes, num_logical))
    out = np.empty_like(current)
    for i, n in enumerate(node_perm.tolist()):
        new_ranks, cur_ranks = bins[i].reshape(ranks, k), cur_nodes[n].reshape(ranks, k)
        rank_perm = _greedy_match(_overlap(new_ranks, cur_ranks, num_logical))
        matched = np.empty_like(new_ranks)
        matched[rank_perm] = new_ranks
        out[n * ranks * k : (n + 1) * ranks * k] = keep_slots(matched, cur_ranks).ravel()
    return out
