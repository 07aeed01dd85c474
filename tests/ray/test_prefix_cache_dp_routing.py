"""Prefix caching over Ray with dp = 2: two interleaved groups of requests with two different
300-token prefixes each land on one replica, and reuse the prefix (hit rate >= 90 % after
the first request of each group); outputs equal a run with caching off."""

from __future__ import annotations

import random

import ray

from raymoe.cluster.config import config_from_dict
from raymoe.deploy import LLM, SamplingParams


def _config(prefix_caching: bool):
    return config_from_dict(
        {
            "model": {"dtype": "float32"},
            "parallel": {"tp": 1, "dp": 2, "ep": 2},
            "engine": {"num_kv_blocks": 256, "prefix_caching": prefix_caching},
        }
    )


def test_dp2_routes_each_prefix_to_one_replica_and_reuses_it(ray_session):
    rng = random.Random(0)
    prefixes = [[rng.randrange(3, 400) for _ in range(300)] for _ in range(2)]
    prompts = [prefixes[i % 2] + [rng.randrange(3, 400) for _ in range(12)] for i in range(12)]
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    with LLM(_config(True)) as llm:
        on = [c.token_ids for c in llm.generate(prompts, greedy)]
        stats = ray.get(llm.controller.stats.remote())
    with LLM(_config(False)) as llm:
        off = [c.token_ids for c in llm.generate(prompts, greedy)]
    assert on == off
    # each replica started one group: 6 requests of 312 tokens
    assert sorted(stats.prefix_cache_query_tokens) == [6 * 312, 6 * 312]
    reusable = 10 * (300 // 16) * 16  # every request but each group's first: 18 full blocks of 16
    assert sum(stats.prefix_cache_hit_tokens) >= 0.9 * reusable, stats
