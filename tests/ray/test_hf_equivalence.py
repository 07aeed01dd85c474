"""raymoe's greedy output and logits equal Hugging Face transformers on the same weights,
for MoE and dense architectures and every (tp, ep) layout, with mixed prompt lengths
(the long ones prefilled in chunks), computed and again from the prefix cache."""

from __future__ import annotations

import random
import sys

import pytest
import ray
import torch
from model_zoo import fp8_rounded_kv_attention, hf_greedy, write_checkpoint

from raymoe.cluster.config import Config, config_from_dict
from raymoe.deploy import LLM, SamplingParams

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

NEW_TOKENS = 32
# (tp, ep); the world is tp * dp with dp = ep / tp when ep exceeds tp (data-parallel attention)
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2), (1, 4)]
# Qwen3-MoE at every layout; Mixtral (its checkpoint names, softmax top-2) at one per kind of
# split (none, tp with dp attention, ep past tp); dense Qwen3 where ep only adds dp replicas, up to 2
CASES = (
    [("qwen3_moe", tp, ep) for tp, ep in LAYOUTS]
    + [("mixtral", tp, ep) for tp, ep in [(1, 1), (2, 2), (1, 4)]]
    + [("qwen3", tp, ep) for tp, ep in [(1, 1), (2, 1), (1, 2), (2, 2)]]
)
# Qwen2-MoE (a gated shared expert), GLM-4.5-MoE (grouped sigmoid routing, shared experts,
# partial rotary), Qwen3-MoE with YaRN (prompts past its 64-token original context) and
# DeepSeek-V3 / V2-Lite (latent attention, YaRN mscale, their routings): each unsplit; Qwen2-MoE,
# GLM-4.5 and V3 at (tp, dp, ep) = (2,2,4) too, V2-Lite at (1,2,2); the context-parallel cases
# below add tp 2 with dp 1 (GLM-4.5) and cp layouts
NEW_CASES = [
    ("qwen2_moe", 1, 1),
    ("glm4_moe", 1, 1),
    ("qwen3_moe_yarn", 1, 1),
    ("qwen2_moe", 2, 4),
    ("glm4_moe", 2, 4),
    ("deepseek_v3", 1, 1),
    ("deepseek_v2", 1, 1),
    ("deepseek_v2", 1, 2),
    ("deepseek_v3", 2, 4),
]


def _prompts() -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in (5, 37, 1, 70, 12)]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """kind -> (checkpoint, transformers' greedy tokens and logits), each made on first use."""
    root = tmp_path_factory.mktemp("checkpoints")
    made = {}

    def reference(kind: str):
        if kind not in made:
            path = write_checkpoint(kind, root / kind)
            made[kind] = (path, hf_greedy(path, _prompts(), NEW_TOKENS))
        return made[kind]

    return reference


