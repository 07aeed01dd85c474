"""Triton kernels of the routed experts' MLP (see expert_mlp.py for the maths).

Imported only when Triton is: on GPU hosts (torch's CUDA wheels bring it), and in
the unit test that runs these kernels in Triton's CPU interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from raymoe.actors.models.fp8_linear_triton import quantize_rows, quantized_rows
from raymoe.actors.models.ops import block_dividing

PRE_QUANTIZE_ROWS = 256  # FP8: past this many rows x is quantised in a pass of its own


@triton.jit
def _program_rows(groups, ends, num_groups, BM: tl.constexpr, TILES: tl.constexpr):
    """This program's slot e and its rows [start, end), which it steps through BM at a time.
    TILES = 0: program j takes every row of slot groups[j] (none for -1). Else (a power of
    two, at least num_groups) program i takes the i-th BM-row tile of the groups' rows in
    order, so that a slot with many rows spreads over many programs instead of setting the
    kernel's time; programs past the last tile take none."""
    if TILES == 0:
        e = tl.load(groups + tl.program_id(0))
        start = tl.load(ends + e - 1, mask=e > 0, other=0)
        end = tl.load(ends + e, mask=e >= 0, other=0)
    else:
        j = tl.arange(0, TILES)
        slot = tl.load(groups + j, mask=j < num_groups, other=-1)
        first = tl.load(ends + slot - 1, mask=slot > 0, other=0)
        last = tl.load(ends + slot, mask=slot >= 0, other=0)
        tiles = (last - first + BM - 1) // BM
        after = tl.cumsum(tiles, 0)
        i = tl.program_id(0)
        mine = (after - tiles <= i) & (i < after)  # one group, or none past the last tile
        e = tl.sum(tl.where(mine, slot, 0))
        start = tl.sum(tl.where(mine, first + (i - after + tiles) * BM, 0))
        end = tl.minimum(start + BM, tl.sum(tl.where(mine, last, 0)))
    return tl.maximum(e, 0), start, end


