"""The engine with the real built-in model, in process (EngineCore + LocalExecutor):
preemption and resume give the same tokens, blocks never leak (finished or aborted),
stop strings cut the text exactly, seeded sampling is batch-independent.

Served through the client path without Ray (AsyncEngine's submit / poll, EngineClient's
batched delivery and detokenisation), with pipelined steps (one step in flight; the
next one's decode tokens are pending and the runner takes them from its last sampling):
exactly the tokens, texts and finish reasons of steps run one at a time, under
preemption, with stop strings and stop tokens, with seeded sampling, with consumers
that go away mid-stream or fall behind the engine."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import ray

from raymoe.actors.engine.async_engine import AsyncEngine
from raymoe.actors.engine.core import EngineCore
from raymoe.actors.engine.grammar import GrammarSpec
from raymoe.actors.engine.local import LocalEngine, build_local_engine
from raymoe.actors.engine.messages import Finish, NewRequest, RejectKind
from raymoe.actors.engine.output_text import OutputText
from raymoe.actors.engine.pipeline_depth import WINDOW
from raymoe.actors.engine.request import SamplingParams
from raymoe.cluster.config import config_from_dict
from raymoe.deploy.api_error import APIError
from raymoe.deploy.engine_client import INLINE_TEXT_CHARS, EngineClient
from raymoe.deploy.request_stream import RequestRejected, engine_error

PROMPTS = ["Hello there", "The capital of France is", "one two three four five six seven", "x", "abc " * 12]


@dataclass
class Engine:
    """The local engine under test, with the spellings these tests use."""

    local: LocalEngine

    def __getattr__(self, name):  # core's attributes (step, schedulers, abort, ...)
        return getattr(self.local.core, name)

    @property
    def tokenizer(self):
        return self.local.tokenizer


def _engine(
    num_kv_blocks: int, block_size: int = 4, max_num_batched_tokens: int = 64, prefix_caching: bool = True
) -> Engine:
    config = config_from_dict(
        {
            "model": {"dtype": "float32"},
            "engine": {
                "num_kv_blocks": num_kv_blocks,
                "block_size": block_size,
                "max_num_seqs": 8,
                "max_num_batched_tokens": max_num_batched_tokens,
                "prefix_caching": prefix_caching,
            },
        }
    )
    return Engine(build_local_engine(config, num_threads=1))


def _run(engine: Engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, dict]:
    """Steps one at a time, each token through OutputText (a stop string aborts at once)."""
    core = engine.local.core
    texts = {}
    for rid, (ids, params) in requests.items():
        core.add_request(rid, ids, params)
        texts[rid] = OutputText(engine.tokenizer, ids, params.stop)
    out = {rid: {"tokens": [], "text": "", "reason": None} for rid in requests}
    while core.has_unfinished:
        steps = core.num_steps
        for o in core.step():
            delta = texts[o.request_id].add([o.token], o.finish)
            if texts[o.request_id].needs_abort:
                core.abort(o.request_id)
            out[o.request_id]["tokens"] += delta.token_ids
            out[o.request_id]["text"] += delta.text
            out[o.request_id]["reason"] = out[o.request_id]["reason"] or delta.finish_reason
        assert core.num_steps > steps, "the engine scheduled nothing with requests pending (scheduler stuck)"
    return out


def _free_everywhere(core: EngineCore) -> bool:
    return all(s.block_manager.num_free_blocks == s.block_manager.num_blocks for s in core.schedulers)


@pytest.fixture(scope="module")
def big():
    return _engine(num_kv_blocks=512)


@pytest.fixture(autouse=True)
def _big_left_idle(request):
    """The tests share ``big``'s core and runner: each must leave them idle, or the next one
    starts with a step it never launched (a loop stopped mid-step, or a request never finished)."""
    yield
    if "big" in request.fixturenames:
        big = request.getfixturevalue("big")
        assert not big.has_unfinished and big.executor.runner.num_in_flight == 0, "the test left the engine busy"


async def _stop_when_idle(engine: AsyncEngine, core: Engine, timeout_s: float = 30.0) -> None:
    """Stop ``engine``'s step loop once it has applied every abort and collected every step it
    launched (a pipelined loop keeps one in flight after the last token is delivered)."""
    deadline = time.monotonic() + timeout_s
    while core.has_unfinished or core.executor.runner.num_in_flight:
        assert engine.error is None and time.monotonic() < deadline, f"the engine did not go idle: {engine.error!r}"
        await asyncio.sleep(0.01)
    await engine.stop()


def _requests(core: EngineCore, sampling: SamplingParams) -> dict[str, tuple[list[int], SamplingParams]]:
    return {f"r{i}": (core.tokenizer.encode(p), sampling) for i, p in enumerate(PROMPTS)}


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=40, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True),
    ],
    ids=["greedy", "seeded"],
)
def test_preemption_gives_the_same_tokens(big, sampling):
    reference = _run(big, _requests(big, sampling))
    assert _free_everywhere(big)
    tight = _engine(num_kv_blocks=40)  # 160 token slots for 5 requests of up to ~90 tokens
    got = _run(tight, _requests(tight, sampling))
    assert tight.num_preemptions > 0, "the tight cache never preempted: the test would prove nothing"
    assert {k: v["tokens"] for k, v in got.items()} == {k: v["tokens"] for k, v in reference.items()}
    assert _free_everywhere(tight)


def test_each_request_alone_equals_the_batch(big):
    sampling = SamplingParams(max_tokens=16, temperature=0.8, seed=3, ignore_eos=True)
    batch = _run(big, _requests(big, sampling))
    for rid, (ids, params) in _requests(big, sampling).items():
        alone = _run(big, {rid: (ids, params)})
        assert alone[rid]["tokens"] == batch[rid]["tokens"]


def test_aborts_free_every_block(big):
    sampling = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    for rid, (ids, params) in _requests(big, sampling).items():
        big.add_request(rid, ids, params)
    for _ in range(3):  # some prefilled, some decoding
        big.step()
    for rid in ["r0", "r2", "r4"]:
        assert big.abort(rid)
    assert not big.abort("r0")  # already gone
    while big.has_unfinished:
        big.step()
    assert _free_everywhere(big)


def test_stop_strings_cut_exactly(big):
    plain = _run(
        big,
        {"a": (big.tokenizer.encode("Hello there"), SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))},
    )["a"]
    text = plain["text"]
    stop = next(
        (
            text[i : i + 3]
            for i in range(5, len(text) - 3)
            if text[i : i + 3].strip() and "\ufffd" not in text[i : i + 3]
        ),
        None,
    )
    assert stop is not None, f"no usable stop string in {text!r}"
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=(stop,))
    cut = _run(big, {"b": (big.tokenizer.encode("Hello there"), params)})["b"]
    assert cut["reason"] == "stop"
    assert cut["text"] == text[: text.index(stop)]
    assert len(cut["tokens"]) < len(plain["tokens"])
    assert _free_everywhere(big)


def test_max_tokens_and_eos(big):
    """Each ends the request at its token: max_tokens, an EOS, an EOS named in stop_token_ids
    (which ignore_eos does not turn off)."""
    ids = big.tokenizer.encode("abc")
    plain = _run(big, {"p": (ids, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))})["p"]["tokens"]
    at_eos = next((i for i, t in enumerate(plain) if t in big.tokenizer.eos_token_ids), None)
    assert at_eos is not None and at_eos < 29, f"greedy 'abc' gives no EOS to stop at: {plain}; choose another prompt"
    assert len(plain) == 30  # ignore_eos: on past it
    out = _run(big, {"c": (ids, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))})["c"]
    assert out["reason"] == "length" and out["tokens"] == plain[:5]
    out = _run(big, {"e": (ids, SamplingParams(max_tokens=30, temperature=0.0))})["e"]
    assert out["reason"] == "stop" and out["tokens"] == plain[: at_eos + 1]
    stop = SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=(plain[at_eos],), ignore_eos=True)
    out = _run(big, {"d": (ids, stop)})["d"]
    assert out["reason"] == "stop" and out["tokens"] == plain[: at_eos + 1]


# ---- pipelined steps ------------------------------------------------------------------


def _spy_pending(core: Engine, in_flight: list | None = None) -> list[bool]:
    """Record, per launched step, whether it carried pending tokens (and into ``in_flight``,
    at each step scheduled, how many steps were scheduled and not yet applied)."""
    runner, seen = core.executor.runner, []
    launch = runner.launch

    def spy(step):
        seen.append(bool((step.prev_rows >= 0).any()))
        return launch(step)

    runner.launch = spy
    if in_flight is not None:
        engine_core, unapplied = core.local.core, [0]
        schedule, apply = engine_core.schedule, engine_core.apply

        def spy_schedule():
            planned = schedule()
            if planned is not None:
                in_flight.append(unapplied[0])
                unapplied[0] += 1
            return planned

        def spy_apply(planned, results):
            unapplied[0] -= 1
            return apply(planned, results)

        engine_core.schedule, engine_core.apply = spy_schedule, spy_apply
    return seen


def _pipelined(
    core: Engine,
    requests: dict,
    leave_after: dict | None = None,
    lag_s: float = 0.0,
    on_delta=None,
    max_steps_in_flight: int | str = 2,
) -> dict:
    """Every request streamed through a pipelined AsyncEngine and an in-process EngineClient;
    a request in ``leave_after`` has its consumer go away after that many tokens; every
    consumer sleeps ``lag_s`` per delta (falls behind the engine); ``on_delta(rid, delta)``
    sees every delta."""
    leave_after = leave_after or {}

    async def main():
        engine = AsyncEngine(
            core.local.core, core.executor, max_queued=100, pipelined=True, max_steps_in_flight=max_steps_in_flight
        )
        client = EngineClient(engine, core.tokenizer, core.local.info)

        async def one(rid, ids, params):
            r = {"tokens": [], "text": "", "reason": None, "deltas": 0}
            stream = client.stream(ids, params)
            async for d in stream:
                if on_delta is not None:
                    on_delta(rid, d)
                r["tokens"] += d.token_ids
                r["text"] += d.text
                r["reason"] = d.finish_reason
                r["deltas"] += 1
                if len(r["tokens"]) >= leave_after.get(rid, 10**9):
                    await stream.aclose()  # the client went away: aborts the request
                    break
                await asyncio.sleep(lag_s)
            return rid, r

        results = dict(await asyncio.gather(*(one(rid, ids, p) for rid, (ids, p) in requests.items())))
        await client.close()
        await _stop_when_idle(engine, core)
        return results

    return asyncio.run(main())


def _texts(results: dict) -> dict:
    return {rid: {k: r[k] for k in ("tokens", "text", "reason")} for rid, r in results.items()}


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True),
    ],
    ids=["greedy", "seeded"],
)
def test_pipelined_equals_one_step_at_a_time_under_preemption(big, sampling):
    requests = {f"r{i}": (big.tokenizer.encode(p), sampling) for i, p in enumerate(PROMPTS)}
    reference = _run(big, requests)
    tight = _engine(num_kv_blocks=36)
    in_flight = []
    pending = _spy_pending(tight, in_flight)
    got = _pipelined(tight, requests)
    assert any(pending), "no step ever ran with a pending token: nothing was pipelined"
    assert max(in_flight) == 2, "never scheduled with two steps in flight"
    assert tight.num_preemptions > 0, "the tight cache never preempted: the test would prove nothing"
    assert _texts(got) == reference
    assert _free_everywhere(tight)


def test_one_step_in_flight_by_config_gives_the_same_tokens(big):
    """engine.max_steps_in_flight: 1 plans each step while only the one before it is on the
    ranks (a new request's first token a step sooner): still pipelined, same outputs."""
    sampling = SamplingParams(max_tokens=30, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    requests = {f"r{i}": (big.tokenizer.encode(p), sampling) for i, p in enumerate(PROMPTS)}
    reference = _run(big, requests)
    in_flight = []
    pending = _spy_pending(big, in_flight)
    try:
        got = _pipelined(big, requests, max_steps_in_flight=1)
    finally:
        del big.executor.runner.launch, big.local.core.schedule, big.local.core.apply
    assert _texts(got) == reference
    assert any(pending), "no step ran with a pending token: it was not pipelined"
    assert in_flight and max(in_flight) == 1


@pytest.mark.parametrize("slack_s, depth", [(5e-3, 1), (0.0, 2)])
def test_auto_steps_in_flight_follow_the_slack_the_ranks_report(big, slack_s, depth):
    """engine.max_steps_in_flight: auto plans with one step on the ranks once they report a
    full window of slack after each launch, two while they report none; same outputs."""
    sampling = SamplingParams(max_tokens=40, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    requests = {f"r{i}": (big.tokenizer.encode(p), sampling) for i, p in enumerate(PROMPTS)}
    reference = _run(big, requests)
    runner = big.executor.runner
    collect = runner.collect

    def reporting(keep):
        outputs = collect(keep)
        for out in outputs:
            if out is not None:
                out.device_wait_s = slack_s
        return outputs

    in_flight = []
    _spy_pending(big, in_flight)
    runner.collect = reporting
    try:
        got = _pipelined(big, requests, max_steps_in_flight="auto")
    finally:
        del runner.collect, runner.launch, big.local.core.schedule, big.local.core.apply
    assert _texts(got) == reference
    window = WINDOW
    assert len(in_flight) > 2 * window, "too few steps to see the depth change"
    assert max(in_flight[:window]) == 2, "auto starts with two steps in flight"
    assert max(in_flight[2 * window :]) == depth


def test_requests_under_a_grammar_keep_one_step_in_flight(big):
    """A grammar's masks need every token but the last: while such a request is live the loop
    keeps one step in flight, and the outputs equal one step at a time."""
    # 24 tokens cannot complete 200 letters: the constrained requests outlive the plain ones
    constrained = SamplingParams(max_tokens=24, temperature=0.0, grammar=GrammarSpec("regex", "[a-z ]{200}"))
    plain = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    requests = {f"p{i}": (big.tokenizer.encode(p), constrained if i % 2 else plain) for i, p in enumerate(PROMPTS)}
    reference = _run(big, requests)
    in_flight = []
    _spy_pending(big, in_flight)
    try:
        got = _pipelined(big, requests)
    finally:
        del big.executor.runner.launch, big.local.core.schedule, big.local.core.apply
    assert _texts(got) == reference
    assert in_flight and max(in_flight) <= 1


@pytest.mark.parametrize("same_batch", [False, True], ids=["sent-after", "queued-together"])
def test_a_slow_grammar_compile_holds_up_only_its_own_request(big, monkeypatch, same_batch):
    """A grammar that takes seconds to compile (a large regex can take 20) must not delay the
    requests sent after it or queued with it: before, one client's submit call waited for the
    compile, and every request queued behind it in that ingress waited too."""
    slow = GrammarSpec("regex", "(a|c)+" if same_batch else "(a|b)+")  # each test compiles its own
    grammars = big.local.core.grammars
    compile_grammar = grammars.compile

    def compile_slowly(spec):
        if spec == slow and not grammars.is_cached(spec):
            time.sleep(3.0)
        return compile_grammar(spec)

    monkeypatch.setattr(grammars, "compile", compile_slowly)
    ids = big.tokenizer.encode("Hello there")

    async def main():
        engine = AsyncEngine(big.local.core, big.executor, max_queued=100, pipelined=True)
        client = EngineClient(engine, big.tokenizer, big.local.info)
        t0 = time.monotonic()

        async def run(params) -> tuple[int, float]:
            tokens = sum([len(d.token_ids) async for d in client.stream(ids, params)])
            return tokens, time.monotonic() - t0

        constrained = asyncio.create_task(run(SamplingParams(max_tokens=4, temperature=0.0, grammar=slow)))
        if not same_batch:
            await asyncio.sleep(0.05)  # its submit is on its way
        plain = await run(SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        result = plain, await constrained
        await client.close()
        await _stop_when_idle(engine, big)
        return result

    (plain_tokens, plain_s), (constrained_tokens, constrained_s) = asyncio.run(main())
    assert plain_tokens == 4 and constrained_tokens >= 1
    assert constrained_s >= 3.0 and plain_s < 2.0, (plain_s, constrained_s)


def test_grammar_compiles_never_hold_up_the_masks_of_running_requests(big, monkeypatch):
    """More requests with slow new grammars than the default thread pool has threads, while a
    request under a compiled grammar decodes: it finishes while their compiles still run.
    Before, its steps' masks queued behind the compiles in the same pool, and every stream
    stopped (4.6-7.5 s for 24-48 requests with 34 KB schemas on a 2-core server)."""
    grammars = big.local.core.grammars
    compile_grammar = grammars.compile
    release = threading.Event()
    slow = [GrammarSpec("regex", f"x{i}[a-z]+") for i in range(40)]  # > min(32, cpus + 4) threads

    def compile_held(spec):
        if spec in slow:
            release.wait(30)
        return compile_grammar(spec)

    monkeypatch.setattr(grammars, "compile", compile_held)
    ids = big.tokenizer.encode("Hello there")
    constrained = SamplingParams(max_tokens=8, temperature=0.0, grammar=GrammarSpec("regex", "[a-z ]{40}"))

    async def main():
        engine = AsyncEngine(big.local.core, big.executor, max_queued=100, pipelined=True)
        client = EngineClient(engine, big.tokenizer, big.local.info)

        async def tokens(params) -> int:
            return sum([len(d.token_ids) async for d in client.stream(ids, params)])

        await tokens(constrained)  # its grammar compiled and cached
        held = []
        for spec in slow:  # one at a time, as requests come in: each in a submit call of its own
            held.append(asyncio.create_task(tokens(SamplingParams(max_tokens=1, grammar=spec))))
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)  # their compiles fill the default pool
        t0 = time.monotonic()
        try:
            running = await asyncio.wait_for(tokens(constrained), 15)
        except asyncio.TimeoutError:
            running = None
        elapsed = time.monotonic() - t0
        release.set()
        await asyncio.gather(*held)
        await client.close()
        await _stop_when_idle(engine, big)
        return running, elapsed

    running, elapsed = asyncio.run(main())
    assert running == 8 and elapsed < 10.0, elapsed


class _FirstSubmitHeld:
    """The engine's client API with its first submit call held for ``hold_s`` (a busy
    controller, a slow network)."""

    def __init__(self, engine: AsyncEngine, hold_s: float) -> None:
        self.engine, self.hold_s, self.submits, self.submitted = engine, hold_s, 0, 0

    async def submit(self, client, requests):
        self.submits += 1
        if self.submits == 1:
            await asyncio.sleep(self.hold_s)
        rejected = await self.engine.submit(client, requests)
        self.submitted += len(requests) - len(rejected)
        return rejected

    def __getattr__(self, name):  # abort, poll, leave, reconnect
        return getattr(self.engine, name)


def _client_with_first_submit_held(core: Engine, hold_s: float) -> tuple[_FirstSubmitHeld, EngineClient]:
    """An engine client whose first submit call is held ``hold_s`` on its way to a pipelined engine."""
    held = _FirstSubmitHeld(AsyncEngine(core.local.core, core.executor, max_queued=100, pipelined=True), hold_s)
    return held, EngineClient(held, core.tokenizer, core.local.info)


def test_requests_arriving_while_a_submit_is_out_go_together_in_the_next(big):
    """One call of plain requests is out at a time: the ones that arrive meanwhile wait for it
    and go in one call (a burst costs the controller a few calls, not one a request), and
    every request runs."""
    ids = big.tokenizer.encode("Hello there")
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

    async def main():
        held, client = _client_with_first_submit_held(big, hold_s=0.5)

        async def run() -> int:
            return sum([len(d.token_ids) async for d in client.stream(ids, params)])

        first = asyncio.create_task(run())
        await asyncio.sleep(0.05)  # its submit is out
        later = []
        for _ in range(5):  # arriving one after another, in separate ticks
            later.append(asyncio.create_task(run()))
            await asyncio.sleep(0.02)
        tokens = await asyncio.gather(first, *later)
        await client.close()
        await _stop_when_idle(held.engine, big)
        return tokens, held.submits, held.submitted

    tokens, submits, submitted = asyncio.run(main())
    assert tokens == [4] * 6
    assert submitted == 6
    assert submits == 2, f"{submits} submit calls for a request and five that queued behind it"


def test_a_request_dropped_while_its_submit_is_out_is_aborted_once_in(big):
    ids = big.tokenizer.encode("Hello there")
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def main():
        held, client = _client_with_first_submit_held(big, hold_s=0.5)
        steps = big.num_steps
        stream = client.stream(ids, params)
        await asyncio.sleep(0.05)  # its submit is out
        await stream.aclose()  # the consumer went away
        deadline = time.monotonic() + 10
        while not held.submitted and time.monotonic() < deadline:  # its submit's hold ends
            await asyncio.sleep(0.01)
        await client.close()
        await _stop_when_idle(held.engine, big)
        return held.submitted, big.num_steps - steps

    submitted, steps = asyncio.run(main())
    assert submitted == 1, "the request never reached the engine: the test would prove nothing"
    assert not big.has_unfinished and _free_everywhere(big)
    assert steps < 200, f"the request ran {steps} steps: its abort was lost"


def test_a_request_sent_twice_runs_once_and_keeps_its_outputs(big):
    """A client that lost the answer to its submit (its controller handle failed mid-call) may
    send the same request again: the engine keeps the one it holds. It used to refuse the copy
    as a request id in use, and the refusal dropped the original's outputs (a 400 to the client,
    and a request that never answered)."""
    ids = big.tokenizer.encode("Hello there")
    new = NewRequest(0, ids, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))

    async def main():
        engine = AsyncEngine(big.local.core, big.executor, max_queued=100, pipelined=True)
        first, again = await engine.submit("c", [new]), await engine.submit("c", [new])
        tokens, finish = [], None
        while finish is None:
            for entry in (await engine.poll("c", 1.0)).entries():
                tokens += entry.token_ids
                finish = entry.finish if entry.finish != Finish.RUNNING else None
        await _stop_when_idle(engine, big)
        return first, again, tokens, finish

    first, again, tokens, finish = asyncio.run(asyncio.wait_for(main(), 30))
    assert first == [] and again == []
    assert len(tokens) == 6 and finish == Finish.LENGTH
    assert not big.has_unfinished


class _ControllerDiesAtEveryPoll:
    """The engine's client API where every poll finds the controller dead (a request that kills
    each new one, say): counts the submits of each request."""

    def __init__(self) -> None:
        self.submits: dict[int, int] = {}

    async def submit(self, client, requests):
        for n in requests:
            self.submits[n.seq] = self.submits.get(n.seq, 0) + 1
        return []

    async def poll(self, client, timeout_s):
        await asyncio.sleep(0.02)
        raise ray.exceptions.RayActorError()

    async def abort(self, client, seqs):
        pass

    async def leave(self, client):
        pass

    async def reconnect(self):
        pass


def test_a_request_is_sent_again_after_one_lost_controller_and_not_after_a_second(big):
    """A request that had no output when its controller died goes to the next one, once: when
    that one dies too with the request in it, the request fails (503) rather than going on to
    kill every controller Serve starts."""
    engine = _ControllerDiesAtEveryPoll()

    async def main():
        client = EngineClient(engine, big.tokenizer, big.local.info)
        stream = client.stream(big.tokenizer.encode("hi"), SamplingParams(max_tokens=4))
        with pytest.raises(ray.exceptions.RayActorError):
            async for _ in stream:
                pass
        await client.close()
        return client.controllers_lost

    assert asyncio.run(asyncio.wait_for(main(), 30)) == 2  # /metrics: raymoe_engine_controllers_lost
    assert engine.submits == {0: 2}
    assert engine_error(ray.exceptions.RayActorError()).status == 503


def test_pipelined_stops_exactly(big):
    ids = big.tokenizer.encode("Hello there")
    plain = _run(big, {"a": (ids, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))})["a"]
    text = plain["text"]
    stop = next(
        (
            text[i : i + 3]
            for i in range(5, len(text) - 3)
            if text[i : i + 3].strip() and "\ufffd" not in text[i : i + 3]
        ),
        None,
    )
    assert stop is not None, f"no usable stop string in {text!r}"
    stop_token = plain["tokens"][7]
    requests = {
        "stop-string": (ids, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=(stop,))),
        "stop-token": (
            ids,
            SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop_token_ids=(stop_token,)),
        ),
        "length": (ids, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)),
        "one": (ids, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)),
    }
    reference = _run(big, requests)
    assert reference["stop-string"]["text"] == text[: text.index(stop)]
    assert reference["stop-token"]["tokens"][-1] == stop_token and reference["stop-token"]["reason"] == "stop"
    pending = _spy_pending(big)
    try:
        assert _texts(_pipelined(big, requests)) == reference
        lagging = _pipelined(big, requests, lag_s=0.05)  # consumers take several steps' tokens at once
        assert _texts(lagging) == reference
        assert any(r["deltas"] < len(r["tokens"]) for r in lagging.values()), "no consumer ever fell behind"
    finally:
        del big.executor.runner.launch  # the spy
    assert any(pending)
    assert _free_everywhere(big)


