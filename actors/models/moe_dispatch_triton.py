"""The MoE dispatch in one Triton program (see moe_dispatch.py for what it computes).

One program does it all, so the phases meet at barriers rather than kernel bounds:
1. per block of tokens: top-k of the router logits, their softmax, the replica pick
   and this rank's bucket of each choice (another rank's or an invalid choice: the
   bucket past the last slot);
2. a stable sort of all choices by bucket (key = bucket * BLOCK + choice index) in
   registers, giving each sorted row's token and each choice's sorted row;
3. group ends by an upper-bound binary search over the sorted buckets.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dispatch(logits, l2p, replica_count, valid, weights, physical, rows, ends, sorted_row, scratch,
              num_tokens, num_experts, stride_logits, max_replicas, slot_start, slots,
              TOP_K: tl.constexpr, NORM_TOPK: tl.constexpr, HAS_VALID: tl.constexpr, BT: tl.constexpr,
              EP: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr, SP: tl.constexpr, STEPS: tl.constexpr):  # fmt: skip
    col = tl.arange(0, EP)
    kcol = tl.arange(0, KP)
    for t0 in range(0, num_tokens, BT):
        t = t0 + tl.arange(0, BT)
        live_t = t < num_tokens
        v = tl.load(logits + t[:, None] * stride_logits + col[None, :],
                    mask=live_t[:, None] & (col[None, :] < num_experts), other=float("-inf")).to(tl.float32)  # fmt: skip
        row_max = tl.where(live_t, tl.max(v, 1), 0.0)  # 0 for padding tokens: no inf - inf
        denom = tl.sum(tl.exp(v - row_max[:, None]), 1)
        top_v = tl.full((BT, KP), float("-inf"), tl.float32)
        top_i = tl.zeros((BT, KP), tl.int32)
        for j in tl.static_range(TOP_K):
            top, best = tl.max(v, 1, return_indices=True)  # ties: the lowest expert id
            top_v = tl.where(kcol[None, :] == j, top[:, None], top_v)
            top_i = tl.where(kcol[None, :] == j, best[:, None], top_i)
            v = tl.where(col[None, :] == best[:, None], float("-inf"), v)
        if NORM_TOPK:  # softmax over the k chosen logits
            p = tl.exp(top_v - row_max[:, None])
            p = p / tl.sum(p, 1)[:, None]
        else:  # the chosen experts' probabilities of the softmax over all experts
            p = tl.exp(top_v - row_max[:, None]) / denom[:, None]
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
        tl.store(scratch + choice, bucket.to(tl.int32), mask=chosen)
    tl.debug_barrier()

    i = tl.arange(0, BLOCK)
    num_choices = num_tokens * TOP_K
    live = i < num_choices
    bucket = tl.load(scratch + i, mask=live, other=0)
    key = tl.sort(tl.where(live, bucket * BLOCK + i, 0x7FFFFFFF))  # padding lanes sort last
    order = key % BLOCK
    tl.debug_barrier()  # every lane has read scratch before it is overwritten
    tl.store(rows + i, (order // TOP_K).to(rows.dtype.element_ty), mask=live)
    tl.store(sorted_row + order, i.to(sorted_row.dtype.element_ty), mask=live)
    tl.store(scratch + i, key // BLOCK, mask=live)
    tl.debug_barrier()

    s = tl.arange(0, SP)
    lo = tl.zeros((SP,), tl.int32)
    hi = tl.zeros((SP,), tl.int32) + num_choices
    for _ in tl.static_range(STEPS):  # ends[s] = first sorted row whose bucket is > s
        mid = (lo + hi) // 2
        searching = lo < hi
        above = tl.load(scratch + mid, mask=searching, other=0) > s
        lo = tl.where(searching & ~above, mid + 1, lo)
        hi = tl.where(searching & above, mid, hi)
    tl.store(ends + s, lo, mask=s < slots)


def dispatch(logits: torch.Tensor, top_k: int, norm_topk_prob: bool, logical_to_physical: torch.Tensor,
             replica_count: torch.Tensor, slot_start: int, slots: int, valid: torch.Tensor | None):  # fmt: skip
    """Arguments as raymoe.actors.models.moe_dispatch.dispatch; returns the Dispatch fields."""
    n, num_experts = logits.shape
    num_choices = n * top_k
    assert logits.stride(1) == 1 and logical_to_physical.is_contiguous() and replica_count.is_contiguous()
    assert slots < 2**15 and num_choices <= 4096, "keys are bucket * BLOCK + index in int32"
    dev = logits.device
    weights = torch.empty(n, top_k, dtype=logits.dtype, device=dev)
    physical = torch.empty(n, top_k, dtype=torch.int64, device=dev)
    rows = torch.empty(num_choices, dtype=torch.int32, device=dev)
    ends = torch.empty(slots, dtype=torch.int32, device=dev)
    sorted_row = torch.empty(n, top_k, dtype=torch.int64, device=dev)
    block = max(16, triton.next_power_of_2(num_choices))
    scratch = torch.empty(block, dtype=torch.int32, device=dev)
    _dispatch[(1,)](
        logits, logical_to_physical, replica_count, valid if valid is not None else physical,
        weights, physical, rows, ends, sorted_row, scratch,
        n, num_experts, logits.stride(0), logical_to_physical.shape[1], slot_start, slots,
        TOP_K=top_k, NORM_TOPK=norm_topk_prob, HAS_VALID=valid is not None,
        BT=min(32, max(16, triton.next_power_of_2(n))), EP=max(16, triton.next_power_of_2(num_experts)),
        KP=max(2, triton.next_power_of_2(top_k)), BLOCK=block, SP=max(16, triton.next_power_of_2(slots)),
        STEPS=block.bit_length(), num_warps=8 if block >= 2048 else 4,
    )  # fmt: skip
    return weights, physical, rows, ends, sorted_row