def _config(path, tp: int, ep: int, pipelined: bool = False, cp: int = 1, dp: int = 0, kv: str = "auto") -> Config:
    """dp = 0: ep / tp when ep exceeds tp (data-parallel attention), else 1. ``kv``:
    engine.kv_cache_dtype."""
    return config_from_dict(
        {
            "model": {"path": str(path), "dtype": "float32"},
            "parallel": {
                "tp": tp,
                "cp": cp,
                "dp": dp or max(1, ep // tp),
                "ep": ep,
                "device": "cpu",
                "nodes": 2 if tp * cp * (dp or max(1, ep // tp)) > 4 else 1,
            },
            # a small token budget forces chunked prefill of the long prompts
            "engine": {
                "block_size": 8,
                "num_kv_blocks": 128,
                "max_num_batched_tokens": 48,
                "pipelined_steps": pipelined,
                "kv_cache_dtype": kv,
            },
        }
    )


@pytest.mark.parametrize("kind,tp,ep", CASES, ids=[f"{k}-tp{t}-ep{e}" for k, t, e in CASES])
def test_equal_to_transformers(ray_session, references, kind, tp, ep):
    _check(references, kind, tp, ep, pipelined=False)


@pytest.mark.parametrize("kind,tp,ep", NEW_CASES, ids=[f"{k}-tp{t}-dp{max(1, e // t)}-ep{e}" for k, t, e in NEW_CASES])
def test_new_architectures_equal_to_transformers(ray_session, references, kind, tp, ep):
    _check(references, kind, tp, ep, pipelined=False)


def test_pipelined_steps_equal_to_transformers(ray_session, references):
    """Steps kept in flight (the GPU default, forced on here): two replicas of two
    attention ranks each, so pending tokens come from each replica's own last sampling
    and the ranks that do not report keep theirs too; long prompts are chunked."""
    _check(references, "qwen3_moe", tp=2, ep=4, pipelined=True)


def _kv_slots_per_block(ctx) -> int:
    runner = ctx.state["runner"]
    return runner.attention.kv_cache.shape[2 if runner.spec.mla is not None else 3]


def _check(
    references, kind: str, tp: int, ep: int, pipelined: bool, cp: int = 1, dp: int = 0, kv: str = "auto"
) -> None:
    sampling = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    path, expected = references(kind)
    with LLM(_config(path, tp, ep, pipelined, cp=cp, dp=dp, kv=kv), collect_logits=True) as llm:
        # with cp, each rank's cache holds block_size / cp slots of every block
        assert set(ray.get(llm.controller.run_on_ranks.remote(_kv_slots_per_block))) == {8 // cp}
        outputs = llm.generate(_prompts(), sampling)
        # again: each prompt's full blocks now come from the prefix cache (on its DP replica)
        again = llm.generate(_prompts(), sampling)
    assert [o.num_cached_tokens for o in outputs] == [0] * len(outputs)
    assert [o.num_cached_tokens for o in again] == [(len(p) - 1) // 8 * 8 for p in _prompts()]
    for run in (outputs, again):
        for i, (out, (ref_tokens, ref_logits)) in enumerate(zip(run, expected)):
            assert out.token_ids == ref_tokens, f"{kind} tp={tp} ep={ep} prompt {i}: tokens differ"
            ours = torch.stack(out.logits)
            err = ((ours - ref_logits).norm() / ref_logits.norm()).item()
            assert err < 1e-3, f"{kind} tp={tp} ep={ep} prompt {i}: logits rel. error {err:.2e}"


# context parallelism: (kind, tp, cp, dp, ep); block_size 8, so a cp rank holds 8 / cp slots
# of every block and the long prompts span many blocks per cp rank; chunked prefill as above.
# The test cluster's two nodes have 4 CPUs each: cp 4 x tp 2 spans both (parallel.nodes 2)
CP_CASES = [
    ("qwen3_moe", 1, 2, 1, 2),
    ("qwen3_moe", 1, 4, 1, 4),
    ("qwen2_moe", 1, 4, 1, 2),
    ("deepseek_v3", 1, 2, 2, 4),
    ("glm4_moe", 2, 2, 1, 2),
    ("qwen3_moe", 2, 4, 1, 8),
]


@pytest.mark.parametrize(
    "kind,tp,cp,dp,ep", CP_CASES, ids=[f"{k}-tp{t}-cp{c}-dp{d}-ep{e}" for k, t, c, d, e in CP_CASES]
)
def test_context_parallel_equal_to_transformers(ray_session, references, kind, tp, cp, dp, ep):
    """Each cp rank holds 1/cp of every sequence's KV and attends to it; the partial
    attentions merge over the cp group."""
    _check(references, kind, tp, ep, pipelined=False, cp=cp, dp=dp)


@pytest.fixture(scope="module")
def fp8_kv_references(tmp_path_factory):
    """kind -> (checkpoint, transformers' greedy tokens and logits with its keys and values
    rounded as an FP8 KV cache stores them)."""
    root = tmp_path_factory.mktemp("fp8-kv")
    made = {}

    def reference(kind: str):
        if kind not in made:
            path = write_checkpoint(kind, root / kind)
            made[kind] = (path, hf_greedy(path, _prompts(), NEW_TOKENS, attn_implementation=fp8_rounded_kv_attention()))
        return made[kind]

    return reference


def test_fp8_kv_cache_over_tp_and_cp_equals_transformers_on_rounded_kv(ray_session, fp8_kv_references):
    """engine.kv_cache_dtype: fp8 with the KV heads split over tp 2 and every block over cp 2
    (each cp rank's partial attention over its half of the rounded keys), experts over ep 4."""
    _check(fp8_kv_references, "qwen3_moe", tp=2, ep=4, pipelined=False, cp=2, dp=1, kv="fp8")


def test_context_parallel_needs_a_block_size_it_divides():
    with pytest.raises(ValueError, match="engine.block_size"):
        config_from_dict({"parallel": {"cp": 3}, "engine": {"block_size": 16}})


def test_offline_prompt_logprobs_equal_transformers_log_softmax(ray_session, references):
    """The offline LLM's prompt_logprobs (and logprobs) per position, a long prompt prefilled in
    chunks: transformers' log-softmax of the logits before each token, and its argmax first."""
    import transformers

    path, _ = references("qwen3_moe")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [_prompts()[1], _prompts()[3]]  # 37 and 70 tokens
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=2, logprobs=1)
    with LLM(_config(path, 1, 1)) as llm:
        outs = llm.generate(prompts, params)
    for ids, out in zip(prompts, outs):
        with torch.no_grad():
            logprobs = model(torch.tensor([ids + out.token_ids])).logits[0].log_softmax(-1)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
        for i, entry in enumerate(out.prompt_logprobs[1:] + out.logprobs, start=1):
            token = (ids + out.token_ids)[i]
            assert entry.token_id == token and abs(entry.logprob - logprobs[i - 1, token].item()) < 1e-4
            assert len(entry.top) == (2 if i < len(ids) else 1) and entry.top[0][0] == int(logprobs[i - 1].argmax())