def test_consumers_leaving_mid_stream_free_every_block(big):
    sampling = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    requests = {f"r{i}": (big.tokenizer.encode(p), sampling) for i, p in enumerate(PROMPTS)}
    got = _pipelined(big, requests, leave_after={"r0": 1, "r2": 4, "r4": 9})
    for rid, n in {"r0": 1, "r2": 4, "r4": 9}.items():  # deltas may hold several tokens; the rest never came
        assert n <= len(got[rid]["tokens"]) < 30 and got[rid]["reason"] is None
    assert all(len(got[r]["tokens"]) == 30 and got[r]["reason"] == "length" for r in ("r1", "r3"))
    assert not big.has_unfinished
    assert _free_everywhere(big)


def test_polls_per_step_do_not_grow_with_the_requests(big):
    """One client, 1 and then 24 concurrent requests: at most one poll answered per step
    (plus the few that time out or catch the last step), whatever the number of requests."""
    sampling = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)

    def polls_per_step(n: int) -> float:
        async def main():
            engine = AsyncEngine(big.local.core, big.executor, max_queued=100, pipelined=True)
            client = EngineClient(engine, big.tokenizer, big.local.info)
            steps0 = big.num_steps

            async def one(i: int) -> int:
                return sum(
                    [len(d.token_ids) async for d in client.stream(big.tokenizer.encode(f"prompt {i}"), sampling)]
                )

            assert await asyncio.gather(*(one(i) for i in range(n))) == [24] * n
            stats = engine.stats()
            await client.close()
            await _stop_when_idle(engine, big)
            return stats.polls / (stats.steps - steps0), stats.submit_calls

        return asyncio.run(main())

    (alone, _), (many, submits) = polls_per_step(1), polls_per_step(24)
    assert alone <= 1.2 and many <= 1.2, (alone, many)
    assert submits <= 2  # the 24 requests opened together went in one or two calls


