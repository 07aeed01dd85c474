"""A Triton FP8 GEMM: y = x W^T (+ b) for a block-quantised FP8 weight (fp8.py).

Each program owns a [BM, BN] tile of y and walks K one weight block column (block_k) at a
time: it takes its [BM, block_k] tile of x in FP8 with one scale per row (DeepSeek's
1 x block_k activation groups), multiplies it by the FP8 weight tile on the tensor cores, and
adds the product times both scales to a float32 accumulator. Up to 16 rows each program
quantises its tile of x itself (no second kernel, no pass over x). Past that every column tile
would quantise the same rows again, so one kernel quantises x first (``quantize_rows``) and
the GEMM reads it in FP8. Both round alike. A weight with few column tiles can have K split
over more programs (SPLIT_K): each writes a float32 partial product, and the last program to
finish a tile (an arrival counter per tile, which it resets) sums its parts in a fixed order,
so a call repeats its bits. No host syncs: it runs inside CUDA graphs.

Imported only when Triton is (GPU hosts; the unit tests' CPU interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from raymoe.actors.models.fp8 import FP8_MAX

_FP8_MAX = tl.constexpr(FP8_MAX)  # compiled kernels read globals only as constexpr


@triton.jit
def quantized_rows(a):
    """a [BM, BK] float32 -> (its FP8 values, one float32 scale per row [BM])."""
    scale = tl.maximum(tl.max(tl.abs(a), 1), 1e-12) / _FP8_MAX
    return (a / scale[:, None]).to(tl.float8e4nv), scale


@triton.jit
def _quantize_rows(x, q, q_scale, M, R, K, stride_x, stride_sm, stride_sg, BR: tl.constexpr, BK: tl.constexpr):
    """Rows [r * BR, (r + 1) * BR), columns [g * BK, (g + 1) * BK) of x [M, K] -> FP8 in q [R, K]
    (R >= M: rows past M are padding, zeros), each row's scale at q_scale[m * stride_sm + g * stride_sg]."""
    r, g = tl.program_id(0), tl.program_id(1)
    m = (r * BR + tl.arange(0, BR)).to(tl.int64)
    k = g * BK + tl.arange(0, BK)
    k_ok, r_ok = (k < K)[None, :], m < R
    a = tl.load(x + m[:, None] * stride_x + k[None, :], mask=(m < M)[:, None] & k_ok, other=0.0)
    a, scale = quantized_rows(a.to(tl.float32))
    tl.store(q + m[:, None] * K + k[None, :], a, mask=r_ok[:, None] & k_ok)
    tl.store(q_scale + m * stride_sm + g * stride_sg, scale, mask=r_ok)


