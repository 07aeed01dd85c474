"""EPLB packing primitives: replica counts, greedy packing and local search.

Works on one node's slots of one layer: ``slots`` [S] holds a logical expert id local to
the node (0..n-1) per physical slot, k slots per rank (bin), rank i owning slots
[i*k, (i+1)*k); expert e carries load w[e] split evenly over its c[e] replicas. Used by
``eplb_planner``; pure numpy + stdlib.
"""

from __future__ import annotations

import heapq

import numpy as np


def greedy_replica_counts(load: np.ndarray, slots: int, ranks: int) -> np.ndarray:
    """Replica count per expert [n] (>= 1, sum = slots): spare slots go one by one to the
    highest load per replica (ties: fewer replicas, then lower id), at most one replica per
    rank while any expert has room for one more."""
    counts = np.ones(load.size, dtype=np.int64)
    heap = [(-float(w), 1, e) for e, w in enumerate(load.tolist()) if ranks > 1]
    heapq.heapify(heap)
    spare = slots - load.size
    while spare and heap:
        _, c, e = heapq.heappop(heap)
        counts[e], spare = c + 1, spare - 1
        if c + 1 < ranks:
            heapq.heappush(heap, (-float(load[e]) / (c + 1), c + 1, e))
    counts += spare // load.size + (np.arange(load.size) < spare % load.size)  # more slots than room
    return counts