def test_a_silent_client_has_its_requests_aborted(big, monkeypatch):
    """A client that submits and never polls again (its process died) loses its requests."""
    from raymoe.actors.engine import async_engine
    from raymoe.actors.engine.messages import NewRequest

    monkeypatch.setattr(async_engine, "_SILENCE_CHECK_S", 0.05)  # the abort comes after ~0.35 s, not ~1.3
    sampling = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)

    async def main():
        engine = AsyncEngine(big.local.core, big.executor, max_queued=100, pipelined=True, client_timeout_s=0.3)
        rejected = await engine.submit(
            "ghost", [NewRequest(i, big.tokenizer.encode(f"hello {i}"), sampling) for i in range(3)]
        )
        assert rejected == [] and big.has_unfinished
        await _stop_when_idle(engine, big)  # aborted, and the steps it had in flight collected

    steps = big.num_steps
    asyncio.run(main())
    assert 0 < big.num_steps - steps < 500, "the requests ran to their end: they were never aborted"
    assert _free_everywhere(big)


def test_a_client_back_from_idle_keeps_the_request_it_sends_before_its_next_poll(big):
    """An idle client stops polling (nothing to poll for); its next request reaches the engine
    before its next poll does. The silence check must not take it for a dead client: it did,
    and that request never got an answer."""
    from raymoe.actors.engine.messages import NewRequest

    sampling = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    async def main():
        engine = AsyncEngine(big.local.core, big.executor, max_queued=100, pipelined=True, client_timeout_s=0.3)
        await engine.poll("idle", timeout_s=0.0)  # it polled once, then went idle
        await asyncio.sleep(0.5)  # longer than the timeout
        assert await engine.submit("idle", [NewRequest(0, big.tokenizer.encode("back again"), sampling)]) == []
        await asyncio.sleep(0.05)  # steps run, and the silence check with them
        tokens = 0
        for _ in range(20):
            batch = await engine.poll("idle", timeout_s=1.0)
            assert batch.error is None and Finish.FAILED not in batch.finish
            tokens += int(batch.num_tokens.sum())
            if (batch.finish != Finish.RUNNING).any():  # its last entry
                break
        await _stop_when_idle(engine, big)
        return tokens

    assert asyncio.run(main()) == 8