def quantize_rows(x: torch.Tensor, group: int, *, m_major_align: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (FP8 [M, K], float32 scales [M, ceil(K / group)]): fp8.quantize_groups on the device.
    m_major_align > 0: the layout cuBLAS's blockwise scaled_mm reads, M rounded up to a multiple
    of it (zero rows) and the scales stored M-major (a transposed view of [groups, M])."""
    (m, k), groups = x.shape, triton.cdiv(x.shape[1], group)
    rows = -(-m // m_major_align) * m_major_align if m_major_align else m
    q = torch.empty(rows, k, dtype=torch.float8_e4m3fn, device=x.device)
    if m_major_align:
        scale = torch.empty(groups, rows, dtype=torch.float32, device=x.device).t()
    else:
        scale = torch.empty(rows, groups, dtype=torch.float32, device=x.device)
    # 16 rows a program: one row a program moves too few bytes to stream
    br = 16
    if rows:
        _quantize_rows[(triton.cdiv(rows, br), groups)](
            x, q, scale, m, rows, k, x.stride(0), scale.stride(0), scale.stride(1), BR=br, BK=group, num_warps=4
        )
    return q, scale


@triton.jit
def _fp8_linear(
    x,
    x_scale,
    w,
    w_scale,
    b,
    y,
    parts,
    arrivals,
    M,
    N,
    K,
    K_SPLIT,
    stride_x,
    stride_xs,
    stride_w,
    stride_s,
    stride_y,
    X_FP8: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """X_FP8: x is FP8 already, with one scale per row and BK columns in x_scale. Each program
    sums columns [K_SPLIT * program_id(2), + K_SPLIT) of K. SPLITS > 1: into part
    program_id(2) of ``parts`` [SPLITS, M, N] (float32); the tile's last program to arrive
    (``arrivals``: int32 per tile, zero) writes y."""
    m = tl.program_id(0) * BM + tl.arange(0, BM)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    k = tl.arange(0, BK)
    m_ok, n_ok = m < M, n < N
    x_rows = x + m.to(tl.int64)[:, None] * stride_x + k[None, :]
    w_rows = w + n.to(tl.int64)[:, None] * stride_w + k[None, :]
    s_rows = w_scale + (n // BLOCK_N) * stride_s
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    k_start = tl.program_id(2) * K_SPLIT
    for k0 in range(k_start, tl.minimum(k_start + K_SPLIT, K), BK):
        k_ok = (k0 + k < K)[None, :]
        if X_FP8:
            a = tl.load(x_rows + k0, mask=m_ok[:, None] & k_ok, other=0.0)
            a_scale = tl.load(x_scale + m.to(tl.int64) * stride_xs + k0 // BK, mask=m_ok, other=0.0)
        else:
            a, a_scale = quantized_rows(tl.load(x_rows + k0, mask=m_ok[:, None] & k_ok, other=0.0).to(tl.float32))
        w_tile = tl.load(w_rows + k0, mask=n_ok[:, None] & k_ok, other=0.0)
        s = tl.load(s_rows + k0 // BK, mask=n_ok, other=0.0)
        acc += tl.dot(a, tl.trans(w_tile)) * a_scale[:, None] * s[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if SPLITS > 1:
        tile = m.to(tl.int64)[:, None] * N + n[None, :]
        tl.store(parts + tl.program_id(2).to(tl.int64) * M * N + tile, acc, mask=mask)
        # every thread's part stored before the release (one thread does the atomic); the
        # tile's last program to arrive acquires the others'
        tl.debug_barrier()
        counter = arrivals + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        if tl.atomic_add(counter, 1, sem="acq_rel") == SPLITS - 1:
            tl.store(counter, 0)  # ready for the next launch (and the next replay of a CUDA graph)
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for part in tl.static_range(SPLITS):
                # from L2 (.cg): other SMs wrote them
                acc += tl.load(parts + part * M * N + tile, mask=mask, other=0.0, cache_modifier=".cg")
            _store_tile(y, b, acc, m, n, n_ok, mask, stride_y, HAS_BIAS)
    else:
        _store_tile(y, b, acc, m, n, n_ok, mask, stride_y, HAS_BIAS)


@triton.jit
def _store_tile(y, b, acc, m, n, n_ok, mask, stride_y, HAS_BIAS: tl.constexpr):
    """y's tile = acc (+ the bias), in y's dtype."""
    if HAS_BIAS:
        acc += tl.load(b + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y + m.to(tl.int64)[:, None] * stride_y + n[None, :], acc.to(y.dtype.element_ty), mask=mask)


_ARRIVALS: dict[torch.device, list[torch.Tensor]] = {}


def arrival_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """An int32 buffer of at least ``tiles`` zeros on ``device``, shared by every split launch
    there: each leaves it zeroed, and launches on one stream run one at a time. Grown by a new
    buffer; the old ones stay allocated for the CUDA graphs that captured them."""
    buffers = _ARRIVALS.setdefault(device, [])
    if not buffers or buffers[-1].shape[0] < tiles:
        buffers.append(torch.zeros(max(tiles, 1024), dtype=torch.int32, device=device))
    return buffers[-1]


# the rows of x -> block sizes, whether x is quantised first (PRE_QUANTIZE) and how many parts K
# is split into (SPLIT_K: more programs for a weight with few column tiles): the best of sweeps on
# an H100 over the qkv and o_proj shapes of Qwen3-30B-A3B (BENCHMARKS.md, issue 21)
FEW_ROWS_CONFIG = dict(BM=16, BN=32, num_warps=4, num_stages=4, PRE_QUANTIZE=False, SPLIT_K=1)
DECODE_CONFIG = dict(BM=64, BN=32, num_warps=4, num_stages=3, PRE_QUANTIZE=True, SPLIT_K=4)
PREFILL_CONFIG = dict(BM=64, BN=128, num_warps=4, num_stages=3, PRE_QUANTIZE=True, SPLIT_K=1)


def pick_config(num_rows: int) -> dict:
    """Block sizes by the rows of x alone (one choice per CUDA graph)."""
    if num_rows <= 16:
        return FEW_ROWS_CONFIG
    return DECODE_CONFIG if num_rows <= 64 else PREFILL_CONFIG


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    *,
    block: tuple[int, int],
    bias: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32), weight [N, K] float8_e4m3fn, scale [ceil(N/bn),
    ceil(K/bk)] float32, bias [N] or None -> [M, N] in x's dtype."""
    (m, k), n = x.shape, weight.shape[0]
    assert weight.shape[1] == k and x.stride(1) == 1 and weight.stride(1) == 1 and scale.stride(1) == 1
    config = config or pick_config(m)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    k_blocks = triton.cdiv(k, block[1])
    splits = max(1, min(config.get("SPLIT_K", 1), k_blocks))
    k_split = triton.cdiv(k_blocks, splits) * block[1]
    splits = triton.cdiv(k, k_split)  # every part non-empty
    grid = (triton.cdiv(m, config["BM"]), triton.cdiv(n, config["BN"]), splits)
    # split: float32 parts, summed in a fixed order (the same inputs give the same bits)
    parts = torch.empty(splits, m, n, dtype=torch.float32, device=x.device) if splits > 1 else y
    arrivals = arrival_counters(x.device, grid[0] * grid[1]) if splits > 1 else y
    pre = config["PRE_QUANTIZE"]
    x, x_scale = quantize_rows(x, block[1]) if pre else (x, scale)  # scale: a placeholder never read
    _fp8_linear[grid](
        x,
        x_scale,
        weight,
        scale,
        bias if bias is not None else scale,
        y,
        parts,
        arrivals,
        m,
        n,
        k,
        k_split,
        x.stride(0),
        x_scale.stride(0),
        weight.stride(0),
        scale.stride(0),
        n,
        X_FP8=pre,
        HAS_BIAS=bias is not None,
        SPLITS=splits,
        BLOCK_N=block[0],
        BM=config["BM"],
        BN=config["BN"],
        BK=block[1],
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    return y