def pack_greedy(
    item_load: np.ndarray, item_expert: np.ndarray, slots: np.ndarray, *, k: int, slot_load: np.ndarray
) -> np.ndarray:
    """Fill the free slots (-1) of ``slots`` [bins*k]: heaviest item first onto the least
    loaded bin with room that lacks its expert (if every bin with room has it, the least
    loaded of those). slot_load [bins*k] = load already in each slot. Returns the filled slots."""
    slots = slots.copy()
    bins = slots.size // k
    by_bin = slots.reshape(bins, k)
    free, held = [[] for _ in range(bins)], [set() for _ in range(bins)]
    for pos, e in enumerate(slots.tolist()):
        if e < 0:
            free[pos // k].insert(0, pos % k)  # pop() then takes the first free slot
        else:
            held[pos // k].add(e)
    heap = [(total, b) for b, total in enumerate(slot_load.reshape(bins, k).sum(1).tolist()) if free[b]]
    heapq.heapify(heap)
    for i in np.lexsort((item_expert, -item_load)).tolist():
        e, skipped, chosen = int(item_expert[i]), [], None
        while heap:
            cand = heapq.heappop(heap)
            if e not in held[cand[1]]:
                chosen = cand
                break
            skipped.append(cand)
        if chosen is None:
            chosen = skipped.pop(0)
        for cand in skipped:
            heapq.heappush(heap, cand)
        total, b = chosen
        by_bin[b, free[b].pop()] = e
        held[b].add(e)
        if free[b]:
            heapq.heappush(heap, (total + float(item_load[i]), b))
    return slots


class Bins:
    """Working state of one packing: slots [S] -> local expert id, k slots per bin;
    expert e has load w[e] split over its c[e] replicas."""

    def __init__(self, slots: np.ndarray, load: np.ndarray, k: int):
        self.slots, self.k, self.w = slots.astype(np.int64), k, load.astype(np.float64)
        self.rank_of = np.arange(slots.size) // k
        self.c = np.bincount(self.slots, minlength=self.w.size)
        self.count = np.zeros((slots.size // k, self.w.size), dtype=np.int64)
        np.add.at(self.count, (self.rank_of, self.slots), 1)
        self._reload()

    def _reload(self) -> None:
        self.item = self.w[self.slots] / self.c[self.slots]
        self.load = self.item.reshape(-1, self.k).sum(1)
        self.slot_load = np.repeat(self.load, self.k)  # load of each slot's bin

    def swap(self, s: int, t: int) -> None:
        rs, rt, es, et = self.rank_of[s], self.rank_of[t], self.slots[s], self.slots[t]
        d = self.item[s] - self.item[t]
        self.load[rs] -= d
        self.load[rt] += d
        self.slot_load[rs * self.k : (rs + 1) * self.k] = self.load[rs]
        self.slot_load[rt * self.k : (rt + 1) * self.k] = self.load[rt]
        self.count[rs, es] -= 1
        self.count[rs, et] += 1
        self.count[rt, et] -= 1
        self.count[rt, es] += 1
        self.slots[s], self.slots[t] = et, es
        self.item[s], self.item[t] = self.item[t], self.item[s]

    def reassign(self, s: int, e: int) -> None:
        """Slot s stops being a replica of its expert and becomes one of e."""
        r, old = self.rank_of[s], self.slots[s]
        self.c[old] -= 1
        self.c[e] += 1
        self.count[r, old] -= 1
        self.count[r, e] += 1
        self.slots[s] = e
        self._reload()


def repair_duplicates(b: Bins) -> None:
    """Swap a second replica off its bin when some bin lacking that expert can take it,
    picking the swap that keeps the pair's max load lowest."""
    for r, e in np.argwhere(b.count > 1).tolist():
        while b.count[r, e] > 1:
            s = r * b.k + int(np.flatnonzero(b.slots[r * b.k : (r + 1) * b.k] == e)[0])
            ok = (b.rank_of != r) & (b.count[b.rank_of, e] == 0) & (b.count[r, b.slots] == 0)
            if not ok.any():
                break
            d = b.item[s] - b.item
            cost = np.where(ok, np.maximum(b.load[r] - d, b.load[b.rank_of] + d), np.inf)
            b.swap(s, int(np.argmin(cost)))


def refine(
    b: Bins,
    good_enough: float = -np.inf,
    *,
    origin: np.ndarray | None = None,
    max_changed: int = 0,
    max_steps: int | None = None,
) -> None:
    """Local search on the most loaded bin m: a swap, else a replica reassignment (on m, or
    elsewhere in favour of an expert on m) that leaves every bin it changes below m's old
    load; until none exists, the max is <= good_enough, (given origin [S]) max_changed
    slots differ from origin, or max_steps steps are made."""
    for _ in range(4 * b.slots.size + 16 if max_steps is None else max_steps):
        m = int(np.argmax(b.load))
        top = b.load[m]
        if top <= max(good_enough, 0.0) or (origin is not None and (b.slots != origin).sum() >= max_changed):
            return
        if not (_try_swap(b, m, top) or _try_reassign(b, m, top) or _try_grow(b, m, top)):
            return


def _try_swap(b: Bins, m: int, top: float) -> bool:
    """Best swap of a replica on bin m with a lighter one elsewhere (no duplicates made)."""
    first = m * b.k
    d = b.item[first : first + b.k, None] - b.item[None, :]
    room = top * (1 - 1e-12) - b.slot_load  # m's own slots have none
    i, t = np.nonzero((d > top * 1e-12) & (d < room))
    if i.size == 0:
        return False
    d = d[i, t]
    pair = np.maximum(top - d, b.slot_load[t] + d)
    for _ in range(8):  # best first; a swap that would duplicate an expert is rare
        j = int(np.argmin(pair))
        if pair[j] == np.inf:
            return False
        s, u = first + int(i[j]), int(t[j])
        if b.count[b.rank_of[u], b.slots[s]] == 0 and b.count[m, b.slots[u]] == 0:
            b.swap(s, u)
            return True
        pair[j] = np.inf
    ok = (b.count[b.rank_of[t], b.slots[first + i]] == 0) & (b.count[m, b.slots[t]] == 0)
    if not ok.any():
        return False
    j = int(np.argmin(np.where(ok, pair, np.inf)))
    b.swap(first + int(i[j]), int(t[j]))
    return True


def _segment_top2(b: Bins, value: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per expert over its slots: largest value [n], the bin it sits in [n], and the second
    largest (-inf if none; it may sit in the same bin: callers use it as an upper bound) [n]."""
    order = np.lexsort((-value, b.slots))
    starts = np.searchsorted(b.slots[order], np.arange(b.w.size))
    top1, where1 = value[order[starts]], b.rank_of[order[starts]]
    nxt = np.minimum(starts + 1, order.size - 1)
    has2 = (starts + 1 < order.size) & (b.slots[order[nxt]] == np.arange(b.w.size))
    return top1, where1, np.where(has2, value[order[nxt]], -np.inf)


def _try_reassign(b: Bins, m: int, top: float) -> bool:
    """Best change of one replica on bin m (of an expert with >= 2) into a new replica of an
    expert m lacks: every bin holding either expert, and m, must end below ``top``."""
    w, c, a, q = b.w, b.c, b.slots, b.rank_of
    after = w / (c + 1)
    # bins of the receiving expert, each of its replicas lighter; where a bin also holds the
    # giving expert both terms are upper bounds, so the check stays safe
    receivers = _segment_top2(b, b.load[q] + b.count[q, a] * (after - w / c)[a])[0]
    best, best_worst = None, np.inf
    for s in range(m * b.k, (m + 1) * b.k):
        e = int(a[s])
        if c[e] < 2:
            continue
        loss = w[e] / (c[e] - 1) - w[e] / c[e]  # per remaining replica of e
        givers = (a == e) & (q != m)
        giver_max = (b.load[q[givers]] + b.count[q[givers], e] * loss).max(initial=-np.inf)
        at_m = b.load[m] - w[e] / c[e] + (b.count[m, e] - 1) * loss + after
        worst = np.maximum(np.maximum(at_m, receivers), giver_max)
        ok = (b.count[m] == 0) & (worst < top * (1 - 1e-12))
        if ok.any():
            r = int(np.argmin(np.where(ok, worst, np.inf)))
            if worst[r] < best_worst:
                best, best_worst = (s, r), worst[r]
    if best is None:
        return False
    b.reassign(*best)
    return True


def _try_grow(b: Bins, m: int, top: float) -> bool:
    """Best change of one replica elsewhere (of an expert with >= 2) into a new replica of an
    expert on bin m, so that all of that expert's bins get lighter: every bin holding either
    expert must end below ``top``."""
    w, c, a, q = b.w, b.c, b.slots, b.rank_of
    loss = np.where(c >= 2, w / np.maximum(c - 1, 1) - w / c, 0.0)  # per remaining replica
    # other bins of each slot's expert once it loses this replica (safe upper bound where a
    # bin also holds the receiving expert)
    top1, where1, top2 = _segment_top2(b, b.load[q] + b.count[q, a] * loss[a])
    others = np.where(where1[a] == q, top2[a], top1[a])
    best, best_worst = None, np.inf
    for e in np.unique(a[m * b.k : (m + 1) * b.k]).tolist():
        base = b.load + b.count[:, e] * (w[e] / (c[e] + 1) - w[e] / c[e])
        at_q = base[q] - w[a] / c[a] + (b.count[q, a] - 1) * loss[a] + w[e] / (c[e] + 1)
        worst = np.maximum(np.maximum(others, at_q), base[b.count[:, e] > 0].max())
        ok = (c[a] >= 2) & (a != e) & (b.count[q, e] == 0) & (worst < top * (1 - 1e-12))
        if ok.any():
            s = int(np.argmin(np.where(ok, worst, np.inf)))
            if worst[s] < best_worst:
                best, best_worst = (s, e), worst[s]
    if best is None:
        return False
    b.reassign(*best)
    return True
