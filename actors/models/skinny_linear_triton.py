"""A Triton kernel for y = x W^T (+ b) when x has a few rows (a decode step of one to a
few sequences): a matrix-vector product that streams W once.

cuBLAS runs these shapes as split-K GEMMs well below the copy bandwidth
(BENCHMARKS.md); here each program owns BN output columns for every row of x, reads
its [BN, K] slab of W in BK-wide steps with coalesced loads, and reduces in float32.

An FP8 weight (block-quantised, fp8.py) streams half the bytes: the program's columns lie in
one block row of scales, and x is rounded through FP8 per row and block_k columns as the FP8
GEMM rounds it (fp8_linear_triton.py), so both compute the same products.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from raymoe.actors.models.fp8_linear_triton import quantized_rows


@triton.jit
def _skinny_linear(
    x,
    w,
    b,
    y,
    M,
    N,
    K,
    stride_x,
    stride_w,
    stride_y,
    w_scale,
    stride_s,
    HAS_BIAS: tl.constexpr,
    FP8: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """FP8: w float8_e4m3fn with a float32 scale per [BLOCK_N, BLOCK_K] block in w_scale
    (BN divides BLOCK_N, BLOCK_K divides BK)."""
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    k = tl.arange(0, BK)
    m = tl.arange(0, BM)
    n_ok = n < N
    w_rows = w + n.to(tl.int64)[:, None] * stride_w + k[None, :]
    s_row = w_scale + (tl.program_id(0) * BN // BLOCK_N) * stride_s  # FP8: this program's scales
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):  # K is a multiple of BK
        w_tile = tl.load(w_rows + k0, mask=n_ok[:, None], other=0.0).to(tl.float32)
        if FP8:
            s_k = tl.load(s_row + (k0 + k) // BLOCK_K)  # each column's block scale
        for i in tl.static_range(BM):
            # rows past M read row M - 1 again: their sums are never stored
            x_i = tl.load(x + tl.minimum(i, M - 1) * stride_x + k0 + k).to(tl.float32)
            if FP8:
                a, a_scale = quantized_rows(tl.reshape(x_i, (BK // BLOCK_K, BLOCK_K)))
                x_i = tl.reshape(a.to(tl.float32) * a_scale[:, None], (BK,)) * s_k
            part = tl.sum(w_tile * x_i[None, :], 1)
            acc = tl.where(m[:, None] == i, acc + part[None, :], acc)
    if HAS_BIAS:
        acc += tl.load(b + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y + m[:, None] * stride_y + n[None, :], acc.to(y.dtype.element_ty), mask=(m[:, None] < M) & n_ok[None, :])


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    config: dict,
    *,
    scale: torch.Tensor | None = None,
    block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """x [M, K] (0 < M <= 16), weight [N, K], bias [N] or None -> [M, N]; config: BN, BK,
    num_warps, num_stages (BK must divide K). An FP8 weight comes with its float32 ``scale``
    per ``block``, which BN must divide (rows) and which must divide BK (columns)."""
    (m, k), n = x.shape, weight.shape[0]
    assert weight.shape[1] == k and k % config["BK"] == 0 and 0 < m <= 16
    assert x.stride(1) == 1 and weight.stride(1) == 1
    fp8 = scale is not None
    assert not fp8 or scale.stride(1) == 1
    block_n, block_k = block if fp8 else (config["BN"], config["BK"])
    assert block_n % config["BN"] == 0 and config["BK"] % block_k == 0
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _skinny_linear[(triton.cdiv(n, config["BN"]),)](
        x,
        weight,
        bias if bias is not None else weight,
        y,
        m,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        y.stride(0),
        scale if fp8 else weight,
        scale.stride(0) if fp8 else 0,
        HAS_BIAS=bias is not None,
        FP8=fp8,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        BM=max(1, triton.next_power_of_2(m)),
        BN=config["BN"],
        BK=config["BK"],
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    return y
