"""The sum of every rank's partial activations, read straight from their symmetric
buffers, added to the residual stream and RMS-normalised, in one Triton kernel
(see SymmetricAllReduce.reduce_add_rms_norm). One program per row.

Rounds as the unfused torch path does on two ranks (all-reduce, then residual + sum,
then RMSNorm): the float32 sum, the new residual and the normalised value are each
rounded to the activation dtype before the next step uses them. (Over more ranks the
one-shot and NCCL sums round per addition, and FlashInfer's fused add + norm rounds
less: the unfused GPU path may then differ in the last bf16 bit.) Every rank sums
the buffers in rank order, so every rank gets the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def add_rms_norm_row(summed, residual, weight, out, at, cols, mask, width, eps):
    """One row's tail, shared with the MoE combine: residual[at] += summed (float32, as
    the dtype rounds it), then out[at] = RMSNorm(residual[at]) * weight, rounded as the
    unfused path rounds."""
    dtype = residual.dtype.element_ty
    total = (summed.to(dtype).to(tl.float32) + tl.load(residual + at, mask=mask, other=0.0).to(tl.float32)).to(dtype)
    tl.store(residual + at, total, mask=mask)
    tl.store(out + at, rms_normed(total, weight, cols, mask, width, eps), mask=mask)


@triton.jit
def rms_normed(total, weight, cols, mask, width, eps):
    """RMSNorm(total) * weight in total's dtype, rounded as the unfused path rounds."""
    dtype = total.dtype
    total = total.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(total * total, 0) / width + eps)
    normed = (total * rstd).to(dtype).to(tl.float32) * tl.load(weight + cols, mask=mask, other=0.0).to(tl.float32)
    return normed.to(dtype)


@triton.jit
def _reduce_add_rms_norm(buffers, offset, residual, weight, out, width, eps, WORLD: tl.constexpr, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    at = tl.program_id(0).to(tl.int64) * width + cols
    summed = summed_over(buffers, offset + at, mask, residual.dtype.element_ty, COUNT=WORLD, BLOCK=BLOCK)
    add_rms_norm_row(summed, residual, weight, out, at, cols, mask, width, eps)


@triton.jit
def summed_over(buffers, at, mask, dtype: tl.constexpr, COUNT: tl.constexpr, BLOCK: tl.constexpr):
    """The float32 sum, in order, of element ``at`` of the COUNT buffers whose addresses
    ``buffers`` holds (values of ``dtype``)."""
    summed = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(COUNT):
        buffer = tl.load(buffers + i).to(tl.pointer_type(dtype))
        summed += tl.load(buffer + at, mask=mask, other=0.0).to(tl.float32)
    return summed


@triton.jit
def _reduce_add_rms_norm_gather(
    table,
    offset,
    residual,
    weight,
    out,
    rows,
    width,
    eps,
    mine,
    mine_rows,
    ATTN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Row j of replica d: the sum of its ATTN ranks' partials, plus its residual (published
    by its first rank after its partials), normalised, into row d * rows + j of out; this
    rank's replica (``mine``) also gets its new residual, in place."""
    d, j = tl.program_id(0), tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    at = j.to(tl.int64) * width + cols
    dtype = residual.dtype.element_ty
    summed = summed_over(table + d * ATTN, offset + at, mask, dtype, COUNT=ATTN, BLOCK=BLOCK)
    first = tl.load(table + d * ATTN).to(tl.pointer_type(dtype))
    before = tl.load(first + offset + rows * width + at, mask=mask, other=0.0).to(tl.float32)
    total = (summed.to(dtype).to(tl.float32) + before).to(dtype)
    own = (cols * 0 + d == mine) & (cols * 0 + j < mine_rows)  # block-shaped: the interpreter wants it
    tl.store(residual + at, total, mask=mask & own)
    tl.store(out + (d * rows).to(tl.int64) * width + at, rms_normed(total, weight, cols, mask, width, eps), mask=mask)


def reduce_add_rms_norm_gather_(
    table: torch.Tensor, offset: int, residual: torch.Tensor, weight: torch.Tensor, *, mine: int, rows: int, eps: float
) -> torch.Tensor:
    """table [replicas, attn] int64: the addresses of every replica's attention ranks'
    buffers, each holding that rank's partial [rows, H] at element ``offset``, then (its
    replica's first rank's) the replica's residual [rows, H]. ``residual`` [T <= rows, H]:
    replica ``mine``'s, becomes residual + its sum, in place. Returns every replica's
    RMSNorm(residual + sum) * weight, [replicas * rows, H] (rows past a replica's tokens
    hold whatever its padding gives)."""
    replicas, attn = table.shape
    width = weight.shape[0]
    assert residual.is_contiguous() and residual.shape[1] == width and residual.shape[0] <= rows
    out = torch.empty(replicas * rows, width, dtype=residual.dtype, device=residual.device)
    if rows:
        block = triton.next_power_of_2(width)
        _reduce_add_rms_norm_gather[(replicas, rows)](
            table,
            offset,
            residual,
            weight,
            out,
            rows,
            width,
            eps,
            mine,
            residual.shape[0],
            ATTN=attn,
            BLOCK=block,
            num_warps=row_warps(block),
        )
    return out


def row_warps(block: int) -> int:
    """Warps for one program per row of ``block`` columns."""
    return max(1, min(16, block // 256))


def reduce_add_rms_norm_(
    buffers: torch.Tensor, offset: int, residual: torch.Tensor, weight: torch.Tensor, *, eps: float
) -> torch.Tensor:
    """buffers: int64 addresses of the ranks' buffers, each holding that rank's partial
    [T, H] at element ``offset``; residual [T, H] becomes residual + their sum, in place.
    Returns RMSNorm(residual) * weight, [T, H]."""
    rows, width = residual.shape
    assert residual.is_contiguous() and weight.shape == (width,)
    out = torch.empty_like(residual)
    if rows:
        block = triton.next_power_of_2(width)
        _reduce_add_rms_norm[(rows,)](
            buffers,
            offset,
            residual,
            weight,
            out,
            width,
            eps,
            WORLD=buffers.numel(),
            BLOCK=block,
            num_warps=row_warps(block),
        )
    return out
