"""Logprobs and logit controls, in process with the built-in model (float32).

Logprobs are log_softmax of the engine's own float32 logits (collect_logits) within 1e-4
and match transformers' on the same checkpoint; prompt logprobs survive chunked prefill
and preemption; the penalties match a reference written from their definitions; a step
in which no request asks for any of this takes the unchanged path."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_engine_local import _engine, _pipelined, _spy_pending

from raymoe.actors.engine import sampler
from raymoe.actors.engine.local import build_local_engine
from raymoe.actors.engine.request import PENDING_TOKEN, SamplingParams
from raymoe.actors.engine.sampling_controls import apply_controls, pack_controls
from raymoe.actors.engine.scheduler import ScheduledChunk
from raymoe.actors.models.builtin import resolve_model_path
from raymoe.cluster.config import config_from_dict

PROMPTS = ["Hello there", "The capital of France is", "one two three four five six seven eight nine ten"]


def _steps(core, requests: dict) -> dict[str, list]:
    """Run to the end one step at a time; every TokenOutput per request."""
    for rid, (ids, params) in requests.items():
        core.add_request(rid, ids, params)
    out = {rid: [] for rid in requests}
    while core.has_unfinished:
        for o in core.step():
            out[o.request_id].append(o)
    return out


@pytest.fixture(scope="module")
def logits_engine():
    config = config_from_dict(
        {
            "model": {"dtype": "float32"},
            "engine": {"num_kv_blocks": 256, "block_size": 4, "max_num_seqs": 8, "max_num_batched_tokens": 8},
        }
    )
    return build_local_engine(config, collect_logits=True, num_threads=1)


def test_sampled_logprobs_are_log_softmax_of_the_engine_logits(logits_engine):
    tok = logits_engine.tokenizer
    requests = {
        "greedy": (tok.encode(PROMPTS[0]), SamplingParams(max_tokens=6, temperature=0.0, logprobs=5, ignore_eos=True)),
        "seeded": (tok.encode(PROMPTS[1]), SamplingParams(max_tokens=6, seed=3, logprobs=0, ignore_eos=True)),
        "none": (tok.encode(PROMPTS[2]), SamplingParams(max_tokens=6, ignore_eos=True)),
    }
    out = _steps(logits_engine.core, requests)
    for rid, k in (("greedy", 5), ("seeded", 0)):
        assert len(out[rid]) == 6
        for o in out[rid]:
            ref = torch.log_softmax(o.logits.float(), dim=-1)
            assert o.logprob.token_id == o.token
            assert abs(o.logprob.logprob - float(ref[o.token])) < 1e-4
            top = torch.topk(ref, k)
            assert [t for t, _ in o.logprob.top] == top.indices.tolist()
            np.testing.assert_allclose([lp for _, lp in o.logprob.top], top.values.numpy(), atol=1e-4)
    assert all(o.logprob is None and o.prompt_logprobs is None for o in out["none"])


def _hf_logprobs(prompt: list[int]) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        resolve_model_path("builtin:tiny-qwen3-moe"), dtype=torch.float32
    ).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)


def test_prompt_logprobs_over_chunked_prefill_match_transformers(logits_engine):
    """max_num_batched_tokens 8: the 12-token prompt is prefilled in chunks."""
    tok = logits_engine.tokenizer
    prompt = tok.encode(PROMPTS[2])
    assert len(prompt) > 8
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=2, logprobs=1, ignore_eos=True)
    out = _steps(logits_engine.core, {"p": (prompt, params)})["p"]
    got = out[0].prompt_logprobs
    assert got[0] is None and len(got) == len(prompt) and out[1].prompt_logprobs is None
    ref = _hf_logprobs(prompt + [out[0].token])
    for pos in range(1, len(prompt)):
        assert got[pos].token_id == prompt[pos]
        assert abs(got[pos].logprob - float(ref[pos - 1, prompt[pos]])) < 1e-3
        assert [t for t, _ in got[pos].top] == torch.topk(ref[pos - 1], 2).indices.tolist()
    assert abs(out[0].logprob.logprob - float(ref[len(prompt) - 1, out[0].token])) < 1e-3


def test_prompt_logprobs_are_sent_once_under_preemption_and_pipelining():
    requests = {
        f"r{i}": (
            list(range(10 + i, 40 + i)),
            SamplingParams(max_tokens=30, temperature=0.0, prompt_logprobs=1, logprobs=2, ignore_eos=True),
        )
        for i in range(5)
    }
    reference = _engine(num_kv_blocks=512)
    expected = _steps(reference.local.core, requests)
    tight = _engine(num_kv_blocks=36)
    pending = _spy_pending(tight)
    got = _pipelined_logprobs(tight, requests)
    assert any(pending) and tight.num_preemptions > 0
    for rid, outs in expected.items():
        prompt, logprobs = got[rid]
        assert len(prompt) == 30 and prompt[0] is None
        assert [p.token_id for p in prompt[1:]] == requests[rid][0][1:]
        np.testing.assert_allclose(
            [p.logprob for p in prompt[1:]], [p.logprob for p in outs[0].prompt_logprobs[1:]], atol=1e-4
        )
        assert [lp.token_id for lp in logprobs] == [o.token for o in outs]
        np.testing.assert_allclose([lp.logprob for lp in logprobs], [o.logprob.logprob for o in outs], atol=1e-4)


def _pipelined_logprobs(engine, requests: dict) -> dict:
    """Through a pipelined AsyncEngine and an EngineClient: (prompt logprobs, token logprobs) per request."""
    got = {rid: [None, []] for rid in requests}
    results = _pipelined(engine, requests, on_delta=lambda rid, d: _keep(got[rid], d))
    assert set(results) == set(requests)
    return got


def _keep(slot: list, delta) -> None:
    if delta.prompt_logprobs is not None:
        slot[0] = delta.prompt_logprobs
    slot[1] += delta.logprobs


# ---- logit controls: reference from the definitions ------------------------------------------


def _chunk(i: int, sampling: SamplingParams, history: tuple, num_outputs: int, banned: tuple = ()) -> ScheduledChunk:
    return ScheduledChunk(
        request_id=f"r{i}",
        token_ids=(history[-1],),
        start_pos=len(history) - 1,
        block_ids=(0,),
        sample=True,
        sampling=sampling,
        seed=0,
        num_output_tokens=num_outputs,
        history=history if sampling.uses_penalties else (),
        banned=banned,
    )


def _reference(logits: torch.Tensor, history: list[int], num_outputs: int, p: SamplingParams, banned) -> torch.Tensor:
    out = logits.clone()
    outputs = history[len(history) - num_outputs :]
    for t in set(history):
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t in set(outputs):
        out[t] -= p.frequency_penalty * outputs.count(t) + p.presence_penalty
    for t, b in p.logit_bias:
        out[t] += b
    for t in banned:
        out[t] = float("-inf")
    return out


def test_controls_match_their_definitions_on_random_logits():
    gen = torch.Generator().manual_seed(0)
    vocab = 50
    logits = torch.randn(6, vocab, generator=gen) * 3
    last_sampled = torch.tensor([7, 11, 13, 17, 19])
    cases = [
        (SamplingParams(presence_penalty=0.5, frequency_penalty=1.5), [1, 2, 3, 3, 4, 4, 4], 4, ()),
        (SamplingParams(), [1, 2], 1, ()),  # no control: untouched
        (SamplingParams(repetition_penalty=1.7, logit_bias=((5, 10.0), (9, -3.0))), [5, 6, 6, 8], 2, ()),
        (SamplingParams(max_tokens=20, min_tokens=3, frequency_penalty=-2.0), [3, 3, 9, PENDING_TOKEN], 2, (2, 49)),
        (SamplingParams(max_tokens=20, min_tokens=3, repetition_penalty=0.5), [0, 1, 2], 0, (2, 10**9)),
        # two outputs pending, one from each step in flight: last_sampled[4] = 19, then [1] = 11
        (SamplingParams(frequency_penalty=0.7), [8, 19, PENDING_TOKEN, PENDING_TOKEN], 3, ()),
    ]
    chunks = [_chunk(i, p, tuple(h), n, banned) for i, (p, h, n, banned) in enumerate(cases)]
    pending_at = [[], [], [], [2], [], [4, 1]]  # row 3's last output is pending: last_sampled[2] = 13
    controls = pack_controls(chunks, pending_at)
    assert controls.rows.tolist() == [0, 2, 3, 4, 5]
    got = apply_controls(logits, controls, last_sampled)
    for i, (p, h, n, banned) in enumerate(cases):
        resolved = iter(last_sampled[pending_at[i]].tolist())
        history = [next(resolved) if t == PENDING_TOKEN else t for t in h]
        expected = _reference(logits[i], history, n, p, [t for t in banned if t < vocab])
        torch.testing.assert_close(got[i], expected)


def test_logit_bias_and_min_tokens_in_the_engine(logits_engine):
    core, tok = logits_engine.core, logits_engine.tokenizer
    eos = min(core.eos_token_ids)
    prompt = tok.encode(PROMPTS[0])
    biased = SamplingParams(max_tokens=5, temperature=0.0, logit_bias=((42, 100.0),))
    eos_late = SamplingParams(max_tokens=20, temperature=0.0, logit_bias=((eos, 100.0),), min_tokens=4)
    stop_late = SamplingParams(max_tokens=20, seed=1, logit_bias=((77, 100.0),), stop_token_ids=(77,), min_tokens=3)
    out = _steps(core, {"b": (prompt, biased), "e": (prompt, eos_late), "s": (prompt, stop_late)})
    assert [o.token for o in out["b"]] == [42] * 5
    assert [o.token for o in out["e"]][4] == eos and len(out["e"]) == 5 and out["e"][-1].finish.reason == "stop"
    assert eos not in [o.token for o in out["e"]][:4]
    assert len(out["s"]) == 4 and out["s"][-1].token == 77


def test_penalties_pipelined_equal_one_step_at_a_time_under_preemption():
    """The penalties' histories hold the pending tokens of pipelined steps (two steps in
    flight), and preemption (recomputing the prompt and outputs) changes nothing."""
    params = SamplingParams(
        max_tokens=30, temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2
    )
    requests = {f"r{i}": (list(range(20 + i, 50 + i)), params) for i in range(5)}
    reference = _engine(num_kv_blocks=512)
    expected = {rid: [o.token for o in outs] for rid, outs in _steps(reference.local.core, requests).items()}
    plain = _steps(_engine(num_kv_blocks=512).local.core, {"r0": (requests["r0"][0], SamplingParams(max_tokens=30))})
    assert [o.token for o in plain["r0"]] != expected["r0"], "the penalties changed nothing: proves nothing"
    tight = _engine(num_kv_blocks=36)
    in_flight = []
    pending = _spy_pending(tight, in_flight)
    launch, pending_history = tight.executor.runner.launch, []

    def spy(step):
        if step.controls is not None:  # per step: the most pending tokens in one row's history
            ends = np.cumsum(step.controls.history_len)
            negative = np.concatenate([[0], np.cumsum(step.controls.history_token < 0)])
            pending_history.append(int(np.max(negative[ends] - negative[ends - step.controls.history_len])))
        return launch(step)

    tight.executor.runner.launch = spy
    got = _pipelined(tight, requests)
    assert any(pending) and tight.num_preemptions > 0
    assert max(in_flight) == 2, "never scheduled with two steps in flight"
    assert max(pending_history) == 2, "no history ever held two pending tokens"
    assert {rid: r["tokens"] for rid, r in got.items()} == expected


def test_a_step_without_such_requests_takes_the_unchanged_path(monkeypatch):
    """No controls, no logprob columns; the greedy step gathers no logits over the vocabulary."""
    engine = _engine(num_kv_blocks=64)
    runner = engine.executor.runner

    def forbidden(*args, **kwargs):
        raise AssertionError("called on the fast path")

    monkeypatch.setattr(sampler, "apply_controls", forbidden)
    monkeypatch.setattr(sampler, "token_logprobs", forbidden)
    monkeypatch.setattr(runner.model, "full_logits", forbidden)
    steps = []
    launch = runner.launch
    runner.launch = lambda step: steps.append(step) or launch(step)
    _steps(engine.local.core, {"a": ([1, 2, 3], SamplingParams(max_tokens=4, temperature=0.0))})
    assert steps and all(s.controls is None and s.logprobs is None and s.prompt_logprob_rows is None for s in steps)


def test_min_tokens_yields_where_its_bans_leave_nothing_to_sample():
    """A grammar that can only end (its one allowed token a stop id that min_tokens bans),
    and a ban of every id: the row samples as if min_tokens were off, not id 0 out of a row
    of -inf (which the grammar would refuse)."""
    from raymoe.actors.engine.grammar import GrammarMasks, bitmask_words
    from raymoe.actors.engine.sampler import sample_step
    from raymoe.actors.engine.step import pack_step

    vocab, end = 64, 37
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    logits[:, end] = -5.0  # far from the top: only the rules can pick it
    everything = tuple(range(vocab))
    cases = [((end, 3), (end,)), (everything, everything), ((end,), (end,))]
    params = [SamplingParams(max_tokens=8, min_tokens=4, temperature=0.0, stop_token_ids=stop) for stop, _ in cases]
    chunks = [_chunk(i, p, (5,), 0, banned) for i, (p, (_, banned)) in enumerate(zip(params, cases))]
    step = pack_step(chunks, (len(cases),), block_size=16)
    only_end = np.zeros((1, bitmask_words(vocab)), dtype=np.int32)
    only_end[0, end // 32] = np.int32(1 << (end % 32))
    step = dataclasses.replace(step, grammar=GrammarMasks(np.array([0]), np.array([0]), only_end))
    tokens = sample_step(logits, step, last_sampled=torch.zeros(1, dtype=torch.int64)).tolist()
    assert tokens[0] == end  # the grammar's end, the ban lifted
    assert tokens[1] == int(logits[1].argmax())  # every id banned: the unbanned choice
    banned_end = logits[2].clone()
    banned_end[end] = float("-inf")
    assert tokens[2] == int(banned_end.argmax())  # something is left: the ban holds