@triton.jit
def _gate_up_silu(
    x,
    x_scale,
    rows,
    ends,
    groups,
    w,
    w_scale,
    h,
    h_scale,
    num_groups,
    inter,
    hidden,
    stride_x,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_h,
    FP8: tl.constexpr,
    X_FP8: tl.constexpr,
    H_FP8: tl.constexpr,
    SCALE_BLOCK_N: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    TILES: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """h[r, n] = silu(x[rows[r]] . w[e, n]) * (x[rows[r]] . w[e, inter + n]) for r in group e.
    FP8: w is FP8 with a scale per [SCALE_BLOCK_N, BK] block, x quantised per BK columns:
    here, or beforehand (X_FP8: x is FP8, its scales in x_scale [tokens, hidden / BK]).
    H_FP8 (BN = BK): h is stored quantised, a row's BN columns one group, its scale in
    h_scale [rows, inter / BN], for _down to read as it is. Rows per program: _program_rows."""
    e, start, end = _program_rows(groups, ends, num_groups, BM, TILES)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    k = tl.arange(0, BK)
    w_gate = w + e.to(tl.int64) * stride_we + n[:, None] * stride_wn + k[None, :]
    w_up = w_gate + inter * stride_wn
    s_gate = w_scale + e.to(tl.int64) * stride_se + (n // SCALE_BLOCK_N) * stride_sn
    s_up = w_scale + e.to(tl.int64) * stride_se + ((inter + n) // SCALE_BLOCK_N) * stride_sn
    for m0 in range(start, end, BM):
        r = m0 + tl.arange(0, BM)
        live = r < end
        token = tl.load(rows + r, mask=live, other=0).to(tl.int64)
        x_rows = x + token[:, None] * stride_x + k[None, :]
        gate = tl.zeros((BM, BN), dtype=tl.float32)
        up = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, hidden, BK):
            a = tl.load(x_rows + k0, mask=live[:, None], other=0.0)
            if X_FP8:
                a_scale = tl.load(x_scale + token * (hidden // BK) + k0 // BK, mask=live, other=0.0)
            elif FP8:
                a, a_scale = quantized_rows(a.to(tl.float32))
            if FP8:
                gate += tl.dot(a, tl.trans(tl.load(w_gate + k0))) * a_scale[:, None] * tl.load(s_gate + k0 // BK)
                up += tl.dot(a, tl.trans(tl.load(w_up + k0))) * a_scale[:, None] * tl.load(s_up + k0 // BK)
            else:
                gate = tl.dot(a, tl.trans(tl.load(w_gate + k0)), gate, input_precision=DOT_PRECISION)
                up = tl.dot(a, tl.trans(tl.load(w_up + k0)), up, input_precision=DOT_PRECISION)
        # silu by hand: tl.sigmoid is a jit function, which Triton's CPU interpreter cannot run
        out = gate / (1.0 + tl.exp(-gate)) * up
        if H_FP8:
            out, out_scale = quantized_rows(out)
            tl.store(h_scale + r.to(tl.int64) * (inter // BN) + tl.program_id(1), out_scale, mask=live)
        tl.store(h + r.to(tl.int64)[:, None] * stride_h + n[None, :], out.to(h.dtype.element_ty), mask=live[:, None])


@triton.jit
def _down(
    h,
    h_scale,
    ends,
    groups,
    w,
    w_scale,
    y,
    num_groups,
    inter,
    stride_h,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_y,
    FP8: tl.constexpr,
    H_FP8: tl.constexpr,
    SCALE_BLOCK_N: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    TILES: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """y[r, n] = h[r] . w[e, n] for r in group e (FP8: as _gate_up_silu; H_FP8: h as it wrote it)."""
    e, start, end = _program_rows(groups, ends, num_groups, BM, TILES)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    k = tl.arange(0, BK)
    w_rows = w + e.to(tl.int64) * stride_we + n[:, None] * stride_wn + k[None, :]
    s_rows = w_scale + e.to(tl.int64) * stride_se + (n // SCALE_BLOCK_N) * stride_sn
    for m0 in range(start, end, BM):
        r = m0 + tl.arange(0, BM)
        live = r < end
        h_rows = h + r.to(tl.int64)[:, None] * stride_h + k[None, :]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, inter, BK):
            a = tl.load(h_rows + k0, mask=live[:, None], other=0.0)
            if H_FP8:
                a_scale = tl.load(h_scale + r.to(tl.int64) * (inter // BK) + k0 // BK, mask=live, other=0.0)
            elif FP8:
                a, a_scale = quantized_rows(a.to(tl.float32))
            if FP8:
                acc += tl.dot(a, tl.trans(tl.load(w_rows + k0))) * a_scale[:, None] * tl.load(s_rows + k0 // BK)
            else:
                acc = tl.dot(a, tl.trans(tl.load(w_rows + k0)), acc, input_precision=DOT_PRECISION)
        tl.store(y + r.to(tl.int64)[:, None] * stride_y + n[None, :], acc.to(y.dtype.element_ty), mask=live[:, None])


def expert_mlp(
    x: torch.Tensor,
    rows: torch.Tensor,
    ends: torch.Tensor,
    groups: torch.Tensor,
    *,
    w13: torch.Tensor,
    w2: torch.Tensor,
    config: dict,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    fp8_block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Shapes as raymoe.actors.models.expert_mlp.expert_mlp; config: BM, BN, BK,
    num_warps, num_stages, and optionally TILED. One row of programs per entry of ``groups``,
    or (TILED; by default from a tile of rows a slot on average) one per tile of rows
    (_program_rows). FP8 weights come
    with their block scales and ``fp8_block``, whose block_k replaces BK."""
    num_rows, (num_slots, two_inter, hidden) = rows.shape[0], w13.shape
    inter = two_inter // 2
    assert w2.shape == (num_slots, hidden, inter) and ends.shape == (num_slots,) and groups.dtype == torch.int32
    assert x.stride(1) == 1 and w13.stride(2) == 1 and w2.stride(2) == 1
    bm, launch = config["BM"], dict(num_warps=config["num_warps"], num_stages=config["num_stages"])
    y = torch.empty(num_rows, hidden, dtype=x.dtype, device=x.device)
    # many rows (prefill): x quantised once rather than by every column tile of every slot
    x_fp8 = fp8_block is not None and num_rows > PRE_QUANTIZE_ROWS
    x, x_scale = quantize_rows(x, fp8_block[1]) if x_fp8 else (x, x)  # (x, x): no scales, never read
    if fp8_block is not None:
        assert w13_scale is not None and w2_scale is not None
        block_n, want_k = fp8_block[0], fp8_block[1]
        if hidden % want_k or inter % want_k:
            raise ValueError(f"expert dimensions {hidden}, {inter} are not multiples of the FP8 block {want_k}")
    else:
        block_n, want_k, w13_scale, w2_scale = 1, config["BK"], w13, w2  # no scales: never read
    bn, bk = _block(inter, config["BN"]), _block(hidden, want_k)
    # h too, by _gate_up_silu's epilogue, where its column tile is one of _down's K groups
    h_fp8 = x_fp8 and bn == want_k == _block(inter, want_k)
    h = torch.empty(num_rows, inter, dtype=torch.float8_e4m3fn if h_fp8 else y.dtype, device=x.device)
    h_scale = torch.empty(num_rows, inter // bn, dtype=torch.float32, device=x.device) if h_fp8 else h
    num_groups = groups.shape[0]
    # float32 exactly (Triton's default takes float32 operands as TF32: 1e-3 off transformers)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    # a tile of rows a slot or more (prefill): programs by tiles, enough for any split of the rows
    tiled = config.get("TILED", num_rows >= num_groups * bm)
    tiles = triton.next_power_of_2(num_groups) if tiled else 0
    programs = triton.cdiv(num_rows, bm) + num_groups if tiled else num_groups
    _gate_up_silu[(programs, inter // bn)](
        x,
        x_scale,
        rows,
        ends,
        groups,
        w13,
        w13_scale,
        h,
        h_scale,
        num_groups,
        inter,
        hidden,
        x.stride(0),
        w13.stride(0),
        w13.stride(1),
        w13_scale.stride(0),
        w13_scale.stride(1),
        h.stride(0),
        FP8=fp8_block is not None,
        X_FP8=x_fp8,
        H_FP8=h_fp8,
        SCALE_BLOCK_N=block_n,
        BM=bm,
        BN=bn,
        BK=bk,
        TILES=tiles,
        DOT_PRECISION=precision,
        **launch,
    )
    bn, bk = _block(hidden, config["BN"]), _block(inter, want_k)
    _down[(programs, hidden // bn)](
        h,
        h_scale,
        ends,
        groups,
        w2,
        w2_scale,
        y,
        num_groups,
        inter,
        h.stride(0),
        w2.stride(0),
        w2.stride(1),
        w2_scale.stride(0),
        w2_scale.stride(1),
        y.stride(0),
        FP8=fp8_block is not None,
        H_FP8=h_fp8,
        SCALE_BLOCK_N=block_n,
        BM=bm,
        BN=bn,
        BK=bk,
        TILES=tiles,
        DOT_PRECISION=precision,
        **launch,
    )
    return y


def _block(dim: int, want: int) -> int:
    """The block for an expert dimension (>= 16, tl.dot's minimum)."""
    block = block_dividing(dim, want)
    if block is None:
        raise ValueError(f"expert dimension {dim} is not a multiple of 16: the Triton expert kernels need one")
    return block
