"""Pipelined steps (AsyncEngine keeps one step in flight; the next one's decode tokens are
pending and the runner takes them from its last sampling) give exactly the tokens,
texts and finish reasons of steps run one at a time, with the real built-in model in
process: under preemption, with stop strings and stop tokens, with seeded sampling,
and with consumers that go away mid-stream."""
from __future__ import annotations

import asyncio

import pytest

from raymoe.actors.engine.async_engine import AsyncEngine
from raymoe.actors.engine.core import EngineCore, run_to_completion
from raymoe.actors.engine.local import build_local_engine
from raymoe.actors.engine.request import SamplingParams
from raymoe.cluster.config import config_from_dict

PROMPTS = ["Hello there", "The capital of France is", "one two three four five six seven", "x", "abc " * 12]


def _engine(num_kv_blocks: int) -> EngineCore:
    config = config_from_dict({
        "model": {"dtype": "float32"},
        "engine": {"num_kv_blocks": num_kv_blocks, "block_size": 4, "max_num_seqs": 8, "max_num_batched_tokens": 64},
    })  # fmt: skip
    return build_local_engine(config, num_threads=1)


def _spy_pending(core: EngineCore) -> list[bool]:
    """Record, per launched step, whether it carried pending tokens."""
    runner, seen = core.execute.runner, []
    launch = runner.launch

    def spy(step):
        seen.append(bool((step.prev_rows >= 0).any()))
        return launch(step)

    runner.launch = spy
    return seen


def _sync(core: EngineCore, requests: dict) -> dict:
    for rid, (ids, params) in requests.items():
        core.add_request(rid, ids, params)
    out = {rid: {"tokens": [], "text": "", "reason": None} for rid in requests}
    for o in run_to_completion(core):
        out[o.request_id]["tokens"] += o.new_token_ids
        out[o.request_id]["text"] += o.new_text
        out[o.request_id]["reason"] = o.finish_reason
    return out


def _pipelined(core: EngineCore, requests: dict, leave_after: dict | None = None) -> dict:
    """Every request streamed through a pipelined AsyncEngine; a request in ``leave_after``
    has its consumer go away after that many outputs."""
    leave_after = leave_after or {}

    async def main():
        engine = AsyncEngine(core, core.execute.run_async, max_queued=100, pipelined=True)

        async def one(rid, ids, params):
            r = {"tokens": [], "text": "", "reason": None}
            stream = engine.stream(rid, ids, params)
            async for o in stream:
                r["tokens"] += o.new_token_ids
                r["text"] += o.new_text
                r["reason"] = o.finish_reason
                if len(r["tokens"]) == leave_after.get(rid):
                    await stream.aclose()  # the client went away: aborts the request
                    break
            return rid, r

        results = dict(await asyncio.gather(*(one(rid, ids, p) for rid, (ids, p) in requests.items())))
        for _ in range(500):  # the loop collects the step it may still have in flight
            if core.execute.runner.num_in_flight == 0:
                break
            await asyncio.sleep(0.01)
        assert core.execute.runner.num_in_flight == 0 and engine.error is None
        return results

    return asyncio.run(main())


def _free(core: EngineCore) -> bool:
    return all(s.block_manager.num_free_blocks == s.block_manager.num_blocks for s in core.schedulers)


@pytest.fixture(scope="module")
def big():
    return _engine(num_kv_blocks=512)


@pytest.mark.parametrize("sampling", [SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True),
                                      SamplingParams(max_tokens=30, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)],
                         ids=["greedy", "seeded"])  # fmt: skip
def test_pipelined_equals_one_step_at_a_time_under_preemption(big, sampling):
    requests = {f"r{i}": (big.tokenizer.encode(p), sampling) for i, p in enumerate(PROMPTS)}
    reference = _sync(big, requests)
    tight = _engine(num_kv_blocks=36)
    pending = _spy_pending(tight)
    got = _pipelined(tight, requests)
    assert any(pending), "no step ever ran with a pending token: nothing was pipelined"
    assert tight.num_preemptions > 0, "the tight cache never preempted: the test would prove nothing"
    assert got == reference
    assert _free(tight)


def test_pipelined_stops_exactly(big):
    ids = big.tokenizer.encode("Hello there")
    plain = _sync(big, {"a": (ids, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))})["a"]
    text = plain["text"]
    stop = next((text[i : i + 3] for i in range(5, len(text) - 3) if text[i : i + 3].strip() and "\ufffd" not in text[i : i + 3]), None)
    assert stop is not None, f"no usable stop string in {text!r}"
    stop_token = plain["tokens"][7]
    requests = {
        "stop-string": (ids, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=(stop,))),
        "stop-token": (ids, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop_token_ids=(stop_token,))),
        "length": (ids, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)),
        "one": (ids, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)),
    }
    reference = _sync(big, requests)
    assert reference["stop-string"]["text"] == text[: text.index(stop)]
    assert reference["stop-token"]["tokens"][-1] == stop_token and reference["stop-token"]["reason"] == "stop"
    pending = _spy_pending(big)
    try:
        assert _pipelined(big, requests) == reference
    finally:
        del big.execute.runner.launch  # the spy
    assert any(pending)
    assert _free(big)


def test_consumers_leaving_mid_stream_free_every_block(big):
    sampling = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    requests = {f"r{i}": (big.tokenizer.encode(p), sampling) for i, p in enumerate(PROMPTS)}
    got = _pipelined(big, requests, leave_after={"r0": 1, "r2": 4, "r4": 9})
    assert [len(got[r]["tokens"]) for r in ("r0", "r2", "r4")] == [1, 4, 9]
    assert all(len(got[r]["tokens"]) == 30 and got[r]["reason"] == "length" for r in ("r1", "r3"))
    assert not big.has_unfinished
    assert _free(big)
