"""Block-quantised FP8 weights (fp8.py) widened on the GPU: w = q x its block's scale, rounded
once to bf16, as fp8.dequantize_blocks computes it. The routed experts take this at prefill
sizes, where CUTLASS's bf16 grouped GEMM on the widened weights beats the Triton FP8 kernels
(expert_mlp.py).

Imported only when Triton is (GPU hosts; the unit tests' CPU interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _widen(
    q,
    scale,
    out,
    ROWS,
    N,
    K,
    SCALE_ROWS,
    SCALE_COLS,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
):
    """Rows [r * BR, + BR) and columns [c * BC, + BC) of q viewed as [ROWS = S * N, K]; matrix s
    = row // N has its scales at scale[s * SCALE_ROWS + n // BLOCK_N, k // BLOCK_K]."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    ok = (r < ROWS)[:, None] & (c < K)[None, :]
    scale_row = ((r // N) * SCALE_ROWS + (r % N) // BLOCK_N).to(tl.int64)
    s = tl.load(scale + scale_row[:, None] * SCALE_COLS + (c // BLOCK_K)[None, :], mask=ok, other=0.0)
    at = r.to(tl.int64)[:, None] * K + c[None, :]
    w = tl.load(q + at, mask=ok, other=0.0)
    tl.store(out + at, (w.to(tl.float32) * s).to(out.dtype.element_ty), mask=ok)


def widen_blocks(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """q [..., N, K] float8_e4m3fn (contiguous), scale [..., ceil(N / bn), ceil(K / bk)] float32
    -> [..., N, K] in ``dtype``."""
    n, k = q.shape[-2:]
    assert q.is_contiguous() and scale.is_contiguous() and scale.shape[:-2] == q.shape[:-2]
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    rows = q.numel() // k if k else 0
    if rows == 0:
        return out
    br, bc = 32, 128
    grid = (triton.cdiv(rows, br), triton.cdiv(k, bc))
    _widen[grid](
        q,
        scale,
        out,
        rows,
        n,
        k,
        scale.shape[-2],
        scale.shape[-1],
        BLOCK_N=block[0],
        BLOCK_K=block[1],
        BR=br,
        BC=bc,
        num_warps=4,
    )
    return out
