"""Paged decode attention in Triton: one query token per sequence against its cached keys
and values, the cache in the queries' dtype or FP8. The engine's decode steps on GPUs run it
(attention_flashinfer.py), eagerly and in CUDA graphs.

Work is cut into parts of about equal length over the whole batch, from the step's lengths
(``plan_parts``, on the host once a step): about TARGET_PROGRAMS programs (a part and a KV
head each), so a long sequence is spread over many SMs while short ones keep one part, and
one long sequence in a large batch leaves no tail. Each program loads its KV head's query
heads once (a GQA group, padded to 16 rows for the tensor cores), walks its tokens BT at a
time through the page table, widens k and v to the queries' dtype in registers, and keeps
an online softmax in float32. A sequence in one part writes its output directly; in several,
each part writes a float32 partial output and its log-sum-exp, and a second kernel merges
them, in part order, one program per two query heads.

The grids are fixed by the batch size (``max_parts``), so a CUDA graph serves any lengths:
programs past the step's parts, and merges of one part, exit at once. A part's sequence,
token range and first page come from tables indexed by the part, so a program's loads before
its first page are one level deep, as with one part per sequence.

The cache is [num_blocks, 2 (k, v), block_size, kv_heads, D] (attention_torch.py's layout);
the page table FlashInfer's CSR form: a sequence's pages are indices[indptr[b]:indptr[b + 1]].
"""

from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl

# tokens a program reads per step (BT: four pages of 16), its warps and pipeline stages: for
# small batches, whose sequences run in several parts, and for large ones (mostly one part)
SMALL_BATCH_CONFIG = dict(BT=64, num_warps=4, num_stages=2)
LARGE_BATCH_CONFIG = dict(BT=128, num_warps=4, num_stages=2)
# about twice as many programs as an H100/H200 has SMs (132)
TARGET_PROGRAMS = 264
# parts the merge reads at once, and query heads a merge program takes
MERGE_PARTS, MERGE_HEADS = 16, 2


