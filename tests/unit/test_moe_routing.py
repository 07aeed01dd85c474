"""Group-limited routing against transformers' routers: the sigmoid rule (DeepSeek-V3's,
GLM-4.5's) against Glm4MoeTopkRouter, the softmax rule against DeepseekV2TopkRouter (its
greedy and group_limited_greedy methods): the same experts and weights for every token."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_zoo import hf_config

from raymoe.actors.models.moe_routing import grouped_top_k
from raymoe.actors.models.spec import GroupedTopK


@pytest.mark.parametrize(
    "experts,groups,topk_groups,top_k,norm,scale",
    [(8, 4, 2, 3, True, 2.5), (16, 4, 1, 4, False, 1.0), (12, 1, 1, 5, True, 1.0), (32, 8, 3, 6, True, 1.8)],
)
def test_grouped_top_k_equals_transformers(experts, groups, topk_groups, top_k, norm, scale):
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

    weights, ids = grouped_top_k(
        F.linear(x, router.weight), router.e_score_correction_bias, top_k=top_k, norm_topk_prob=norm, rule=rule
    )
    _assert_same_choices(weights, ids, want_weights, want_ids)


@pytest.mark.parametrize(
    "experts,method,groups,topk_groups,top_k,scale",
    [
        (8, "greedy", None, None, 2, 1.0),
        (16, "group_limited_greedy", 4, 2, 3, 16.0),
        (12, "greedy", None, None, 5, 2.0),
        (6, "group_limited_greedy", 6, 3, 2, 1.0),  # groups of one expert: each scores by its own (was refused)
    ],
)
def test_softmax_group_limited_top_k_equals_transformers(experts, method, groups, topk_groups, top_k, scale):
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    from raymoe.actors.models.spec import spec_from_hf_config

    config = hf_config(
        "deepseek_v2",
        n_routed_experts=experts,
        topk_method=method,
        n_group=groups,
        topk_group=topk_groups,
        num_experts_per_tok=top_k,
        routed_scaling_factor=scale,
    )
    cfg = dict(config.to_dict(), architectures=["DeepseekV2ForCausalLM"])
    rule = spec_from_hf_config(cfg).moe.grouped
    g = torch.Generator().manual_seed(experts + top_k)
    router = DeepseekV2TopkRouter(config)
    with torch.no_grad():
        router.weight.normal_(0, 0.3, generator=g)
    x = torch.randn(40, config.hidden_size, generator=g)
    _, want_weights, want_ids = router(x)

    weights, ids = grouped_top_k(F.linear(x, router.weight), None, top_k=top_k, norm_topk_prob=False, rule=rule)
    _assert_same_choices(weights, ids, want_weights, want_ids)


def _assert_same_choices(weights, ids, want_weights, want_ids):
    # the choices' order is torch.topk's unsorted order on both sides: compare them sorted by expert
    ids, order = ids.sort(dim=-1)
    want_ids, want_order = want_ids.sort(dim=-1)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights.gather(1, order), want_weights.gather(1, want_order), rtol=0, atol=0)
