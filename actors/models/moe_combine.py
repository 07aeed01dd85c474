"""MoE combine: each token's output is the router-weighted sum of its choices' expert
outputs, out[t] = sum_j weights[t, j] * y[sorted_row[t, j]], over this rank's choices
only: rows of y past the last group end (other ranks' or invalid choices) are not
read, whatever they hold (the expert kernels leave them unwritten).

Two implementations of the same sum, both accumulating in float32:
- ``torch``: zero the foreign rows, then ``F.embedding_bag`` (a gather and a weighted
  sum in one kernel); the reference and the CPU path;
- ``triton``: one kernel, one program per (token, column block), which skips the
  foreign rows instead of reading zeros.

``combine_add_rms_norm`` also adds the sum to the residual stream and applies the next
RMSNorm: one Triton kernel where a single rank holds every expert (no sum over ranks
comes between the combine and the norm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raymoe.actors.models import ops


def combine(
    y: torch.Tensor,
    sorted_row: torch.Tensor,
    weights: torch.Tensor,
    ends: torch.Tensor,
    *,
    all_local: bool = False,
    backend: str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [M, H]; sorted_row, weights [N, k]; ends [S] (the dispatch's) -> [N, H] in y's
    dtype, written to ``out`` when given. all_local promises every row is one of this
    rank's (ends[-1] == M): the torch path then skips zeroing the rest (a full pass over
    y, which is large in prefill)."""
    if _backend(y, backend) == "torch":
        if not all_local:
            y = torch.where((torch.arange(y.shape[0], device=y.device) < ends[-1]).unsqueeze(1), y, 0)
        summed = F.embedding_bag(sorted_row, y, per_sample_weights=weights.to(y.dtype), mode="sum")
        return summed if out is None else out.copy_(summed)
    from raymoe.actors.models import moe_combine_triton

    return moe_combine_triton.combine(y, sorted_row, weights, ends, out=out)


def combine_add_rms_norm(
    y: torch.Tensor,
    sorted_row: torch.Tensor,
    weights: torch.Tensor,
    ends: torch.Tensor,
    *,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    all_local: bool = False,
    shared: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(residual + block) * weight, residual + block) for the MoE block's output
    block = combine(...) + shared (the shared experts' output, if any), as
    ops.add_rms_norm after ``combine``; one kernel on Triton (the residual updated in
    place there)."""
    fits = residual.is_contiguous() and residual.dtype == y.dtype and (shared is None or shared.is_contiguous())
    if _backend(y, backend) == "triton" and fits:
        from raymoe.actors.models import moe_combine_triton

        normed = moe_combine_triton.combine_add_rms_norm(
            y, sorted_row, weights, ends, residual=residual, weight=weight, eps=eps, shared=shared
        )
        return normed, residual
    summed = combine(y, sorted_row, weights, ends, all_local=all_local, backend=backend)
    if shared is not None:
        summed = summed + shared
    return ops.add_rms_norm(summed, residual, weight, eps)


def _backend(y: torch.Tensor, backend: str | None) -> str:
    return ops.choose_backend(backend, op="combine", on_cuda=y.is_cuda, fits=True)
