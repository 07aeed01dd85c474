"""Every listed rank's rows, read straight from their symmetric buffers, stacked in one
Triton kernel (SymmetricAllReduce.gather): a one-shot all-gather. One program per row of
each rank."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from raymoe.comm.reduce_add_rms_norm_triton import row_warps


@triton.jit
def _gather_rows(buffers, offset, out, rows, width, BLOCK: tl.constexpr):
    rank, row = tl.program_id(0), tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    buffer = tl.load(buffers + rank).to(tl.pointer_type(out.dtype.element_ty))
    values = tl.load(buffer + offset + row.to(tl.int64) * width + cols, mask=mask, other=0.0)
    tl.store(out + (rank * rows + row).to(tl.int64) * width + cols, values, mask=mask)


def gather_rows(buffers: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """buffers: int64 addresses of the ranks' buffers, each holding that rank's [T, H] (shaped
    like ``like``) at element ``offset`` -> [ranks * T, H], rank after rank."""
    rows, width = like.shape
    out = torch.empty(buffers.numel() * rows, width, dtype=like.dtype, device=like.device)
    if rows:
        block = triton.next_power_of_2(width)
        _gather_rows[(buffers.numel(), rows)](
            buffers, offset, out, rows, width, BLOCK=block, num_warps=row_warps(block)
        )
    return out
