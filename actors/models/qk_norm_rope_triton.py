"""Qwen3's per-head q/k RMSNorm and the rotary embedding in one Triton kernel, in place
(see ops.qk_norm_rotary_): one program per (token, head) of q and k together, where
the unfused path runs three kernels (two norms, then FlashInfer's rotary)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _qk_norm_rope(
    q,
    k,
    q_weight,
    k_weight,
    positions,
    cos_sin,
    eps,
    heads,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    HALF: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, HALF)
    if h < heads:
        base, w = q + t.to(tl.int64) * stride_qt + h * stride_qh, q_weight
    else:
        base, w = k + t.to(tl.int64) * stride_kt + (h - heads) * stride_kh, k_weight
    x1 = tl.load(base + d).to(tl.float32)
    x2 = tl.load(base + HALF + d).to(tl.float32)
    rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, 0) + tl.sum(x2 * x2, 0)) / (2 * HALF) + eps)
    # as the torch reference rounds: the normalised value to the input dtype, times the weight
    dtype = q.dtype.element_ty
    x1 = (x1 * rstd).to(dtype).to(tl.float32) * tl.load(w + d).to(tl.float32)
    x2 = (x2 * rstd).to(dtype).to(tl.float32) * tl.load(w + HALF + d).to(tl.float32)
    x1, x2 = x1.to(dtype).to(tl.float32), x2.to(dtype).to(tl.float32)
    row = cos_sin + tl.load(positions + t) * (2 * HALF)
    cos, sin = tl.load(row + d), tl.load(row + HALF + d)
    tl.store(base + d, (x1 * cos - x2 * sin).to(dtype))
    tl.store(base + HALF + d, (x2 * cos + x1 * sin).to(dtype))


def qk_norm_rope_(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    cos_sin: torch.Tensor,
) -> None:
    """q [T, H, D], k [T, Hk, D] (last dim contiguous), rotated in place."""
    t, heads, dim = q.shape
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos_sin.is_contiguous() and cos_sin.shape[1] == dim
    assert dim % 2 == 0 and triton.next_power_of_2(dim // 2) == dim // 2, "head_dim must be twice a power of two"
    if t == 0:
        return
    _qk_norm_rope[(t, heads + k.shape[1])](
        q,
        k,
        q_weight,
        k_weight,
        positions,
        cos_sin,
        eps,
        heads,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        HALF=dim // 2,
        num_warps=1,
    )
