"""y = x W^T (+ b) for the model's dense projections: a Triton matrix-vector kernel when
x has at most ``SKINNY_MAX_ROWS`` rows on a GPU (a decode step of one sequence, where
cuBLAS's GEMMs leave part of the memory bandwidth unused), ``F.linear`` otherwise. The
choice depends on shapes alone, so a CUDA graph captures one path."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raymoe.actors.models.ops import block_dividing, choose_backend

# From benchmarks/skinny_linear_bench.py --sweep on an H200 (BENCHMARKS.md): at one row the
# kernel beat cuBLAS on every projection of the model (qkv 5120 x 2048: 6.4 vs 7.5 us,
# o_proj 2048 x 4096: 6.1 vs 9.0 us, the LM head 140 vs 151 us); at two rows and more it lost.
SKINNY_MAX_ROWS = 1
# the sweep's best block sizes for most shapes (BK shrinks to divide K)
SKINNY_CONFIG = dict(BN=8, BK=1024, num_warps=8, num_stages=1)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """x [..., K], weight [N, K] -> [..., N]. backend: "triton" or "torch"; None picks
    (see the module doc). config: the Triton block sizes, for benchmarks."""
    # cheap tests first: most calls (batches of many rows) stop at the row count
    fits = x.dim() == 2 and 0 < x.shape[0] <= SKINNY_MAX_ROWS and x.stride(1) == 1 and weight.stride(1) == 1
    fits = fits and block_dividing(x.shape[1], SKINNY_CONFIG["BK"]) is not None
    if choose_backend(backend, op="linear", on_cuda=x.is_cuda, fits=fits) == "torch":
        return F.linear(x, weight, bias)
    from raymoe.actors.models.skinny_linear_triton import skinny_linear

    if config is None:
        config = dict(SKINNY_CONFIG, BK=block_dividing(x.shape[1], SKINNY_CONFIG["BK"]))
    return skinny_linear(x, weight, bias, config)
