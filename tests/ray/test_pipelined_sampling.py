"""Pipelined steps through the rank actors give the same outputs as one step at a time for
every sampling feature: grammars (whose masks reach the ranks a call after the step when
the last token is pending), penalties with logprobs, seeded top-k / top-p draws; at tp=2
(both ranks sample) and dp=2 (each replica its own masks)."""

from __future__ import annotations

import json

import pytest

from raymoe.actors.engine.grammar import GrammarSpec
from raymoe.cluster.config import config_from_dict
from raymoe.deploy import LLM, SamplingParams


def _requests() -> tuple[list[str], list[SamplingParams]]:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}}
    params = [
        SamplingParams(max_tokens=24, temperature=0.0, grammar=GrammarSpec("regex", "[a-z ]{500}")),
        SamplingParams(max_tokens=40, temperature=0.8, seed=4, grammar=GrammarSpec("json", json.dumps(schema))),
        SamplingParams(
            max_tokens=20, temperature=0.0, ignore_eos=True, presence_penalty=0.7, repetition_penalty=1.3, logprobs=3
        ),
        SamplingParams(max_tokens=20, temperature=0.9, top_k=20, top_p=0.8, seed=9, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
    ]
    prompts = ["Hello world", "Give me JSON", "repeat repeat repeat", "once upon", "abc " * 10]
    return prompts, params


@pytest.mark.parametrize("tp,dp,ep", [(2, 1, 1), (1, 2, 2)], ids=["tp2", "dp2-ep2"])
def test_pipelined_equals_one_step_at_a_time(ray_session, tp, dp, ep):
    prompts, params = _requests()
    outputs = {}
    for pipelined in (False, True):
        config = config_from_dict(
            {
                "model": {"dtype": "float32"},
                "parallel": {"tp": tp, "dp": dp, "ep": ep},
                "engine": {"num_kv_blocks": 128, "pipelined_steps": pipelined},
            }
        )
        with LLM(config) as llm:
            outputs[pipelined] = llm.generate(prompts, params)
    for plain, piped in zip(outputs[False], outputs[True]):
        assert piped.token_ids == plain.token_ids and piped.finish_reason == plain.finish_reason
    assert len(outputs[True][0].token_ids) == 24  # the endless regex ran to max_tokens
    assert outputs[True][0].text.replace(" ", "").isalpha()
    if outputs[True][1].finish_reason == "stop":
        assert isinstance(json.loads(outputs[True][1].text), dict)