def test_a_token_outside_the_vocabulary_is_refused_and_the_engine_goes_on(big):
    vocab = big.local.info.vocab_size
    for bad in ([1, vocab], [-1, 3], [1, 2**63]):
        with pytest.raises(ValueError, match="prompt_token_ids"):
            big.add_request("bad", bad, SamplingParams(max_tokens=2))
    assert not big.has_unfinished
    out = _run(big, {"ok": ([1, 2, 3], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))})
    assert len(out["ok"]["tokens"]) == 3


def test_a_failed_step_fails_started_requests_keeps_queued_ones_and_spends_the_restart_budget():
    """A step raises (as a dead rank's does): the requests that had run get FAILED with the
    reason, the queued ones run after the restart and give the tokens they give without any
    failure; past the restart budget the engine stays down, refuses new requests and releases
    its ranks. A health check that saw the same death just before costs no second restart
    (it did, and with a budget of one the engine went down)."""
    from raymoe.actors.engine.failures import RestartBudget
    from raymoe.actors.engine.messages import NewRequest, RejectKind

    engine_ = _engine(num_kv_blocks=512)
    core = engine_.local.core
    tok = engine_.tokenizer
    core.schedulers[0].max_num_seqs = 2  # two run, the rest wait
    sampling = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = {f"q{i}": tok.encode(f"queued {i}") for i in range(3)}
    reference = _run(engine_, {rid: (ids, sampling) for rid, ids in prompts.items()})
    calls, fail_at, restarts, releases, engines = [], {3}, [], [], []

    async def failing(inputs, keep, late_grammar=None):  # the steps in fail_at fail
        calls.append(1)
        if len(calls) in fail_at:
            engines[0].report_failure(RuntimeError("health: rank 1 died"))  # the same death, seen first
            raise RuntimeError("rank 1 died")
        return await engine_.executor.run_step_async(inputs, keep, late_grammar)

    async def restart() -> int:
        restarts.append(1)
        return core.schedulers[0].block_manager.num_blocks

    async def release() -> None:
        releases.append(1)

    async def main():
        executor = SimpleNamespace(run_step_async=failing)
        engine = AsyncEngine(
            core,
            executor,
            max_queued=100,
            pipelined=False,
            restart=restart,
            restart_budget=RestartBudget(1, 60.0),
            release=release,
        )
        engines.append(engine)
        client = EngineClient(engine, tok, engine_.local.info)

        async def one(ids):
            out = {"tokens": [], "text": "", "error": None}
            try:
                async for d in client.stream(ids, sampling):
                    out["tokens"] += d.token_ids
                    out["text"] += d.text
            except Exception as e:
                out["error"] = str(e)
            return out

        long = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
        running = [
            asyncio.create_task(one_long)
            for one_long in [_drain(client, tok.encode("run a"), long), _drain(client, tok.encode("run b"), long)]
        ]
        await asyncio.sleep(0)
        queued = [asyncio.create_task(one(ids)) for ids in prompts.values()]
        results = await asyncio.gather(*running, *queued)
        assert engine.num_restarts == 1 and engine.error is None and not releases
        fail_at.add(len(calls) + 2)  # a second failure is past the budget: down for good
        down = await one(tok.encode("after"))
        rejected = await engine.submit("late", [NewRequest(0, tok.encode("late"), sampling)])
        await client.close()
        return results, down, rejected, engine

    results, down, rejected, engine = asyncio.run(main())
    for r in results[:2]:
        assert r["error"] and "rank" not in r["error"] and "a step raised RuntimeError" in r["error"]
        assert len(r["tokens"]) < 50
    for rid, r in zip(prompts, results[2:]):
        assert r["error"] is None and r["tokens"] == reference[rid]["tokens"] and r["text"] == reference[rid]["text"]
    assert restarts == [1] and releases == [1]
    assert down["error"] and "failed while this request ran" in down["error"]
    assert rejected and rejected[0].kind is RejectKind.ENGINE_FAILED and "down" in rejected[0].message
    assert engine.stats().error == "a step raised RuntimeError"


