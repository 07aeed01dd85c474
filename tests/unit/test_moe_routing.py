"""Grouped sigmoid top-k routing (DeepSeek-V3's rule, GLM-4.5's router) against
transformers' Glm4MoeTopkRouter: the same experts and weights for every token."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_zoo import hf_config

from raymoe.actors.models.moe_routing import grouped_sigmoid_top_k
from raymoe.actors.models.spec import GroupedTopK


@pytest.mark.parametrize(
    "experts,groups,topk_groups,top_k,norm,scale",
    [(8, 4, 2, 3, True, 2.5), (16, 4, 1, 4, False, 1.0), (12, 1, 1, 5, True, 1.0), (32, 8, 3, 6, True, 1.8)],
)
def test_grouped_sigmoid_top_k_equals_transformers(experts, groups, topk_groups, top_k, norm, scale):
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

    rule = GroupedTopK(num_groups=groups, topk_groups=topk_groups, routed_scaling_factor=scale)
    config = hf_config(
        "glm4_moe",
        n_routed_experts=experts,
        n_group=groups,
        topk_group=topk_groups,
        num_experts_per_tok=top_k,
        norm_topk_prob=norm,
        routed_scaling_factor=scale,
    )
    g = torch.Generator().manual_seed(experts + top_k)
    router = Glm4MoeTopkRouter(config)
    with torch.no_grad():
        router.weight.normal_(0, 0.3, generator=g)
        router.e_score_correction_bias.normal_(0, 0.2, generator=g)
    x = torch.randn(40, config.hidden_size, generator=g)
    _, want_weights, want_ids = router(x)

    weights, ids = grouped_sigmoid_top_k(
        F.linear(x, router.weight), router.e_score_correction_bias, top_k=top_k, norm_topk_prob=norm, rule=rule
    )
    # the choices' order is torch.topk's unsorted order on both sides: compare them sorted by expert
    ids, order = ids.sort(dim=-1)
    want_ids, want_order = want_ids.sort(dim=-1)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights.gather(1, order), want_weights.gather(1, want_order), rtol=0, atol=0)
