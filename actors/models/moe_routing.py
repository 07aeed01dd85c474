"""Group-limited top-k routing: DeepSeek-V3's sigmoid rule (GLM-4.5 shares it) and
DeepSeek-V2's softmax rule.

Sigmoid: each token scores every expert with a sigmoid of its router logit. The choice adds a
per-expert correction bias (learned for load balance, not for weighting): experts are
split into ``num_groups`` equal groups, each group is ranked by the sum of its two best
biased scores, only the ``topk_groups`` best groups stay, and the top-k biased scores
among their experts are the choices. The weights are the chosen experts' unbiased
sigmoid scores, renormalised to sum to 1 if ``norm_topk_prob``, times
``routed_scaling_factor``.

Softmax: the scores are a softmax over every expert, groups rank by their best score,
there is no bias, and the chosen scores times ``routed_scaling_factor`` are the weights
(one group of every expert: plain top-k).

This is the torch path (the reference, CPU, large batches); moe_dispatch_triton.py
computes the same in its routing kernel.
"""

from __future__ import annotations

import torch

from raymoe.actors.models.spec import GroupedTopK


def grouped_top_k(
    logits: torch.Tensor,
    correction_bias: torch.Tensor | None,
    *,
    top_k: int,
    norm_topk_prob: bool,
    rule: GroupedTopK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, E] float32; correction_bias [E] float32 (sigmoid rule only) -> (weights
    [N, top_k] float32, logical expert ids [N, top_k] int64), in torch.topk's unsorted
    order, as transformers' routers (the Triton kernel's are in descending order)."""
    n, num_experts = logits.shape
    if rule.scoring == "softmax":
        scores = biased = logits.softmax(dim=-1)
        group_scores = scores.view(n, rule.num_groups, -1).amax(dim=-1)
    else:
        scores = logits.sigmoid()
        biased = scores + correction_bias
        group_scores = biased.view(n, rule.num_groups, -1).topk(2, dim=-1).values.sum(dim=-1)
    best_groups = group_scores.topk(rule.topk_groups, dim=-1, sorted=False).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
    keep = keep.unsqueeze(-1).expand(n, rule.num_groups, num_experts // rule.num_groups).reshape(n, num_experts)
    logical = biased.masked_fill(~keep, float("-inf")).topk(top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, logical)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * rule.routed_scaling_factor, logical
