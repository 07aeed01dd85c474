"""Paged decode attention in Triton: one query token per sequence against its cached keys
and values, the cache in the queries' dtype or FP8. The engine's decode steps on GPUs run it
(attention_flashinfer.py), eagerly and in CUDA graphs.

Each program owns one sequence, one KV head and one part of the sequence's tokens: it loads
the KV head's query heads once (a GQA group, padded to 16 rows for the tensor cores), walks
its tokens BT at a time through the page table, widens k and v to the queries' dtype in
registers, and keeps an online softmax in float32. Against FlashInfer's decode kernels it took
less time on the engine's step at batch 1 and 64 (BENCHMARKS.md, "Decode attention in Triton").

Parts: a sequence's tokens are split into ``splits`` parts of equal length (each sequence's
own length, so a CUDA graph's fixed grid serves any context). One part writes the output
directly; several write float32 partial outputs and their log-sum-exp, and a second kernel
merges them in a fixed order.

The cache is [num_blocks, 2 (k, v), block_size, kv_heads, D] (attention_torch.py's layout);
the page table FlashInfer's CSR form: a sequence's pages are indices[indptr[b]:indptr[b + 1]].
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# tokens a program reads per step (BT: four pages of 16) and its launch's warps and pipeline
# stages, with a sequence in parts; in one part (a large batch), longer steps
CONFIG = dict(BT=64, num_warps=4, num_stages=2)
ONE_PART_CONFIG = dict(BT=128, num_warps=4, num_stages=2)
# about twice as many programs as an H100/H200 has SMs (132)
TARGET_PROGRAMS = 264


@triton.jit
def _decode(
    q,
    cache,
    indptr,
    indices,
    lens,
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
    GROUP: tl.constexpr,
    SPLITS: tl.constexpr,
    PAGE: tl.constexpr,
    D: tl.constexpr,
    BG: tl.constexpr,
    BD: tl.constexpr,
    BT: tl.constexpr,
):
    b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    length = tl.load(lens + b)
    # this part's tokens [start, end): parts of whole steps, the last one shorter
    per_part = tl.cdiv(tl.cdiv(length, SPLITS), BT) * BT
    start = s * per_part
    end = tl.minimum(start + per_part, length)
    pages = indices + tl.load(indptr + b)
    g, d = tl.arange(0, BG), tl.arange(0, BD)
    heads = h * GROUP + g
    g_ok, d_ok = g < GROUP, d < D
    q_tile = tl.load(q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g_ok[:, None] & d_ok[None, :])
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
    o_mask = g_ok[:, None] & d_ok[None, :]
    if SPLITS == 1:
        o = acc / l_i[:, None]
        tl.store(out + b * stride_ob + heads[:, None] * stride_oh + d[None, :], o.to(out.dtype.element_ty), mask=o_mask)
    else:
        # an empty part (a sequence shorter than the parts) leaves weight 0: log-sum-exp -inf
        filled = l_i > 0
        o = tl.where(filled[:, None], acc / tl.where(filled, l_i, 1.0)[:, None], 0.0)
        lse = tl.where(filled, m_i + tl.log2(tl.where(filled, l_i, 1.0)), float("-inf"))
        row = (b * tl.num_programs(1) * GROUP + heads) * SPLITS + s  # [B, heads, SPLITS]
        tl.store(part_out + row[:, None] * D + d[None, :], o, mask=o_mask)
        tl.store(part_lse + row, lse, mask=g_ok)


@triton.jit
def _merge(
    part_out, part_lse, out, stride_ob, stride_oh, HEADS, SPLITS: tl.constexpr, D: tl.constexpr, BD: tl.constexpr
):
    """out[b, h] = the parts' outputs weighted by their softmax mass, parts in order."""
    b, h = tl.program_id(0), tl.program_id(1)
    row = (b * HEADS + h) * SPLITS
    d = tl.arange(0, BD)
    d_ok = d < D
    lse_max = float("-inf")
    for s in tl.static_range(SPLITS):
        lse_max = tl.maximum(lse_max, tl.load(part_lse + row + s))
    total = 0.0
    acc = tl.zeros((BD,), tl.float32)
    for s in tl.static_range(SPLITS):
        w = tl.exp2(tl.load(part_lse + row + s) - lse_max)
        total += w
        acc += w * tl.load(part_out + (row + s) * D + d, mask=d_ok, other=0.0)
    tl.store(out + b * stride_ob + h * stride_oh + d, (acc / total).to(out.dtype.element_ty), mask=d_ok)


