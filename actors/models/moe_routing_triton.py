"""The routing rules of one block of tokens in Triton, for the dispatch's kernels
(moe_dispatch_triton.py): plain top-k with its softmax, and moe_routing.py's group-limited
rules. Imported only when Triton is."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def softmax_top_k(
    v, live_t, col, kcol, TOP_K: tl.constexpr, NORM_TOPK: tl.constexpr, BT: tl.constexpr, KP: tl.constexpr
):
    """Plain routing of the logits v [BT, EP] -> (expert ids, weights) [BT, KP]: the top-k
    logits, weighted by their softmax (NORM_TOPK) or by the softmax over every expert."""
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
    return top_i, p


@triton.jit
def grouped_top_k(
    v,
    live_t,
    col,
    kcol,
    bias,
    num_experts,
    scale,
    TOP_K: tl.constexpr,
    NORM_TOPK: tl.constexpr,
    SIGMOID: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    TOPK_GROUPS: tl.constexpr,
    BT: tl.constexpr,
    KP: tl.constexpr,
    GP: tl.constexpr,
):
    """Group-limited routing of the logits v [BT, EP] (moe_routing.py's rules) -> (expert ids,
    weights) [BT, KP], in descending order of the scores that choose."""
    real = col[None, :] < num_experts
    if SIGMOID:
        scores = tl.sigmoid(v)
        choosing = scores + tl.load(bias + col, mask=col < num_experts, other=0.0)[None, :]
    else:
        row_max = tl.where(live_t, tl.max(v, 1), 0.0)
        e = tl.exp(v - row_max[:, None])
        scores = e / tl.sum(e, 1)[:, None]
        choosing = scores
    choosing = tl.where(real, choosing, float("-inf"))
    if TOPK_GROUPS < NUM_GROUPS:
        group = col // (num_experts // NUM_GROUPS)
        gcol = tl.arange(0, GP)
        group_score = tl.full((BT, GP), float("-inf"), tl.float32)
        for g in tl.static_range(NUM_GROUPS):
            in_group = tl.where(group[None, :] == g, choosing, float("-inf"))
            if SIGMOID:  # the sum of the group's two best
                first, at = tl.max(in_group, 1, return_indices=True)
                score = first + tl.max(tl.where(col[None, :] == at[:, None], float("-inf"), in_group), 1)
            else:  # the group's best
                score = tl.max(in_group, 1)
            group_score = tl.where(gcol[None, :] == g, score[:, None], group_score)
        kept = tl.zeros_like(choosing)
        for _ in tl.static_range(TOPK_GROUPS):
            best = tl.argmax(group_score, 1)
            kept = tl.where(group[None, :] == best[:, None], 1.0, kept)
            group_score = tl.where(gcol[None, :] == best[:, None], float("-inf"), group_score)
        choosing = tl.where(kept != 0, choosing, float("-inf"))
    top_w = tl.zeros((BT, KP), tl.float32)
    top_i = tl.zeros((BT, KP), tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.argmax(choosing, 1)
        chosen = col[None, :] == best[:, None]
        top_w = tl.where(kcol[None, :] == j, tl.sum(tl.where(chosen, scores, 0.0), 1)[:, None], top_w)
        top_i = tl.where(kcol[None, :] == j, best[:, None], top_i)
        choosing = tl.where(chosen, float("-inf"), choosing)
    if NORM_TOPK:
        top_w = top_w / (tl.sum(top_w, 1)[:, None] + 1e-20)
    return top_i, top_w * scale