@triton.jit(do_not_specialize=["MAX_PARTS", "NUM_PARTS_AT"])
def _decode(
    q,
    cache,
    indices,
    parts,
    out,
    part_out,
    part_lse,
    scale_log2,
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_cb,
    stride_ckv,
    stride_cs,
    stride_ch,
    MAX_PARTS,
    NUM_PARTS_AT,
    GROUP: tl.constexpr,
    PAGE: tl.constexpr,
    D: tl.constexpr,
    BG: tl.constexpr,
    BD: tl.constexpr,
    BT: tl.constexpr,
):
    """parts: int32 [5, MAX_PARTS] (sequence, first token, end token, first page's index in
    ``indices``, 1 if the sequence's only part), and the step's part count at NUM_PARTS_AT."""
    i, h = tl.program_id(0), tl.program_id(1)
    # the part count read with the part's row, not before it: one memory round trip (the rows
    # past the count are zeros, plan() writes the whole table)
    num_parts = tl.load(parts + NUM_PARTS_AT)
    b = tl.load(parts + i)
    start = tl.load(parts + MAX_PARTS + i)
    end = tl.load(parts + 2 * MAX_PARTS + i)
    pages = indices + tl.load(parts + 3 * MAX_PARTS + i)
    only = tl.load(parts + 4 * MAX_PARTS + i)
    if i >= num_parts:
        return
    g, d = tl.arange(0, BG), tl.arange(0, BD)
    heads = h * GROUP + g
    g_ok, d_ok = g < GROUP, d < D
    o_mask = g_ok[:, None] & d_ok[None, :]
    q_tile = tl.load(q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=o_mask)
    m_i = tl.full((BG,), float("-inf"), tl.float32)
    l_i = tl.zeros((BG,), tl.float32)
    acc = tl.zeros((BG, BD), tl.float32)
    for t0 in range(start, end, BT):
        t = t0 + tl.arange(0, BT)
        t_ok = t < end
        page = tl.load(pages + t // PAGE, mask=t_ok, other=0).to(tl.int64)
        rows = cache + page * stride_cb + (t % PAGE) * stride_cs + h * stride_ch
        kv_ok = t_ok[:, None] & d_ok[None, :]
        k = tl.load(rows[:, None] + d[None, :], mask=kv_ok, other=0.0).to(q_tile.dtype)
        v = tl.load(rows[:, None] + stride_ckv + d[None, :], mask=kv_ok, other=0.0).to(q_tile.dtype)
        scores = tl.dot(q_tile, tl.trans(k)) * scale_log2  # [BG, BT], log2 units
        scores = tl.where(t_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    # every part holds at least one token (plan_parts), so l_i > 0 on the group's rows
    l_safe = tl.where(g_ok, l_i, 1.0)
    if only == 1:
        o = acc / l_safe[:, None]
        tl.store(out + b * stride_ob + heads[:, None] * stride_oh + d[None, :], o.to(out.dtype.element_ty), mask=o_mask)
    else:
        row = i.to(tl.int64) * tl.num_programs(1) * GROUP + heads  # part_out [max_parts, heads, D]
        tl.store(part_out + row[:, None] * D + d[None, :], acc / l_safe[:, None], mask=o_mask)
        tl.store(part_lse + row, m_i + tl.log2(l_safe), mask=g_ok)


@triton.jit
def _merge(
    part_out,
    part_lse,
    first_part,
    out,
    stride_ob,
    stride_oh,
    HEADS,
    D: tl.constexpr,
    BD: tl.constexpr,
    BP: tl.constexpr,
    HG: tl.constexpr,
):
    """out[b, h] = sequence b's parts' outputs weighted by their softmax mass, in part order,
    for HG query heads from HG x program_id(1) (BP parts at a time, a [BP, HG, BD] tile);
    nothing for a sequence of one part (its part wrote out)."""
    b, hb = tl.program_id(0), tl.program_id(1)
    first = tl.load(first_part + b)
    count = tl.load(first_part + b + 1) - first
    if count <= 1:
        return
    p, g, d = tl.arange(0, BP), tl.arange(0, HG), tl.arange(0, BD)
    h = hb * HG + g
    h_ok, d_ok = h < HEADS, d < D
    lse_max = tl.full((HG,), float("-inf"), tl.float32)
    for p0 in range(0, count, BP):
        rows = (first + p0 + p[:, None]).to(tl.int64) * HEADS + h[None, :]  # [BP, HG]
        ok = (p0 + p < count)[:, None] & h_ok[None, :]
        lse_max = tl.maximum(lse_max, tl.max(tl.load(part_lse + rows, mask=ok, other=float("-inf")), 0))
    lse_max = tl.where(h_ok, lse_max, 0.0)
    total = tl.zeros((HG,), tl.float32)
    acc = tl.zeros((HG, BD), tl.float32)
    for p0 in range(0, count, BP):
        rows = (first + p0 + p[:, None]).to(tl.int64) * HEADS + h[None, :]
        ok = (p0 + p < count)[:, None] & h_ok[None, :]
        w = tl.exp2(tl.load(part_lse + rows, mask=ok, other=float("-inf")) - lse_max[None, :])  # [BP, HG]
        total += tl.sum(w, 0)
        o_ok = ok[:, :, None] & d_ok[None, None, :]
        o = tl.load(part_out + rows[:, :, None] * D + d[None, None, :], mask=o_ok, other=0.0)  # [BP, HG, BD]
        acc += tl.sum(w[:, :, None] * o, 0)
    total = tl.where(h_ok, total, 1.0)
    o = (acc / total[:, None]).to(out.dtype.element_ty)
    tl.store(out + b * stride_ob + h[:, None] * stride_oh + d[None, :], o, mask=h_ok[:, None] & d_ok[None, :])


_PARTIALS: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}


def partials(device: torch.device, parts: int, heads: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 scratch for ``parts`` parts' outputs [parts, heads, dim] and log-sum-exps
    [parts, heads], shared by every launch on ``device`` (they run one at a time on one
    stream, and a merge reads only what its step's decode wrote). Grown by doubling; the old
    buffers stay allocated (listed here) for the CUDA graphs that captured them."""
    buffers = _PARTIALS.setdefault((device, heads, dim), [])
    if not buffers or buffers[-1][1].shape[0] < parts:
        rows = max(parts, 2 * buffers[-1][1].shape[0]) if buffers else parts
        out = torch.empty(rows, heads, dim, dtype=torch.float32, device=device)
        buffers.append((out, torch.empty(rows, heads, dtype=torch.float32, device=device)))
    return buffers[-1]


def max_parts(batch_size: int, kv_heads: int, target_programs: int = TARGET_PROGRAMS) -> int:
    """The most parts ``plan_parts`` makes for ``batch_size`` sequences: each sequence's parts
    are at most its length / chunk + 1, and the chunk is at least the batch's tokens x
    kv_heads / target_programs."""
    return batch_size + target_programs // kv_heads


def plan_parts(
    lens: np.ndarray, *, kv_heads: int, step: int, target_programs: int = TARGET_PROGRAMS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut sequences of ``lens`` tokens (each at least 1) into parts for about
    ``target_programs`` programs of one part and one KV head, every part at most one chunk
    (the batch's tokens over the programs, at least ``step``, in whole steps) and none empty.
    -> (part_len [B]: tokens in each of sequence b's parts but its last, a multiple of step;
    first_part [B + 1]: sequence b's parts are first_part[b] .. first_part[b + 1] - 1;
    part_seq [first_part[B]]: each part's sequence), int32."""
    lens = lens.astype(np.int64)
    chunk = _round_up(max(step, _ceil_div(int(lens.sum()) * kv_heads, target_programs)), step)
    parts = _ceil_div(lens, chunk)
    # the same parts, evened out: (parts - 1) * part_len < len since part_len <= chunk
    part_len = _round_up(_ceil_div(lens, parts), step)
    first_part = np.zeros(lens.shape[0] + 1, dtype=np.int32)
    np.cumsum(parts, out=first_part[1:])
    part_seq = np.repeat(np.arange(lens.shape[0], dtype=np.int32), parts)
    return part_len.astype(np.int32), first_part, part_seq


def _ceil_div(a, b):
    return -(-a // b)


def _round_up(a, b):
    return _ceil_div(a, b) * b


class TritonDecode:
    """The decode attention of ``batch_size`` sequences, in FlashInfer's decode wrapper's
    shape: ``plan`` once a step (the tables every layer reads), ``run`` per layer. The tables
    live in static device buffers, so a CUDA graph can capture ``run``.
    target_programs and config: for tests and benchmarks."""

    def __init__(
        self,
        batch_size: int,
        max_pages: int,
        kv_heads: int,
        device: torch.device,
        *,
        target_programs: int = TARGET_PROGRAMS,
        config: dict | None = None,
    ) -> None:
        self.batch_size, self.kv_heads, self.target_programs = batch_size, kv_heads, target_programs
        # more than half the programs from one part a sequence: long steps
        large = 2 * batch_size * kv_heads > target_programs
        self.config = config or (LARGE_BATCH_CONFIG if large else SMALL_BATCH_CONFIG)
        self.max_parts = max_parts(batch_size, kv_heads, target_programs)
        # one int32 buffer, filled by one copy a step: the parts' tables [5, max_parts] (see
        # _decode), the step's part count, first_part [B + 1] (rows of 16 bytes: one compile
        # whatever the batch size)
        self._part_rows = _round_up(self.max_parts, 4)
        self.tables = torch.zeros(
            5 * self._part_rows + 4 + _round_up(batch_size + 1, 4), dtype=torch.int32, device=device
        )
        self.first_part = self.tables[5 * self._part_rows + 4 :][: batch_size + 1]
        self.indices = torch.empty(max(1, max_pages), dtype=torch.int32, device=device)

    def plan(self, indptr: torch.Tensor, indices: torch.Tensor, lens: torch.Tensor) -> None:
        """Queue the copies of a step's tables of ``batch_size`` sequences (host int32
        tensors; ``indices`` pinned on a GPU: its copy runs later, so the caller must not
        reuse it before it ran)."""
        b, rows = self.batch_size, self._part_rows
        assert indptr.shape[0] == b + 1 and lens.shape[0] == b and indices.shape[0] <= self.indices.shape[0]
        lens_np = lens.numpy().astype(np.int64)
        assert (lens_np >= 1).all(), "every sequence in a decode step holds at least its new token"
        part_len, first_part, seq = plan_parts(
            lens_np, kv_heads=self.kv_heads, step=self.config["BT"], target_programs=self.target_programs
        )
        n = seq.shape[0]
        start = (np.arange(n) - first_part[seq]) * part_len[seq]
        host = np.zeros(self.tables.shape[0], dtype=np.int32)
        table = host[: 5 * rows].reshape(5, rows)
        table[0, :n] = seq
        table[1, :n] = start
        table[2, :n] = np.minimum(start + part_len[seq], lens_np[seq])
        table[3, :n] = indptr.numpy()[seq]
        table[4, :n] = (first_part[seq + 1] - first_part[seq]) == 1
        host[5 * rows] = n
        host[5 * rows + 4 : 5 * rows + 4 + b + 1] = first_part
        host_tables = torch.from_numpy(host)
        if self.tables.is_cuda:
            host_tables = host_tables.pin_memory()  # the pinned block stays unused until the copy ran
        self.tables.copy_(host_tables, non_blocking=True)
        self.indices[: indices.shape[0]].copy_(indices, non_blocking=True)

    def run(self, q: torch.Tensor, cache: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """q [B, heads, D] (bf16/fp16/fp32), one layer's cache [blocks, 2, block_size, kv_heads,
        D] in q's dtype or FP8 -> [B, heads, D] in q's dtype."""
        batch, heads, dim = q.shape
        _, two, page, kv_heads, cache_dim = cache.shape
        assert batch == self.batch_size and kv_heads == self.kv_heads
        assert two == 2 and cache_dim == dim and heads % kv_heads == 0 and q.stride(2) == 1 and cache.stride(-1) == 1
        out = torch.empty_like(q) if out is None else out
        assert out.shape == q.shape and out.stride(2) == 1
        if batch == 0:
            return out
        part_out, part_lse = partials(q.device, self.max_parts, heads, dim)
        group = heads // kv_heads
        bd = triton.next_power_of_2(dim)
        _decode[(self.max_parts, kv_heads)](
            q,
            cache,
            self.indices,
            self.tables,
            out,
            part_out,
            part_lse,
            math.log2(math.e) / math.sqrt(dim),
            q.stride(0),
            q.stride(1),
            out.stride(0),
            out.stride(1),
            cache.stride(0),
            cache.stride(1),
            cache.stride(2),
            cache.stride(3),
            self._part_rows,
            5 * self._part_rows,
            GROUP=group,
            PAGE=page,
            D=dim,
            BG=max(16, triton.next_power_of_2(group)),
            BD=bd,
            **self.config,
        )
        _merge[(batch, triton.cdiv(heads, MERGE_HEADS))](
            part_out,
            part_lse,
            self.first_part,
            out,
            out.stride(0),
            out.stride(1),
            heads,
            D=dim,
            BD=bd,
            BP=MERGE_PARTS,
            HG=MERGE_HEADS,
            num_warps=1,
        )
        return out
