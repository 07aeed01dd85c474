"""Compiling the step kernels before serving (``ModelRunner.compile_step_kernels``, run at
start-up on GPUs): eager steps of every warm-up size run on every rank of tp and dp/ep
layouts in lockstep, write only the scratch block (outputs unchanged), and record no expert
load for EPLB."""

from __future__ import annotations

import sys

import pytest
import ray
import torch

from raymoe.actors.engine.step import warmup_token_counts
from raymoe.cluster.config import config_from_dict
from raymoe.deploy import LLM, SamplingParams

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _warm_up(ctx) -> tuple[int, int]:
    runner = ctx.state["runner"]
    before = int(runner.expert_load.counts.sum()) if runner.expert_load is not None else 0
    steps = runner.compile_step_kernels()
    after = int(runner.expert_load.counts.sum()) if runner.expert_load is not None else 0
    return steps, after - before


def test_warmup_sizes_cover_each_power_of_two_and_one_past():
    assert warmup_token_counts(40) == [1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 40]
    assert warmup_token_counts(1) == [1]


@pytest.mark.parametrize("tp,dp,ep", [(2, 1, 1), (1, 2, 2)], ids=["tp2", "dp2-ep2"])
def test_warmup_leaves_outputs_and_expert_load_alone(ray_session, tp, dp, ep):
    config = config_from_dict(
        {
            "model": {"dtype": "float32"},
            "parallel": {"tp": tp, "dp": dp, "ep": ep},
            "engine": {"num_kv_blocks": 64, "max_num_batched_tokens": 96},
            "eplb": {"enabled": ep > 1, "rebalance_every_steps": 10**6},
        }
    )
    prompts = ["Hello world", "abc " * 12]
    sampling = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    with LLM(config, collect_logits=True) as llm:
        before = llm.generate(prompts, sampling)
        results = ray.get(llm.controller.run_on_ranks.remote(_warm_up))
        after = llm.generate(prompts, sampling)
    assert results == [(len(warmup_token_counts(96)), 0)] * (tp * dp)
    for b, a in zip(before, after):
        assert b.token_ids == a.token_ids
        rb, ra = torch.stack(b.logits), torch.stack(a.logits)  # the second run reads the prefix cache
        assert ((ra - rb).norm() / rb.norm()).item() < 1e-5
