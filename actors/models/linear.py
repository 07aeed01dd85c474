"""y = x W^T (+ b) for the model's dense projections: a Triton matrix-vector kernel when
x has at most ``SKINNY_MAX_ROWS`` rows on a GPU (a decode step of one sequence, where
cuBLAS's GEMMs leave part of the memory bandwidth unused), ``F.linear`` otherwise. The
choice depends on shapes alone, so a CUDA graph captures one path.

An FP8 weight (float8_e4m3fn with block scales, fp8.py) runs on a GPU the same matrix-vector
kernel at those row counts, a Triton FP8 GEMM past them (activations quantised per row and
block_k columns, inside the kernels or in a pass of their own) and cuBLAS's block-scaled
GEMM past ``fp8_cublas_min_rows`` (fp8_scaled_mm.py), and is dequantised to x's dtype
elsewhere."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raymoe.actors.models.fp8 import FP8, dequantize_blocks, kernel_block
from raymoe.actors.models.ops import block_dividing, choose_backend

# From benchmarks/skinny_linear_bench.py --sweep on an H200 (BENCHMARKS.md): at one row the
# kernel beat cuBLAS on every projection of the model (qkv 5120 x 2048: 6.4 vs 7.5 us,
# o_proj 2048 x 4096: 6.1 vs 9.0 us, the LM head 140 vs 151 us); at two rows and more it lost.
SKINNY_MAX_ROWS = 1
# the most rows the kernel itself takes (a requested "triton" backend runs it up to here)
SKINNY_KERNEL_MAX_ROWS = 16
# the sweep's best block sizes for most shapes (BK shrinks to divide K)
SKINNY_CONFIG = dict(BN=8, BK=1024, num_warps=8, num_stages=1)
# FP8 weights: the sweep's best summed over the projections (skinny_linear_bench.py --dtype fp8)
SKINNY_FP8_CONFIG = dict(BN=8, BK=2048, num_warps=4, num_stages=2)
# FP8 projections past one row run the Triton GEMM (fp8_linear_triton.py), and cuBLAS's
# block-scaled GEMM from these row counts on, where fp8_gemm_bench.py found it faster (H100,
# BENCHMARKS.md, issue 21); weights under 2M elements stay on Triton longer.
FP8_CUBLAS_MIN_ROWS = 65
FP8_CUBLAS_MIN_ROWS_SMALL = 129
FP8_CUBLAS_SMALL_WEIGHT = 2**21


def fp8_cublas_min_rows(weight: torch.Tensor) -> int:
    """From how many rows of x an FP8 projection by ``weight`` runs on cuBLAS."""
    return FP8_CUBLAS_MIN_ROWS if weight.numel() >= FP8_CUBLAS_SMALL_WEIGHT else FP8_CUBLAS_MIN_ROWS_SMALL


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scale: torch.Tensor | None = None,
    block: tuple[int, int] | None = None,
    backend: str | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """x [..., K], weight [N, K] -> [..., N]. An FP8 weight comes with its ``scale`` per
    ``block``. backend: "triton" or "torch"; None picks (see the module doc). config: the
    matrix-vector kernel's block sizes, for benchmarks."""
    if weight.dtype == FP8:
        assert scale is not None and block is not None, "an FP8 weight needs its block scales"
        return _fp8_linear(x, weight, bias, scale=scale, block=block, backend=backend, config=config)
    skinny = _skinny_config(x, weight, max_rows=SKINNY_KERNEL_MAX_ROWS if backend == "triton" else SKINNY_MAX_ROWS)
    if choose_backend(backend, op="linear", on_cuda=x.is_cuda, fits=skinny is not None) == "torch":
        return F.linear(x, weight, bias)
    if skinny is None:
        raise ValueError(
            f"the triton linear takes 1-{SKINNY_KERNEL_MAX_ROWS} contiguous rows with K a multiple of 16, "
            f"not x {tuple(x.shape)}"
        )
    from raymoe.actors.models.skinny_linear_triton import skinny_linear

    return skinny_linear(x, weight, bias, config or skinny)


def _skinny_config(
    x: torch.Tensor,
    weight: torch.Tensor,
    block: tuple[int, int] | None = None,
    max_rows: int = SKINNY_MAX_ROWS,
) -> dict | None:
    """The matrix-vector kernel's block sizes for these operands, or None where it does not
    take them (more than ``max_rows`` rows, strides, a K no block divides; FP8: blocks it
    cannot tile)."""
    # cheap tests first: most calls (batches of many rows) stop at the row count
    if not (x.dim() == 2 and 0 < x.shape[0] <= max_rows and x.stride(1) == 1 and weight.stride(1) == 1):
        return None
    config = SKINNY_CONFIG if block is None else SKINNY_FP8_CONFIG
    if block is not None and (block[0] % config["BN"] or block[1] > config["BK"]):
        return None
    bk = block_dividing(x.shape[1], config["BK"], least=block[1] if block is not None else 16)
    return None if bk is None else dict(config, BK=bk)


def _fp8_linear(x, weight, bias, *, scale, block, backend, config) -> torch.Tensor:
    fits = x.stride(-1) == 1 and kernel_block(block)
    if choose_backend(backend, op="fp8_linear", on_cuda=x.is_cuda, fits=fits) == "torch":
        return F.linear(x, dequantize_blocks(weight, scale, block, x.dtype), bias)
    skinny = _skinny_config(x, weight, block)
    if skinny is not None:
        from raymoe.actors.models.skinny_linear_triton import skinny_linear

        return skinny_linear(x, weight, bias, config or skinny, scale=scale, block=block)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] >= fp8_cublas_min_rows(weight):
        from raymoe.actors.models import fp8_scaled_mm

        if fp8_scaled_mm.fits(x2, weight, block):
            y = fp8_scaled_mm.fp8_scaled_mm(x2, weight, scale, block=block, bias=bias)
            return y.view(*x.shape[:-1], weight.shape[0])
    from raymoe.actors.models.fp8_linear_triton import fp8_linear

    y = fp8_linear(x2, weight, scale, block=block, bias=bias)
    return y.view(*x.shape[:-1], weight.shape[0])