def test_restarts_that_keep_failing_spend_the_budget_however_long_each_takes():
    from raymoe.actors.engine.failures import RestartBudget

    budget = RestartBudget(2, window_s=1e-6)  # each restart outlasts the window (a load timeout)
    for _ in range(2):
        assert budget.take()
        time.sleep(1e-3)
        budget.settle(succeeded=False)
    assert not budget.take()
    budget = RestartBudget(2, window_s=1e-6)
    for succeeded in (False, True, False, True, False):  # a success clears the failures before it
        assert budget.take()
        time.sleep(1e-3)
        budget.settle(succeeded)


async def _drain(client, ids, sampling):
    out = {"tokens": [], "text": "", "error": None}
    try:
        async for d in client.stream(ids, sampling):
            out["tokens"] += d.token_ids
    except Exception as e:
        out["error"] = str(e)
    return out


def test_a_short_request_is_not_stuck_behind_preempted_long_ones():
    """KV pressure: long requests preempt each other; a 2-token request arriving then starts
    in the gaps (bounded overtaking) instead of waiting for them all."""
    engine_ = _engine(num_kv_blocks=40)  # 160 token slots
    core, tok = engine_.local.core, engine_.tokenizer
    long = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    for i in range(4):
        core.add_request(f"long{i}", tok.encode(f"a long story number {i} begins"), long)
    steps = 0
    while core.num_preemptions == 0:
        core.step()
        steps += 1
        assert steps < 200, "the cache never ran short"
    core.add_request("short", tok.encode("hi"), SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    waited = 0
    while True:
        outs = core.step()
        waited += 1
        if any(o.request_id == "short" and o.finish != Finish.RUNNING for o in outs):
            break
        assert waited < 200
    unfinished_longs = sum(rid.startswith("long") for rid in core._replica)
    assert unfinished_longs >= 2 and waited <= 10, (waited, unfinished_longs)
    while core.has_unfinished:
        core.step()
    assert _free_everywhere(core)


def test_stop_ends_the_step_loop_cleanly_and_tells_the_clients(caplog):
    """Shutting down mid-stream: the loop task ends (nothing left pending), nothing is logged
    as a failed step, the stream ends with "shut down", and later requests are refused."""
    from raymoe.actors.engine.messages import NewRequest, RejectKind

    sampling = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    stopped = _engine(num_kv_blocks=64)  # stopped mid-step, it keeps a step in flight

    async def main():
        engine = AsyncEngine(stopped.local.core, stopped.executor, max_queued=100, pipelined=True)
        client = EngineClient(engine, stopped.tokenizer, stopped.local.info)
        tokens, error = [], None
        try:
            async for d in client.stream(stopped.tokenizer.encode("a long one"), sampling):
                tokens += d.token_ids
                if len(tokens) >= 3:
                    await engine.stop()
        except Exception as e:
            error = str(e)
        others = [t for t in asyncio.all_tasks() if "AsyncEngine" in t.get_coro().__qualname__]
        rejected = await engine.submit("late", [NewRequest(0, [1, 2], sampling)])
        await client.close()
        return tokens, error, others, rejected

    with caplog.at_level("ERROR"):
        tokens, error, others, rejected = asyncio.run(main())
    assert 3 <= len(tokens) < 200 and error and "shut down" in error
    assert not others, f"tasks left running: {others}"
    assert "engine step loop failed" not in caplog.text
    assert rejected and rejected[0].kind is RejectKind.ENGINE_FAILED and "shut down" in rejected[0].message


def test_more_messages_than_the_context_has_tokens_are_refused_before_rendering(big, monkeypatch):
    """Each message renders to a token at least: a conversation longer than the context is
    refused without running the template (900,000 one-letter messages held the ingress's
    event loop 6 s in the template)."""
    client = EngineClient(big.local, big.tokenizer, big.local.info)
    limit = big.local.info.token_limit

    def render(*args, **kwargs):
        raise AssertionError("the template ran")

    monkeypatch.setattr(big.tokenizer, "apply_chat_template", render)
    messages = [{"role": "user", "content": "a"}] * (limit + 1)
    with pytest.raises(APIError) as e:
        asyncio.run(client.tokenize_chat(messages))
    assert e.value.status == 400 and e.value.param == "messages" and e.value.code == "context_length_exceeded"
    with pytest.raises(APIError, match="the template ran"):  # at the limit it renders
        asyncio.run(client.tokenize_chat(messages[:limit]))


def test_a_chat_with_tools_or_template_kwargs_renders_off_the_event_loop(big, monkeypatch):
    """Tools of any size go into the template (24 MiB of them held the loop 4.4 s there); a
    short plain chat renders inline."""
    import threading

    client = EngineClient(big.local, big.tokenizer, big.local.info)
    where, render = [], big.tokenizer.apply_chat_template

    def spy(*args, **kwargs):
        where.append(threading.current_thread() is threading.main_thread())
        return render(*args, **kwargs)

    monkeypatch.setattr(big.tokenizer, "apply_chat_template", spy)
    messages = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    asyncio.run(client.tokenize_chat(messages))
    asyncio.run(client.tokenize_chat(messages, tools=[tool]))
    asyncio.run(client.tokenize_chat(messages, {"enable_thinking": False}))
    assert where == [True, False, False]


def test_many_short_prompts_of_one_request_encode_off_the_event_loop(big, monkeypatch):
    """Each prompt of a batch under INLINE_TEXT_CHARS was encoded on the event loop, one after
    the other: a 15 MiB body of 1,000 such texts held it (every stream of the replica) 7 s. A
    batch past that bound in all encodes in a thread, with the same ids and the same errors."""
    client = EngineClient(big.local, big.tokenizer, big.local.info)
    where, encode = [], big.tokenizer.encode

    def spy(*args, **kwargs):
        where.append(threading.current_thread() is threading.main_thread())
        return encode(*args, **kwargs)

    monkeypatch.setattr(big.tokenizer, "encode", spy)
    few = ["Hello there", [5, 6]]
    assert asyncio.run(client.tokenize_prompts(few)) == [encode("Hello there"), [5, 6]]
    assert where == [True]
    where.clear()
    many = ["ab " * (INLINE_TEXT_CHARS // 30)] * 12 + [[5, 6]]
    assert asyncio.run(client.tokenize_prompts(many)) == [encode(many[0])] * 12 + [[5, 6]]
    assert where == [False] * 12
    with pytest.raises(APIError) as e:
        asyncio.run(client.tokenize_prompts([*many, [big.local.info.vocab_size]]))
    assert e.value.status == 400 and e.value.param == "prompt" and "outside the vocabulary" in e.value.message


def test_a_request_whose_admission_raises_fails_alone(monkeypatch):
    """add_request raising something unexpected (a bug) refuses that request as an internal
    error; the others of its submit call run (it failed the whole call)."""
    fresh = _engine(num_kv_blocks=64)  # stopped below with a step maybe in flight
    ids = fresh.tokenizer.encode("Hello there")
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    core = fresh.local.core
    add = core.add_request

    def add_request(rid, prompt, sampling):
        if prompt == [7, 7, 7]:
            raise RecursionError("a bug")
        return add(rid, prompt, sampling)

    monkeypatch.setattr(core, "add_request", add_request)

    async def main():
        engine = AsyncEngine(core, fresh.executor, max_queued=100, pipelined=True)
        rejected = await engine.submit("c", [NewRequest(0, [7, 7, 7], params), NewRequest(1, ids, params)])
        tokens, deadline = [], time.monotonic() + 30
        while len(tokens) < 3 and time.monotonic() < deadline:
            batch = await engine.poll("c", 1.0)
            assert batch.error is None and batch.failure is None, (batch.error, batch.failure)
            tokens += [t for e in batch.entries() for t in e.token_ids]
        await engine.stop()
        return rejected, tokens

    rejected, tokens = asyncio.run(main())
    assert [(r.seq, r.kind) for r in rejected] == [(0, RejectKind.INTERNAL)]
    assert len(tokens) == 3
    assert engine_error(RequestRejected(RejectKind.INTERNAL, rejected[0].message)).status == 500


def test_a_stopped_engine_never_steps_again(big):
    """wake() after stop() (a rebalance asked for during shutdown) started the step loop again,
    which would run steps on ranks going away and recover by starting new ones."""
    ids = big.tokenizer.encode("Hello there")
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)

    async def main():
        engine = AsyncEngine(big.local.core, big.executor, max_queued=100, pipelined=True)
        await engine.stop()
        steps = big.local.core.num_steps
        engine.wake()
        engine.report_failure(RuntimeError("a rank died"))
        rejected = await engine.submit("c", [NewRequest(0, ids, params)])
        await asyncio.sleep(0.2)
        return engine, steps, rejected

    engine, steps, rejected = asyncio.run(main())
    assert engine._loop_task is None and big.local.core.num_steps == steps
    assert [r.kind for r in rejected] == [RejectKind.ENGINE_FAILED] and not big.has_unfinished


def test_warm_up_steps_stay_within_the_models_positions(tmp_path):
    """The warm-up steps that compile a GPU's kernels (run here on CPU) take up to the step's
    token budget, which may pass the model's positions: one sequence of them indexed rotary
    rows past the table (on a GPU an assert, or FlashInfer reading past it). They are split
    into sequences of at most max_model_len tokens."""
    from model_zoo import write_checkpoint

    from raymoe.actors.engine.step import warmup_token_counts

    path = write_checkpoint("qwen3_moe", tmp_path / "ckpt", max_position_embeddings=64)
    config = config_from_dict(
        {
            "model": {"path": str(path), "dtype": "float32"},
            "engine": {"num_kv_blocks": 16, "block_size": 16, "max_num_batched_tokens": 200, "max_num_seqs": 2},
        }
    )
    runner = build_local_engine(config, num_threads=1).core.executor.runner
    assert runner.max_model_len == 64
    # up to 2 sequences of 64 tokens: no step takes more than 128 of the budget's 200
    assert runner.compile_step_kernels() == len(warmup_token_counts(128))


def test_flashinfer_attention_is_refused_for_head_dims_its_kernels_lack():
    """FlashInfer's prefill failed inside its kernel at head_dim 32 (an invalid configuration)
    and aborted the process at 12 (a GPU fuzz of model configs): the backend is refused first,
    so auto runs torch attention."""
    pytest.importorskip("triton")
    from raymoe.actors.engine.attention_flashinfer import check_head_dim

    for ok in (64, 128, 256):
        check_head_dim(ok)
    for bad in (12, 32, 96):
        with pytest.raises(ValueError, match=f"head_dim 64, 128, 256, not {bad}"):
            check_head_dim(bad)
