"""MoE combine: each token's output is the router-weighted sum of its choices' expert
outputs, out[t] = sum_j weights[t, j] * y[sorted_row[t, j]], over this rank's choices
only: rows of y past the last group end (other ranks' or invalid choices) are not
read, whatever they hold (the expert kernels leave them unwritten).

Two implementations of the same sum, both accumulating in float32:
- ``torch``: zero the foreign rows, then ``F.embedding_bag`` (a gather and a weighted
  sum in one kernel); the reference and the CPU path;
- ``triton``: one kernel, one program per (token, column block), which skips the
  foreign rows instead of reading zeros.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from raymoe.actors.models.ops import triton_available


def combine(y: torch.Tensor, sorted_row: torch.Tensor, weights: torch.Tensor, ends: torch.Tensor,
            all_local: bool = False, backend: str | None = None) -> torch.Tensor:  # fmt: skip
    """y [M, H]; sorted_row, weights [N, k]; ends [S] (the dispatch's) -> [N, H] in y's
    dtype. all_local promises every row is one of this rank's (ends[-1] == M): the torch
    path then skips zeroing the rest (a full pass over y, which is large in prefill)."""
    if backend is None:
        backend = "triton" if y.is_cuda and triton_available() else "torch"
    if backend == "torch":
        if not all_local:
            y = torch.where((torch.arange(y.shape[0], device=y.device) < ends[-1]).unsqueeze(1), y, 0)
        return F.embedding_bag(sorted_row, y, per_sample_weights=weights.to(y.dtype), mode="sum")
    if backend != "triton":
        raise ValueError(f"combine backend must be 'triton' or 'torch', not {backend!r}")
    from raymoe.actors.models.moe_combine_triton import combine as triton_combine

    return triton_combine(y, sorted_row, weights, ends)
