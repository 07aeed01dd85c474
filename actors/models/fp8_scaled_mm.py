"""FP8 projections of many rows (prefill) through cuBLAS's block-scaled GEMM: torch's
``F.scaled_mm`` with 1 x 128 activation scales and 128 x 128 weight scales (DeepSeek's recipe,
the one fp8.py stores). On an H100 it ran the Qwen3-30B-A3B projections at 4,096 rows in
0.49-0.57 x raymoe's Triton FP8 GEMM (BENCHMARKS.md, issue 21). x is quantised first by the
Triton quantiser, in the layout cuBLAS reads. At few rows cuBLAS refuses (1 row) or is no
faster once x is quantised, so decode stays on the Triton kernels (linear.py decides).

Imported only where Triton and CUDA are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raymoe.actors.models.fp8_linear_triton import quantize_rows

CUBLAS_ROW_ALIGN = 4  # cuBLAS reads the activation scales M-major in 16-byte rows
CUBLAS_SCALE_K_ALIGN = 4  # ... and the weight's K blocks the same way


def fits(x: torch.Tensor, weight: torch.Tensor, block: tuple[int, int]) -> bool:
    """Whether cuBLAS takes these operands: bf16 x on a GPU, 128 x 128 blocks tiling the weight."""
    n, k = weight.shape
    return (
        x.is_cuda
        and hasattr(F, "scaled_mm")
        and x.dtype == torch.bfloat16
        and tuple(block) == (128, 128)
        and n % block[0] == 0
        and k % block[1] == 0
    )


def fp8_scaled_mm(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, *, block: tuple[int, int], bias: torch.Tensor | None
) -> torch.Tensor:
    """x [M, K] bf16, weight [N, K] float8_e4m3fn, scale [N/128, K/128] float32 -> [M, N] bf16."""
    m = x.shape[0]
    xq, x_scale = quantize_rows(x, block[1], m_major_align=CUBLAS_ROW_ALIGN)
    k_pad = -scale.shape[1] % CUBLAS_SCALE_K_ALIGN
    w_scale = F.pad(scale, (0, k_pad)) if k_pad else scale
    y = F.scaled_mm(
        xq,
        weight.t(),
        x_scale,
        F.ScalingType.BlockWise1x128,
        w_scale.t(),
        F.ScalingType.BlockWise128x128,
        output_dtype=torch.bfloat16,
    )[:m]
    return y if bias is None else y + bias
