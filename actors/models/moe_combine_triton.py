"""The MoE combine in Triton (see moe_combine.py for what it computes)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _combine(y, sorted_row, weights, ends, out, num_slots, hidden, stride_y, stride_out,
             TOP_K: tl.constexpr, BH: tl.constexpr):  # fmt: skip
    t = tl.program_id(0)
    col = tl.program_id(1) * BH + tl.arange(0, BH)
    live = col < hidden
    end = tl.load(ends + num_slots - 1)
    acc = tl.zeros((BH,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        row = tl.load(sorted_row + t * TOP_K + j) + tl.zeros((BH,), tl.int64)  # as a vector, for the mask
        w = tl.load(weights + t * TOP_K + j).to(tl.float32)
        acc += w * tl.load(y + row * stride_y + col, mask=live & (row < end), other=0.0).to(tl.float32)
    tl.store(out + t.to(tl.int64) * stride_out + col, acc.to(out.dtype.element_ty), mask=live)


def combine(y: torch.Tensor, sorted_row: torch.Tensor, weights: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    n, top_k = sorted_row.shape
    hidden = y.shape[1]
    assert y.stride(1) == 1 and sorted_row.is_contiguous() and weights.is_contiguous()
    out = torch.empty(n, hidden, dtype=y.dtype, device=y.device)
    bh = min(1024, triton.next_power_of_2(hidden))
    _combine[(n, triton.cdiv(hidden, bh))](y, sorted_row, weights, ends, out, ends.shape[0], hidden, y.stride(0),
                                           out.stride(0), TOP_K=top_k, BH=bh, num_warps=4)  # fmt: skip
    return out