def decode_splits(batch_size: int, kv_heads: int) -> int:
    """Parts per sequence: about TARGET_PROGRAMS programs, one part once the batch gives that
    many. A function of the shapes alone: one choice per CUDA graph."""
    return max(1, min(16, TARGET_PROGRAMS // (batch_size * kv_heads)))


def decode_attention(
    q: torch.Tensor,
    cache: torch.Tensor,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    lens: torch.Tensor,
    *,
    splits: int,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """q [B, heads, D] (bf16/fp16/fp32), one layer's cache [blocks, 2, block_size, kv_heads, D]
    in q's dtype or FP8, the page table (indptr [B + 1], indices; int32) and each sequence's
    length in tokens (lens [B], at least 1), on the device -> [B, heads, D] in q's dtype.
    config: CONFIG's keys, for benchmarks."""
    batch, heads, dim = q.shape
    _, two, page, kv_heads, cache_dim = cache.shape
    assert two == 2 and cache_dim == dim and heads % kv_heads == 0 and q.stride(2) == 1 and cache.stride(-1) == 1
    group = heads // kv_heads
    out = torch.empty_like(q) if out is None else out
    if batch == 0:
        return out
    parts = None
    if splits > 1:
        parts = (
            torch.empty(batch, heads, splits, dim, dtype=torch.float32, device=q.device),
            torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device),
        )
    part_out, part_lse = parts if parts is not None else (out, out)  # placeholders never read
    bd = triton.next_power_of_2(dim)
    _decode[(batch, kv_heads, splits)](
        q,
        cache,
        indptr,
        indices,
        lens,
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
        GROUP=group,
        SPLITS=splits,
        PAGE=page,
        D=dim,
        BG=max(16, triton.next_power_of_2(group)),
        BD=bd,
        **(config or (CONFIG if splits > 1 else ONE_PART_CONFIG)),
    )
    if parts is not None:
        _merge[(batch, heads)](
            part_out, part_lse, out, out.stride(0), out.stride(1), heads, SPLITS=splits, D=dim, BD=bd, num_warps=1
        )
    return out


class TritonDecode:
    """``decode_attention`` over page tables kept on the device, in FlashInfer's decode
    wrapper's shape: ``plan`` once a step (the tables every layer reads), ``run`` per layer.
    The buffers are static, so a CUDA graph of ``batch_size`` sequences can capture ``run``."""

    def __init__(self, batch_size: int, max_pages: int, kv_heads: int, device: torch.device) -> None:
        self.batch_size = batch_size
        self.splits = decode_splits(batch_size, kv_heads)
        # filled by plan() before any run()
        self.indptr = torch.empty(batch_size + 1, dtype=torch.int32, device=device)
        self.indices = torch.empty(max(1, max_pages), dtype=torch.int32, device=device)
        self.lens = torch.empty(batch_size, dtype=torch.int32, device=device)

    def plan(self, indptr: torch.Tensor, indices: torch.Tensor, lens: torch.Tensor) -> None:
        """Queue the copies of a step's tables (host int32, pinned: the copies run later, so the
        caller must not reuse them before they ran) of ``batch_size`` sequences."""
        assert indptr.shape[0] == self.batch_size + 1 and indices.shape[0] <= self.indices.shape[0]
        self.indptr.copy_(indptr, non_blocking=True)
        self.indices[: indices.shape[0]].copy_(indices, non_blocking=True)
        self.lens.copy_(lens, non_blocking=True)

    def run(self, q: torch.Tensor, cache: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return decode_attention(q, cache, self.indptr, self.indices, self.lens, splits=self.splits, out=out)
