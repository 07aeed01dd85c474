"""MoE dispatch: router logits -> top-k choices -> physical slots -> (token, choice) rows
grouped by this rank's slots. The choices are a softmax top-k, or one of moe_routing.py's
group-limited rules (DeepSeek's, GLM-4.5's).

Two implementations of the same result:
- ``torch``: topk, softmax (or moe_routing.grouped_top_k), the replica pick, a stable
  sort of 16-bit keys, a searchsorted, a scatter and the busy-slot list -- about fifteen
  small kernels; the reference, the CPU path and the path for large batches;
- ``triton``: one or two kernels (moe_dispatch_triton.py) for up to
  ``TRITON_MAX_CHOICES`` choices (decode batches, where these small kernels are
  much of a step).

Both give the same choices, weights, groups and group ends (up to ties among router
logits, which either may break its own way). The order of rows inside a group is the
torch path's stable order, and whatever the Triton kernel's atomics make it: no
result depends on it (each row's expert output is computed on its own, and the
combine finds every row through ``sorted_row``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raymoe.actors.models.moe_routing import grouped_top_k
from raymoe.actors.models.ops import choose_backend
from raymoe.actors.models.spec import GroupedTopK

# The grouping holds every choice in one program's registers, up to 4096 of them. Measured
# on an H200 (benchmarks/expert_mlp_bench.py, dispatch rows) faster than torch's dozen
# kernels at every size up to there: 64 / 256 / 512 tokens x 8: 12 / 16 / 22 us against
# 60 / 64 / 68 us.
TRITON_MAX_CHOICES = 4096
# group-limited routing scores each group in an unrolled loop; DeepSeek's checkpoints have 8
TRITON_MAX_GROUPS = 16


@dataclass(frozen=True)
class Dispatch:
    """weights, physical [N, k]: the router's weights (logits' dtype) and physical slots
    (int64; -1 for rows that are not valid). rows [M = N*k]: token of each sorted row,
    ends [slots] int32: group g is sorted rows [ends[g-1], ends[g]); rows past ends[-1]
    are other ranks' (or invalid) choices. sorted_row [N, k]: the sorted row of each choice.
    groups [min(slots, M)] int32: the slots with rows, ascending, then -1s (which slots
    the expert kernels must run)."""

    weights: torch.Tensor
    physical: torch.Tensor
    rows: torch.Tensor
    ends: torch.Tensor
    sorted_row: torch.Tensor
    groups: torch.Tensor


def dispatch(
    logits: torch.Tensor,
    top_k: int,
    *,
    norm_topk_prob: bool,
    logical_to_physical: torch.Tensor,
    replica_count: torch.Tensor,
    num_physical: int,
    slot_start: int,
    slots: int,
    valid: torch.Tensor | None = None,
    grouped: GroupedTopK | None = None,
    correction_bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> Dispatch:
    """logits [N, E]; logical_to_physical [E, R] and replica_count [E] (one layer's
    ExpertMap tables, num_physical slots in all); this rank holds slots [slot_start,
    slot_start + slots); valid [N] bool or None (all valid); ``grouped``: a group-limited
    rule (float32 logits; ``correction_bias`` [E] float32 for the sigmoid one), None: softmax
    top-k.

    A token's replica is its row index modulo the expert's replica count: deterministic
    and spread evenly; replicas hold the same weights.
    """
    n = logits.shape[0]
    fits = n * top_k <= TRITON_MAX_CHOICES and (grouped is None or grouped.num_groups <= TRITON_MAX_GROUPS)
    backend = choose_backend(backend, op="dispatch", on_cuda=logits.is_cuda, fits=fits)
    tables = dict(logical_to_physical=logical_to_physical, replica_count=replica_count)
    where = dict(slot_start=slot_start, slots=slots, valid=valid)
    if backend == "triton":
        from raymoe.actors.models import moe_dispatch_triton

        rule = dict(norm_topk_prob=norm_topk_prob, grouped=grouped, correction_bias=correction_bias)
        return Dispatch(*moe_dispatch_triton.dispatch(logits, top_k, **rule, **tables, **where))
    all_local = slots == num_physical and valid is None
    if grouped is None:
        return _torch_dispatch(logits, top_k, norm_topk_prob=norm_topk_prob, all_local=all_local, **tables, **where)
    weights, logical = grouped_top_k(logits, correction_bias, top_k=top_k, norm_topk_prob=norm_topk_prob, rule=grouped)
    return _group_choices(weights, logical, **tables, all_local=all_local, **where)


def _torch_dispatch(
    logits, top_k, *, norm_topk_prob, logical_to_physical, replica_count, all_local, slot_start, slots, valid
) -> Dispatch:
    if norm_topk_prob:
        # softmax is monotonic, and the renormalised top-k probabilities are the softmax of
        # the top-k logits (float32 inside, rounded to the logits' dtype once). Choices are
        # in descending order, as the Triton kernel makes them.
        top, logical = torch.topk(logits, top_k, dim=-1)
        weights = torch.softmax(top, dim=-1)
    else:
        probs, logical = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float), top_k, dim=-1)
        weights = probs.to(logits.dtype)
    tables = dict(logical_to_physical=logical_to_physical, replica_count=replica_count)
    return _group_choices(
        weights, logical, **tables, all_local=all_local, slot_start=slot_start, slots=slots, valid=valid
    )


def _group_choices(
    weights, logical, *, logical_to_physical, replica_count, all_local, slot_start, slots, valid
) -> Dispatch:
    n, top_k = logical.shape
    if logical_to_physical.shape[1] == 1:  # one replica each: a plain lookup
        physical = logical_to_physical[:, 0][logical]
    else:
        token = torch.arange(n, device=logical.device).unsqueeze(1)
        physical = logical_to_physical[logical, token % replica_count[logical]]
    if valid is not None:
        physical = torch.where(valid.unsqueeze(1), physical, -1)
    flat = physical.reshape(-1)
    if all_local:
        bucket = flat  # every choice is one of our slots
    else:
        local = flat - slot_start
        bucket = torch.where((local >= 0) & (local < slots), local, slots)  # others sort last
    # 16-bit keys: sorting takes half the time it takes on int64 ones
    keys, order = torch.sort(bucket.to(torch.int16), stable=True)
    group_ends = torch.arange(1, slots + 1, dtype=torch.int16, device=logical.device)
    ends = torch.searchsorted(keys, group_ends, out_int32=True)
    sorted_row = torch.empty_like(order).scatter_(0, order, torch.arange(n * top_k, device=logical.device))
    return Dispatch(
        weights=weights,
        physical=physical,
        rows=order // top_k,
        ends=ends,
        sorted_row=sorted_row.view(n, top_k),
        groups=busy_slots(ends, n * top_k),
    )


def busy_slots(ends: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The slots whose groups have rows, ascending, then -1s: [min(slots, num_rows)] int32
    (no host sync)."""
    busy = torch.diff(ends, prepend=ends.new_zeros(1)) > 0
    order = torch.sort((~busy).to(torch.uint8), stable=True).indices  # busy slots first
    return torch.where(busy[order], order, -1)[: min(ends.shape[0], num_rows)].to(torch.int32)
