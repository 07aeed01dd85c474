"""The MoE combine in Triton (see moe_combine.py for what it computes), alone or fused
with the residual add and RMSNorm after it (one program per token then: the norm
needs the whole row)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from raymoe.comm.reduce_add_rms_norm_triton import add_rms_norm_row, row_warps


@triton.jit
def _combined(y, sorted_row, weights, ends, t, col, live, num_slots, stride_y, TOP_K: tl.constexpr, BH: tl.constexpr):
    """Token t's weighted sum over its choices, columns ``col``, float32."""
    end = tl.load(ends + num_slots - 1)
    acc = tl.zeros((BH,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        row = tl.load(sorted_row + t * TOP_K + j) + tl.zeros((BH,), tl.int64)  # as a vector, for the mask
        w = tl.load(weights + t * TOP_K + j).to(tl.float32)
        acc += w * tl.load(y + row * stride_y + col, mask=live & (row < end), other=0.0).to(tl.float32)
    return acc


@triton.jit
def _combine(
    y, sorted_row, weights, ends, out, num_slots, hidden, stride_y, stride_out, TOP_K: tl.constexpr, BH: tl.constexpr
):
    t = tl.program_id(0)
    col = tl.program_id(1) * BH + tl.arange(0, BH)
    live = col < hidden
    acc = _combined(y, sorted_row, weights, ends, t, col, live, num_slots, stride_y, TOP_K, BH)
    tl.store(out + t.to(tl.int64) * stride_out + col, acc.to(out.dtype.element_ty), mask=live)


@triton.jit
def _combine_add_rms_norm(
    y,
    sorted_row,
    weights,
    ends,
    shared,
    residual,
    weight,
    out,
    num_slots,
    hidden,
    stride_y,
    eps,
    TOP_K: tl.constexpr,
    BH: tl.constexpr,
    HAS_SHARED: tl.constexpr,
):
    t = tl.program_id(0)
    col = tl.arange(0, BH)
    live = col < hidden
    at = t.to(tl.int64) * hidden + col
    acc = _combined(y, sorted_row, weights, ends, t, col, live, num_slots, stride_y, TOP_K, BH)
    if HAS_SHARED:
        acc += tl.load(shared + at, mask=live, other=0.0).to(tl.float32)
    add_rms_norm_row(acc, residual, weight, out, at, col, live, hidden, eps)


def _check(y: torch.Tensor, sorted_row: torch.Tensor, weights: torch.Tensor) -> None:
    assert y.stride(1) == 1 and sorted_row.is_contiguous() and weights.is_contiguous()


def combine(
    y: torch.Tensor,
    sorted_row: torch.Tensor,
    weights: torch.Tensor,
    ends: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    _check(y, sorted_row, weights)
    n, top_k = sorted_row.shape
    hidden = y.shape[1]
    if out is None:
        out = torch.empty(n, hidden, dtype=y.dtype, device=y.device)
    assert out.shape == (n, hidden) and out.stride(1) == 1
    bh = min(1024, triton.next_power_of_2(hidden))
    _combine[(n, triton.cdiv(hidden, bh))](
        y,
        sorted_row,
        weights,
        ends,
        out,
        ends.shape[0],
        hidden,
        y.stride(0),
        out.stride(0),
        TOP_K=top_k,
        BH=bh,
        num_warps=4,
    )
    return out


def combine_add_rms_norm(
    y: torch.Tensor,
    sorted_row: torch.Tensor,
    weights: torch.Tensor,
    ends: torch.Tensor,
    *,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    shared: torch.Tensor | None = None,
) -> torch.Tensor:
    """residual += combine(...) (+ shared), in place; returns RMSNorm(residual) * weight."""
    _check(y, sorted_row, weights)
    n, top_k = sorted_row.shape
    hidden = y.shape[1]
    assert residual.shape == (n, hidden) and residual.is_contiguous() and residual.dtype == y.dtype
    assert shared is None or (shared.shape == residual.shape and shared.is_contiguous())
    out = torch.empty_like(residual)
    if n:
        bh = triton.next_power_of_2(hidden)
        _combine_add_rms_norm[(n,)](
            y,
            sorted_row,
            weights,
            ends,
            residual if shared is None else shared,
            residual,
            weight,
            out,
            ends.shape[0],
            hidden,
            y.stride(0),
            eps,
            TOP_K=top_k,
            BH=bh,
            HAS_SHARED=shared is not None,
            num_warps=row_warps(bh),
        )
    return out
