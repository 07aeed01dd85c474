"""The routed experts' MLP over (token, choice) rows grouped by expert slot.

    y[r] = down_e(silu(gate_e(x[rows[r]])) * up_e(x[rows[r]]))   for r in group e

Rows are sorted by slot: group e is rows [ends[e-1], ends[e]) (group 0 starts at
row 0), and rows past the last group end belong to other ranks' slots (or to no
slot): they are left as they are (garbage; the combine does not read them).

Two implementations of the same maths:
- ``torch``: two ``torch._grouped_mm`` calls and a SiLU-and-mul; the reference,
  the path on CPU, and on GPU past 32 rows per slot (prefill), where it is faster;
- ``triton``: two Triton kernels, one program per (busy slot, column block), each
  looping over its group's rows. The first reads x's rows in place (no gathered
  copy), computes gate and up together and applies SiLU-and-mul in float32 before
  one bf16 rounding. No host syncs: it runs
  inside CUDA graphs. benchmarks/expert_mlp_bench.py measures it against
  ``torch._grouped_mm`` and FlashInfer's ``cutlass_fused_moe`` (BENCHMARKS.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raymoe.actors.models import ops
from raymoe.actors.models.fp8 import dequantize_blocks, kernel_block
from raymoe.actors.models.ops import choose_backend


def expert_mlp(
    x: torch.Tensor,
    rows: torch.Tensor,
    ends: torch.Tensor,
    *,
    w13: torch.Tensor,
    w2: torch.Tensor,
    groups: torch.Tensor | None = None,
    all_slots: int | None = None,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    fp8_block: tuple[int, int] | None = None,
    backend: str | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """x [N, H]; rows [M] (token of each sorted row); ends [S] int32 (cumulative group
    ends); w13 [S, 2I, H] ([gate; up]); w2 [S, H, I] -> y [M, H] in x's dtype.
    groups [G] int32: the slots to run, every slot with rows among them, -1 for none
    (the dispatch's ``groups``); the Triton kernels launch programs for these alone, so
    a decode step with 8 busy slots of 128 launches 8 rows of programs. None: all slots.
    all_slots: the slots of every rank the M rows are spread over (None: S), which sets
    the rows a slot gets on average, hence the block sizes.

    FP8 weights (``fp8_block`` set) come with their block scales: on a GPU the Triton FP8
    kernels take them, except from ``FP8_WIDEN_ROWS_PER_SLOT`` rows per slot on (large
    prefill steps, backend None), where the slots' weights are widened to x's dtype for
    torch._grouped_mm (CUTLASS's bf16 grouped GEMM outruns the Triton FP8 kernels by more
    than the widening costs: BENCHMARKS.md); torch dequantises them.

    backend: "triton" or "torch"; None picks the faster one measured for this size
    (``pick_config``) on CUDA, torch elsewhere. config: Triton block sizes, for benchmarks.
    """
    num_slots = all_slots or w13.shape[0]
    fp8 = dict(w13_scale=w13_scale, w2_scale=w2_scale, fp8_block=fp8_block)
    if fp8_block is not None:
        fits = kernel_block(fp8_block) and w13.shape[2] % fp8_block[1] == 0 and w2.shape[2] % fp8_block[1] == 0
    else:
        fits = config is not None or pick_config(rows.shape[0], num_slots) is not None
    if choose_backend(backend, op="expert_mlp", on_cuda=x.is_cuda, fits=fits) == "torch":
        if fp8_block is not None:
            w13 = dequantize_blocks(w13, w13_scale, fp8_block, x.dtype)
            w2 = dequantize_blocks(w2, w2_scale, fp8_block, x.dtype)
        return _torch_expert_mlp(x, rows, ends, w13=w13, w2=w2)
    if fp8_block is not None and backend is None and rows.shape[0] >= FP8_WIDEN_ROWS_PER_SLOT * num_slots:
        from raymoe.actors.models.fp8_widen_triton import widen_blocks

        w13 = widen_blocks(w13, w13_scale, fp8_block, x.dtype)
        w2 = widen_blocks(w2, w2_scale, fp8_block, x.dtype)
        return _torch_expert_mlp(x, rows, ends, w13=w13, w2=w2)
    from raymoe.actors.models import expert_mlp_triton

    if groups is None:
        groups = torch.arange(w13.shape[0], dtype=torch.int32, device=x.device)
    config = config or triton_config(rows.shape[0], num_slots, fp8=fp8_block is not None)
    return expert_mlp_triton.expert_mlp(x, rows, ends, groups, w13=w13, w2=w2, config=config, **fp8)


def _torch_expert_mlp(x, rows, ends, *, w13, w2) -> torch.Tensor:
    align = 16 // x.element_size()  # torch._grouped_mm takes rows of a multiple of 16 bytes
    hidden, inter = x.shape[1], w2.shape[2]
    if hidden % align or inter % align:
        return _padded_expert_mlp(x, rows, ends, w13=w13, w2=w2, align=align)
    h = ops.silu_and_mul(torch._grouped_mm(x[rows], w13.transpose(1, 2), offs=ends))
    return torch._grouped_mm(h, w2.transpose(1, 2), offs=ends)


def _padded_expert_mlp(x, rows, ends, *, w13, w2, align: int) -> torch.Tensor:
    """The same with the hidden and intermediate widths padded with zeros to ``align``: exact (a
    zero gate gives a zero product). Tiny models and odd tp splits (an intermediate of 20 over
    moe_tp 2 is 40-byte rows in float32); real checkpoints' widths are aligned."""
    hidden, inter = x.shape[1], w2.shape[2]
    ph, pi = -hidden % align, -inter % align
    gate, up = w13[:, :inter], w13[:, inter:]
    w13 = torch.cat([F.pad(gate, (0, ph, 0, pi)), F.pad(up, (0, ph, 0, pi))], dim=1)
    y = _torch_expert_mlp(F.pad(x, (0, ph)), rows, ends, w13=w13, w2=F.pad(w2, (0, pi, 0, ph)))
    return y[:, :hidden].contiguous()


# Triton block sizes by rows per slot: the best of benchmarks/expert_mlp_bench.py --sweep
# on an H200 (BENCHMARKS.md). Past 32 rows per slot torch._grouped_mm (CUTLASS) was as
# fast or faster (64 rows: 484 vs 502 us), so prefill stays on it.
_CONFIGS = (
    (8, dict(BM=16, BN=64, BK=128, num_warps=4, num_stages=4)),
    (16, dict(BM=32, BN=64, BK=128, num_warps=4, num_stages=3)),
    (32, dict(BM=64, BN=64, BK=64, num_warps=4, num_stages=3)),
)
_LARGEST = _CONFIGS[-1][1]
# FP8 weights stay on the Triton kernels at every size. Decode (rows per slot up to the bound):
# the best of expert_mlp_bench.py --dtype fp8 --sweep at batch 1 and 64 (H100, BENCHMARKS.md).
# From 128 rows per slot these blocks ran 4,096 tokens' experts in 1.19 ms against 1.55 ms with
# _LARGEST (H100, BENCHMARKS.md).
FP8_ONE_ROW_CONFIG = dict(BM=16, BN=64, BK=128, num_warps=4, num_stages=3)
FP8_DECODE_CONFIG = dict(BM=16, BN=128, BK=128, num_warps=4, num_stages=3)
_FP8_CONFIGS = ((1, FP8_ONE_ROW_CONFIG), (8, FP8_DECODE_CONFIG))
_MANY_ROWS_PER_SLOT, _MANY_ROWS = 128, dict(BM=128, BN=128, BK=128, num_warps=8, num_stages=3)
# FP8 weights from this many rows per slot: widened to bf16 for torch._grouped_mm instead of the
# Triton FP8 kernels, past where the two crossed on an H100 (BENCHMARKS.md, issue 21)
FP8_WIDEN_ROWS_PER_SLOT = 1280


def pick_config(num_rows: int, num_slots: int) -> dict | None:
    """Triton block sizes for num_rows rows over num_slots slots, or None where
    torch._grouped_mm is faster. Decided on the host from shapes alone, so a CUDA graph
    captures one fixed choice."""
    per_slot = num_rows / max(num_slots, 1)
    return next((config for bound, config in _CONFIGS if per_slot <= bound), None)


def triton_config(num_rows: int, num_slots: int, *, fp8: bool = False) -> dict:
    """The Triton kernels' block sizes at any size, past pick_config's too (FP8 weights)."""
    per_slot = num_rows / max(num_slots, 1)
    if fp8 and (decode := next((config for bound, config in _FP8_CONFIGS if per_slot <= bound), None)):
        return decode
    many = per_slot >= _MANY_ROWS_PER_SLOT
    return pick_config(num_rows, num_slots) or (_MANY_ROWS if many else _LARGEST)
