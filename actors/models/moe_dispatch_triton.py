"""The MoE dispatch in Triton (see moe_dispatch.py for what it computes), in two phases:

1. routing, per block of tokens: top-k of the router logits and their softmax, or
   moe_routing.py's group-limited rules (DeepSeek's, GLM-4.5's; both in
   moe_routing_triton.py); the replica pick and
   this rank's bucket of each choice (another rank's or an invalid choice: the bucket
   past the last slot);
2. grouping, in one program: group sizes by a histogram of the buckets, their ends
   by a prefix sum; each choice's row by an atomic cursor per bucket (a counting
   sort: with a register sort instead, grouping 2k choices took 18 us on an H200, most
   of a layer's routing); the list of slots with rows (a prefix sum over the busy slots).

Up to ``FUSED_MAX_TOKENS`` tokens (one block) both phases run in one program, which
saves a launch; past it the routing runs in a grid of its own, one program per
block, and the grouping in a second launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from raymoe.actors.models.moe_routing_triton import grouped_top_k, softmax_top_k
from raymoe.actors.models.spec import GroupedTopK

FUSED_MAX_TOKENS = 32
# tokens a routing program takes past FUSED_MAX_TOKENS: route + group at 64-512 tokens took
# 3.5 us less than with 32 (H100, BENCHMARKS.md, issue 21)
ROUTE_BLOCK_TOKENS = 8


@triton.jit
def _route_block(
    t0,
    logits,
    l2p,
    replica_count,
    valid,
    bias,
    weights,
    physical,
    buckets,
    num_tokens,
    num_experts,
    stride_logits,
    max_replicas,
    slot_start,
    slots,
    scale,
    TOP_K: tl.constexpr,
    NORM_TOPK: tl.constexpr,
    HAS_VALID: tl.constexpr,
    GROUPED: tl.constexpr,
    SIGMOID: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    TOPK_GROUPS: tl.constexpr,
    BT: tl.constexpr,
    EP: tl.constexpr,
    KP: tl.constexpr,
    GP: tl.constexpr,
):
    """Phase 1 for tokens [t0, t0 + BT)."""
    col = tl.arange(0, EP)
    kcol = tl.arange(0, KP)
    t = t0 + tl.arange(0, BT)
    live_t = t < num_tokens
    v = tl.load(
        logits + t[:, None] * stride_logits + col[None, :],
        mask=live_t[:, None] & (col[None, :] < num_experts),
        other=float("-inf"),
    ).to(tl.float32)
    if GROUPED:
        top_i, p = grouped_top_k(
            v,
            live_t,
            col,
            kcol,
            bias,
            num_experts,
            scale,
            TOP_K,
            NORM_TOPK,
            SIGMOID,
            NUM_GROUPS,
            TOPK_GROUPS,
            BT,
            KP,
            GP,
        )
    else:
        top_i, p = softmax_top_k(v, live_t, col, kcol, TOP_K, NORM_TOPK, BT, KP)
    # a row of NaN logits (garbage padding rows) may pick a padding column: keep it in the tables
    top_i = tl.minimum(top_i, num_experts - 1)
    chosen = live_t[:, None] & (kcol[None, :] < TOP_K)
    replica = t[:, None] % tl.load(replica_count + top_i, mask=chosen, other=1)
    phys = tl.load(l2p + top_i * max_replicas + replica, mask=chosen, other=-1)
    if HAS_VALID:
        ok = tl.load(valid + t, mask=live_t, other=0) != 0
        phys = tl.where(ok[:, None], phys, -1)
    choice = t[:, None] * TOP_K + kcol[None, :]
    tl.store(weights + choice, p.to(weights.dtype.element_ty), mask=chosen)
    tl.store(physical + choice, phys.to(physical.dtype.element_ty), mask=chosen)
    local = phys - slot_start
    bucket = tl.where((local >= 0) & (local < slots), local, slots)
    tl.store(buckets + choice, bucket.to(tl.int32), mask=chosen)


@triton.jit
def _group(
    buckets,
    cursors,
    rows,
    ends,
    sorted_row,
    groups,
    num_choices,
    num_groups,
    slots,
    TOP_K: tl.constexpr,
    BLOCK: tl.constexpr,
    SP: tl.constexpr,
):
    """Phase 2, in one program: a counting sort of the buckets held in registers."""
    i = tl.arange(0, BLOCK)
    live = i < num_choices
    bucket = tl.load(buckets + i, mask=live, other=slots)  # padding lanes: past the last slot
    # group sizes by a histogram over the buckets (SP > slots bins: bin `slots` counts other
    # ranks' choices and the padding lanes), ends by their prefix sum
    s = tl.arange(0, SP)
    count = tl.histogram(bucket, SP)
    end = tl.cumsum(count, 0)
    tl.store(ends + s, end, mask=s < slots)
    # each choice takes the next free row of its bucket's range from a per-bucket cursor;
    # the order inside a group is whatever the atomics make it (no row's result depends on it)
    tl.store(cursors + s, end - count)
    tl.debug_barrier()
    row = tl.atomic_add(cursors + bucket, 1, mask=live)
    tl.store(rows + row, (i // TOP_K).to(rows.dtype.element_ty), mask=live)
    tl.store(sorted_row + i, row.to(sorted_row.dtype.element_ty), mask=live)

    busy = (s < slots) & (count > 0)
    place = tl.cumsum(busy.to(tl.int32), 0) - 1
    tl.store(groups + place, s, mask=busy)
    tl.store(groups + s, -1, mask=(s > tl.max(place, 0)) & (s < num_groups))


@triton.jit
def _dispatch_fused(
    logits,
    l2p,
    replica_count,
    valid,
    bias,
    weights,
    physical,
    rows,
    ends,
    sorted_row,
    groups,
    buckets,
    cursors,
    num_groups,
    num_tokens,
    num_experts,
    stride_logits,
    max_replicas,
    slot_start,
    slots,
    scale,
    TOP_K: tl.constexpr,
    NORM_TOPK: tl.constexpr,
    HAS_VALID: tl.constexpr,
    GROUPED: tl.constexpr,
    SIGMOID: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    TOPK_GROUPS: tl.constexpr,
    BT: tl.constexpr,
    EP: tl.constexpr,
    KP: tl.constexpr,
    GP: tl.constexpr,
    BLOCK: tl.constexpr,
    SP: tl.constexpr,
):
    for t0 in range(0, num_tokens, BT):
        _route_block(
            t0,
            logits,
            l2p,
            replica_count,
            valid,
            bias,
            weights,
            physical,
            buckets,
            num_tokens,
            num_experts,
            stride_logits,
            max_replicas,
            slot_start,
            slots,
            scale,
            TOP_K,
            NORM_TOPK,
            HAS_VALID,
            GROUPED,
            SIGMOID,
            NUM_GROUPS,
            TOPK_GROUPS,
            BT,
            EP,
            KP,
            GP,
        )
    tl.debug_barrier()
    _group(buckets, cursors, rows, ends, sorted_row, groups, num_tokens * TOP_K, num_groups, slots, TOP_K, BLOCK, SP)


@triton.jit
def _route(
    logits,
    l2p,
    replica_count,
    valid,
    bias,
    weights,
    physical,
    buckets,
    num_tokens,
    num_experts,
    stride_logits,
    max_replicas,
    slot_start,
    slots,
    scale,
    TOP_K: tl.constexpr,
    NORM_TOPK: tl.constexpr,
    HAS_VALID: tl.constexpr,
    GROUPED: tl.constexpr,
    SIGMOID: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    TOPK_GROUPS: tl.constexpr,
    BT: tl.constexpr,
    EP: tl.constexpr,
    KP: tl.constexpr,
    GP: tl.constexpr,
):
    _route_block(
        tl.program_id(0) * BT,
        logits,
        l2p,
        replica_count,
        valid,
        bias,
        weights,
        physical,
        buckets,
        num_tokens,
        num_experts,
        stride_logits,
        max_replicas,
        slot_start,
        slots,
        scale,
        TOP_K,
        NORM_TOPK,
        HAS_VALID,
        GROUPED,
        SIGMOID,
        NUM_GROUPS,
        TOPK_GROUPS,
        BT,
        EP,
        KP,
        GP,
    )


@triton.jit
def _group_kernel(
    buckets,
    cursors,
    rows,
    ends,
    sorted_row,
    groups,
    num_choices,
    num_groups,
    slots,
    TOP_K: tl.constexpr,
    BLOCK: tl.constexpr,
    SP: tl.constexpr,
):
    _group(buckets, cursors, rows, ends, sorted_row, groups, num_choices, num_groups, slots, TOP_K, BLOCK, SP)


def route_block_tokens(num_tokens: int, padded_experts: int) -> int:
    """Tokens a routing program takes. Fused: at most 4096 logits a block (DeepSeek-V3's 256
    experts spilled registers at 32 tokens, sm_90). In a grid of its own: ROUTE_BLOCK_TOKENS,
    many programs of few rows (each top-k pass is a reduction over its whole block)."""
    if num_tokens > FUSED_MAX_TOKENS:
        return ROUTE_BLOCK_TOKENS
    return min(FUSED_MAX_TOKENS, max(16, triton.next_power_of_2(num_tokens)), max(8, 4096 // padded_experts))


def dispatch(
    logits: torch.Tensor,
    top_k: int,
    *,
    norm_topk_prob: bool,
    grouped: GroupedTopK | None,
    correction_bias: torch.Tensor | None,
    logical_to_physical: torch.Tensor,
    replica_count: torch.Tensor,
    slot_start: int,
    slots: int,
    valid: torch.Tensor | None,
):
    """Arguments as raymoe.actors.models.moe_dispatch.dispatch; returns the Dispatch fields."""
    n, num_experts = logits.shape
    num_choices = n * top_k
    assert logits.stride(1) == 1 and logical_to_physical.is_contiguous() and replica_count.is_contiguous()
    assert num_choices <= 4096, "the grouping holds every choice in one program's registers"
    dev = logits.device
    weights = torch.empty(n, top_k, dtype=logits.dtype, device=dev)
    physical = torch.empty(n, top_k, dtype=torch.int64, device=dev)
    rows = torch.empty(num_choices, dtype=torch.int32, device=dev)
    ends = torch.empty(slots, dtype=torch.int32, device=dev)
    sorted_row = torch.empty(n, top_k, dtype=torch.int64, device=dev)
    groups = torch.empty(min(slots, num_choices), dtype=torch.int32, device=dev)
    block = max(16, triton.next_power_of_2(num_choices))
    buckets = torch.empty(block, dtype=torch.int32, device=dev)
    sp = max(16, triton.next_power_of_2(slots + 1))
    cursors = torch.empty(sp, dtype=torch.int32, device=dev)
    ep = max(16, triton.next_power_of_2(num_experts))
    bt = route_block_tokens(n, ep)
    placeholder = physical  # for the pointers a variant does not read
    route = (
        logits,
        logical_to_physical,
        replica_count,
        valid if valid is not None else placeholder,
        correction_bias if correction_bias is not None else placeholder,
        weights,
        physical,
    )
    # the plain rule passes this one group of softmax scores, which the kernel never reads
    rule = grouped or GroupedTopK(num_groups=1, topk_groups=1, routed_scaling_factor=1.0, scoring="softmax")
    sizes = (n, num_experts, logits.stride(0), logical_to_physical.shape[1], slot_start, slots)
    sizes += (rule.routed_scaling_factor,)
    route_meta = dict(
        TOP_K=top_k,
        NORM_TOPK=norm_topk_prob,
        HAS_VALID=valid is not None,
        GROUPED=grouped is not None,
        SIGMOID=rule.scoring == "sigmoid",
        NUM_GROUPS=rule.num_groups,
        TOPK_GROUPS=rule.topk_groups,
        BT=bt,
        EP=ep,
        KP=max(2, triton.next_power_of_2(top_k)),
        GP=max(2, triton.next_power_of_2(rule.num_groups)),
    )
    group_meta = dict(BLOCK=block, SP=sp, num_warps=8 if block >= 2048 else 4)
    if n <= FUSED_MAX_TOKENS:
        _dispatch_fused[(1,)](
            *route,
            rows,
            ends,
            sorted_row,
            groups,
            buckets,
            cursors,
            groups.shape[0],
            *sizes,
            **route_meta,
            **group_meta,
        )
    else:
        _route[(triton.cdiv(n, bt),)](*route, buckets, *sizes, **route_meta)
        _group_kernel[(1,)](
            buckets,
            cursors,
            rows,
            ends,
            sorted_row,
            groups,
            num_choices,
            groups.shape[0],
            slots,
            TOP_K=top_k,
            **group_meta,
        )
    return weights, physical, rows, ends, sorted_row, groups
