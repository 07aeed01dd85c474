"""MLA's step from the projections to what its attention reads, in one Triton kernel (see
ops.latent_norm_rotary): the latent's RMSNorm and the rotary embedding of the query's and
the key's rotary parts, read in place from the projection outputs and written to new
contiguous tensors. The unfused path runs five kernels (three copies, a norm, a rotary)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(src, dst, cos_sin_row, HALF: tl.constexpr):
    d = tl.arange(0, HALF)
    x1 = tl.load(src + d).to(tl.float32)
    x2 = tl.load(src + HALF + d).to(tl.float32)
    cos, sin = tl.load(cos_sin_row + d), tl.load(cos_sin_row + HALF + d)
    dtype = dst.dtype.element_ty
    tl.store(dst + d, (x1 * cos - x2 * sin).to(dtype))
    tl.store(dst + HALF + d, (x2 * cos + x1 * sin).to(dtype))


@triton.jit
def _latent_norm_rope(
    q,
    latent,
    norm_weight,
    positions,
    cos_sin,
    q_rope_out,
    latent_out,
    k_rope_out,
    eps,
    heads,
    stride_qt,
    stride_qh,
    stride_lt,
    NOPE: tl.constexpr,
    LATENT: tl.constexpr,
    HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    row = cos_sin + tl.load(positions + t) * (2 * HALF)
    if h < heads:  # one head of the query: its rotary part
        _rotate(q + t * stride_qt + h * stride_qh + NOPE, q_rope_out + (t * heads + h) * (2 * HALF), row, HALF)
    else:  # the token's latent (normed) and its rotary key
        src = latent + t * stride_lt
        d = tl.arange(0, LATENT)
        x = tl.load(src + d).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / LATENT + eps)
        # as the torch reference (and transformers) round: the normalised value to the
        # input dtype, times the weight
        dtype = latent_out.dtype.element_ty
        y = (x * rstd).to(dtype).to(tl.float32) * tl.load(norm_weight + d).to(tl.float32)
        tl.store(latent_out + t * LATENT + d, y.to(dtype))
        _rotate(src + LATENT, k_rope_out + t * (2 * HALF), row, HALF)


def latent_norm_rope(
    positions: torch.Tensor,
    q: torch.Tensor,
    latent: torch.Tensor,
    *,
    norm_weight: torch.Tensor,
    eps: float,
    cos_sin: torch.Tensor,
    nope_dim: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [T, heads, nope_dim + R] (last dim contiguous), latent [T, L + R] (rows may be
    strided) -> (q's rotary part rotated [T, heads, R], the latent normed [T, L], the
    rotary key rotated [T, R]), all new and contiguous."""
    t, heads, q_dim = q.shape
    rope_dim = q_dim - nope_dim
    latent_dim = latent.shape[1] - rope_dim
    assert q.stride(2) == 1 and latent.stride(1) == 1 and cos_sin.is_contiguous() and cos_sin.shape[1] == rope_dim
    assert positions.is_contiguous() and positions.shape[0] >= t
    for width in (latent_dim, rope_dim // 2):  # tl.arange widths, unmasked
        assert width > 0 and width & (width - 1) == 0, "the latent and half the rotary width must be powers of two"
    q_rope = q.new_empty(t, heads, rope_dim)
    normed = latent.new_empty(t, latent_dim)
    k_rope = latent.new_empty(t, rope_dim)
    if t:
        _latent_norm_rope[(t, heads + 1)](
            q,
            latent,
            norm_weight,
            positions,
            cos_sin,
            q_rope,
            normed,
            k_rope,
            eps,
            heads,
            q.stride(0),
            q.stride(1),
            latent.stride(0),
            NOPE=nope_dim,
            LATENT=latent_dim,
            HALF=rope_dim // 2,
            num_warps=1,
        )
    return q_rope, normed, k_rope
