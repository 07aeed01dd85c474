"""Scheduler: continuous batching, chunked prefill, recompute preemption, aborts, no leaks.

Driven through EngineCore, as the engine drives it: add_request, then each step
schedule (and advance), the executor, apply (fill, then the engine's stop checks, which
finish requests). The scheduler is the real one, watched: it keeps the requests the engine
hands it and checks the invariants right after each of its schedule() calls.

The executor is a fake model with a real (token-valued) paged KV cache: it writes each
chunk's tokens into the slots its block table names and computes the next token from what
it reads back through the block table. A wrong table, a block shared by two live requests,
or a bad resume therefore shows up as a wrong token, checked against `reference_output`,
which runs the same fake model on a plain list with no scheduler at all.
"""

import math
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pytest

from raymoe.actors.engine.block_manager import BlockManager
from raymoe.actors.engine.core import EngineCore
from raymoe.actors.engine.delivery import TokenOutput
from raymoe.actors.engine.messages import Finish
from raymoe.actors.engine.request import PENDING_TOKEN, Request, RequestStatus, SamplingParams
from raymoe.actors.engine.scheduler import MAX_OVERTAKES, Scheduler, SchedulerOutput
from raymoe.actors.engine.step import StepInput, StepOutput

VOCAB = 97


def fake_next(tokens, seed):
    """Deterministic stand-in for a model: an order-sensitive hash of the whole context."""
    h = seed
    for t in tokens:
        h = (h * 31 + t + 1) % 1_000_003
    return h % VOCAB


def reference_output(prompt, max_tokens, eos, seed):
    tokens, out = list(prompt), []
    while True:
        out.append(fake_next(tokens, seed))
        tokens.append(out[-1])
        if out[-1] in eos or len(out) == max_tokens:
            return out


class FakeModel:
    """The executor: one replica's steps, run to completion, on the fake model."""

    def __init__(self, num_blocks, block_size):
        self.block_size = block_size
        self.kv = [[None] * block_size for _ in range(num_blocks)]

    def __call__(self, inputs: Sequence[StepInput]) -> list[StepOutput]:
        (step,) = inputs
        assert (step.prev_rows < 0).all(), "a step run to completion has no pending tokens"
        bs, tables, starts = self.block_size, step.block_tables, step.start_pos.tolist()
        ends = np.cumsum(step.query_lens).tolist()
        chunks = [step.token_ids[end - n : end].tolist() for end, n in zip(ends, step.query_lens.tolist())]
        # every write lands before any read, as in one batched forward
        for table, start, tokens in zip(tables, starts, chunks):
            for pos, tok in enumerate(tokens, start=start):
                self.kv[table[pos // bs]][pos % bs] = tok
        sampled = []
        for i in np.flatnonzero(step.sample):
            ctx = [self.kv[tables[i][p // bs]][p % bs] for p in range(starts[i] + len(chunks[i]))]
            sampled.append(fake_next(ctx, int(step.seed[i])))
        return [StepOutput(tokens=np.array(sampled, dtype=np.int64))]


class WatchedScheduler(Scheduler):
    """The real scheduler, keeping every request the engine adds (``requests``) and the
    last ``schedule()`` output (``last``), and checking the invariants after each schedule."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.requests: dict[str, Request] = {}
        self.last: SchedulerOutput | None = None

    def add(self, req: Request) -> None:
        super().add(req)
        self.requests[req.request_id] = req

    def schedule(self) -> SchedulerOutput:
        self.last = super().schedule()
        check_schedule(self, self.block_manager, self.last, self.live())
        return self.last

    def live(self) -> dict[str, Request]:
        return {rid: r for rid, r in self.requests.items() if not r.is_finished}


@dataclass
class Spec:
    rid: str
    prompt: list
    max_tokens: int
    eos: frozenset = frozenset()
    seed: int = 0
    arrive_step: int = 0


def sampling(spec):
    # a request's own EOS ids are its stop_token_ids: the engine's stop checks treat both alike
    return SamplingParams(max_tokens=spec.max_tokens, seed=spec.seed, stop_token_ids=tuple(sorted(spec.eos)))


def make_request(spec, arrival):
    return Request(spec.rid, list(spec.prompt), sampling(spec), seed=spec.seed, arrival=arrival)


def make_sched(num_blocks, block_size, max_num_seqs=8, budget=64, max_model_len=1000):
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len), bm


def make_engine(num_blocks, block_size, max_num_seqs=8, budget=64, max_model_len=1000):
    """(EngineCore over a watched scheduler and the fake model, that scheduler)."""
    sched = WatchedScheduler(
        BlockManager(num_blocks, block_size),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        max_model_len=max_model_len,
    )
    return EngineCore([sched], eos_token_ids=(), executor=FakeModel(num_blocks, block_size), vocab_size=VOCAB), sched


def add(core, spec) -> Request:
    core.add_request(spec.rid, spec.prompt, sampling(spec))
    return core.schedulers[0].requests[spec.rid]


def check_schedule(sched, bm, out, live):
    """Invariants right after schedule(); `live` maps id -> every unfinished request."""
    assert out.num_tokens <= sched.max_num_batched_tokens and out.num_tokens == sum(
        len(c.token_ids) for c in out.chunks
    )
    assert len(out.chunks) <= sched.max_num_seqs and sched.num_running <= sched.max_num_seqs
    scheduled = {}
    for c in out.chunks:
        req = live[c.request_id]
        assert c.request_id not in scheduled and req.status is RequestStatus.RUNNING
        assert c.start_pos == req.num_computed_tokens and len(c.token_ids) >= 1
        assert list(c.token_ids) == req.all_token_ids[c.start_pos : c.start_pos + len(c.token_ids)]
        assert c.sample == (c.start_pos + len(c.token_ids) == req.num_tokens)
        assert c.block_ids == tuple(req.block_ids) and c.seed == req.seed
        assert c.num_output_tokens == len(req.output_token_ids)
        scheduled[c.request_id] = len(c.token_ids)
    for rid in out.preempted:
        assert live[rid].status is RequestStatus.WAITING and rid not in scheduled
    check_blocks(bm, live, scheduled)
    running = [r for r in live.values() if r.status is RequestStatus.RUNNING]
    waiting = [r.arrival for r in live.values() if r.status is RequestStatus.WAITING]
    # FCFS and newest-first preemption: a running request younger than a waiting one overtook it
    assert all(r.overtook for r in running if waiting and r.arrival > min(waiting)), (
        "FCFS / newest-first preemption broken"
    )
    assert all(r.num_overtaken <= MAX_OVERTAKES for r in live.values())
    assert (sched.num_running, sched.num_waiting) == (len(running), len(waiting))


def check_blocks(bm, live, scheduled):
    owned = []
    for rid, req in live.items():
        tokens = req.num_computed_tokens + scheduled.get(rid, 0)
        assert len(req.block_ids) == math.ceil(tokens / bm.block_size), rid
        if req.status is RequestStatus.WAITING:
            assert req.num_computed_tokens == 0 and not req.block_ids
        owned += req.block_ids
    assert len(owned) == len(set(owned)), "a block is owned by two requests"
    assert all(0 <= b < bm.num_blocks for b in owned)
    assert bm.num_blocks - bm.num_free_blocks == len(owned)


def stop_reason(req):
    if req.output_token_ids[-1] in req.sampling.stop_token_ids:
        return "stop"
    if len(req.output_token_ids) >= req.sampling.max_tokens:
        return "length"
    return None


def check_outputs(sched, outputs: list[TokenOutput], sampled: set[str]) -> None:
    """After apply: every request in ``sampled`` got its token, and the engine's stop checks
    ended exactly the requests that stop_reason ends."""
    assert [o.request_id for o in outputs] == [c.request_id for c in sched.last.chunks if c.request_id in sampled]
    for o in outputs:
        req = sched.requests[o.request_id]
        assert req.output_token_ids[-1] == o.token and o.finish.reason == stop_reason(req)
        assert req.is_finished == (o.finish is not Finish.RUNNING) and req.finish_reason == o.finish.reason


def run_engine(specs, core, sched, rng=None, abort_prob=0.0, max_steps=5000):
    """Drive the engine (schedule -> fake model -> apply with its stop checks) until every request ends."""
    bm = sched.block_manager
    pending, aborted = sorted(specs, key=lambda s: s.arrive_step), set()
    step = 0
    while pending or core.has_unfinished:
        while pending and pending[0].arrive_step <= step:
            add(core, pending.pop(0))
        planned = core.schedule()
        live = sched.live()
        if rng is not None and live and rng.random() < abort_prob:  # abort between schedule and apply
            rid = rng.choice(sorted(live))
            assert core.abort(rid) and not live[rid].block_ids and live[rid].finish_reason == "abort"
            aborted.add(rid)
        if planned is not None:
            sampled = {c.request_id for c in sched.last.chunks if c.sample} - aborted
            check_outputs(sched, core.apply(planned, core.executor(planned.inputs)), sampled)
        check_blocks(bm, sched.live(), {})
        step += 1
        assert step < max_steps, "scheduler made no progress"
    assert not sched.live() and bm.num_free_blocks == bm.num_blocks and bm.usage == 0.0
    return sched.requests, aborted


def random_specs(rng, n, max_prompt, max_out):
    return [
        Spec(
            f"r{i}",
            [rng.randrange(VOCAB) for _ in range(rng.randint(1, max_prompt))],
            rng.randint(1, max_out),
            eos=frozenset(rng.sample(range(VOCAB), rng.choice([0, 1, 3]))),
            seed=rng.randrange(1000),
            arrive_step=rng.randint(0, 12),
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("seed", range(8))
def test_random_workload_matches_reference_and_never_leaks(seed):
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 8])
    specs = random_specs(rng, n=14, max_prompt=30, max_out=20)
    longest = max(len(s.prompt) + s.max_tokens - 1 for s in specs)
    tight_blocks = math.ceil(longest / block_size) + rng.randint(0, 2)  # barely fits the longest request
    kwargs = dict(max_num_seqs=rng.randint(2, 8), budget=rng.choice([7, 16, 32]), max_model_len=64)

    big, _ = run_engine(specs, *make_engine(1000, block_size, **kwargs))
    tight, _ = run_engine(specs, *make_engine(tight_blocks, block_size, **kwargs))
    for s in specs:
        expect = reference_output(s.prompt, s.max_tokens, s.eos, s.seed)
        assert big[s.rid].output_token_ids == expect
        assert tight[s.rid].output_token_ids == expect  # preemption + recompute changes nothing
        assert tight[s.rid].finish_reason == ("stop" if expect[-1] in s.eos else "length")
    assert sum(r.num_preemptions for r in big.values()) == 0
    assert sum(r.num_preemptions for r in tight.values()) > 0, "the tight cache never preempted"

    chaos, aborted = run_engine(specs, *make_engine(tight_blocks, block_size, **kwargs), rng=rng, abort_prob=0.15)
    assert aborted
    for s in specs:
        req = chaos[s.rid]
        expect = reference_output(s.prompt, s.max_tokens, s.eos, s.seed)
        if s.rid in aborted:
            tokens = req.output_token_ids
            if tokens and tokens[-1] == PENDING_TOKEN:
                tokens = tokens[:-1]  # aborted with its step in flight: that token never came
            assert req.finish_reason == "abort" and tokens == expect[: len(tokens)]
        else:
            assert req.output_token_ids == expect


def test_chunked_prefill_splits_a_long_prompt():
    core, sched = make_engine(num_blocks=64, block_size=4, budget=8)
    prompt = list(range(3, 40))  # 37 tokens
    req = add(core, Spec("long", prompt, max_tokens=3))
    starts, seen = [], []
    while not req.output_token_ids:
        core.step()
        (chunk,) = sched.last.chunks
        starts.append(chunk.start_pos)
        seen += chunk.token_ids
        assert chunk.sample == (chunk.start_pos + len(chunk.token_ids) == len(prompt))
        assert len(req.block_ids) == math.ceil(req.num_computed_tokens / 4)
    assert starts == [0, 8, 16, 24, 32] and seen == prompt
    sampled = tuple(req.output_token_ids)
    core.schedule()  # then a one-token decode of the sampled token
    assert [(c.start_pos, c.token_ids, c.sample) for c in sched.last.chunks] == [(37, sampled, True)]


def test_prefill_chunk_takes_the_budget_left_after_decodes():
    core, sched = make_engine(num_blocks=64, block_size=4, budget=8)
    a = add(core, Spec("a", [1, 2], max_tokens=50))
    core.step()
    b = add(core, Spec("b", list(range(20)), max_tokens=2))
    sizes = []
    while not b.output_token_ids:
        core.step()
        out = sched.last
        assert out.chunks[0].request_id == "a" and len(out.chunks[0].token_ids) == 1  # the decode goes first
        sizes.append(len(out.chunks[1].token_ids))
    assert sizes == [7, 7, 6]
    assert a.output_token_ids == reference_output([1, 2], 50, (), 0)[: len(a.output_token_ids)]


def _step(core) -> SchedulerOutput:
    """One engine step (the watched scheduler checks its invariants); what it scheduled."""
    core.step()
    return core.schedulers[0].last


def test_preemption_takes_the_newest_and_resume_recomputes_prompt_plus_outputs():
    core, sched = make_engine(num_blocks=4, block_size=2)
    a = add(core, Spec("a", [5, 6, 7], max_tokens=4))
    b = add(core, Spec("b", [8, 9, 10], max_tokens=4))
    _step(core)
    _step(core)
    out = _step(core)  # a needs a third block; the cache is full
    assert out.preempted == ("b",) and [c.request_id for c in out.chunks] == ["a"]
    assert (b.status, b.num_computed_tokens, b.block_ids, b.num_preemptions) == (RequestStatus.WAITING, 0, [], 1)
    assert len(b.output_token_ids) == 2  # outputs survive preemption
    while not a.is_finished:
        out = _step(core)
        assert [c.request_id for c in out.chunks] == ["a"]
    out = _step(core)
    (chunk,) = out.chunks
    assert chunk.start_pos == 0 and list(chunk.token_ids) == b.prompt_token_ids + b.output_token_ids[:2]
    assert chunk.sample and chunk.num_output_tokens == 2
    while not b.is_finished:
        _step(core)
    assert a.output_token_ids == reference_output([5, 6, 7], 4, (), 0)
    assert b.output_token_ids == reference_output([8, 9, 10], 4, (), 0)
    assert sched.block_manager.num_free_blocks == 4


def test_request_preempts_itself_when_it_is_the_newest():
    core, sched = make_engine(num_blocks=8, block_size=1)
    bm = sched.block_manager
    reqs = {r: add(core, Spec(r, [i + 1], max_tokens=5)) for i, r in enumerate("abcd")}
    _step(core)
    _step(core)
    assert bm.num_free_blocks == 0
    out = _step(core)  # a evicts d, b takes the freed block, c finds none and evicts itself
    assert out.preempted == ("d", "c") and [c.request_id for c in out.chunks] == ["a", "b"]
    first_seen = []
    while core.has_unfinished:
        out = _step(core)
        first_seen += [c.request_id for c in out.chunks if c.request_id in "cd" and c.request_id not in first_seen]
    assert first_seen == ["c", "d"]  # waiting keeps arrival order after preemption
    for i, r in enumerate("abcd"):
        assert reqs[r].output_token_ids == reference_output([i + 1], 5, (), 0)
    assert bm.num_free_blocks == 8


def test_a_short_request_overtakes_a_head_that_does_not_fit():
    core, sched = make_engine(num_blocks=6, block_size=4)
    reqs = {
        "a": add(core, Spec("a", list(range(8)), max_tokens=2)),  # 2 blocks
        "b": add(core, Spec("b", list(range(20)), max_tokens=1)),  # 5 blocks: waits for a
        "c": add(core, Spec("c", [1, 2], max_tokens=3)),  # 1 block for its whole life: overtakes b
        "d": add(core, Spec("d", list(range(9)), max_tokens=8)),  # 4 blocks in all: must wait
    }
    out = _step(core)
    assert [c.request_id for c in out.chunks] == ["a", "c"] and sched.num_waiting == 2
    assert reqs["c"].overtook and reqs["b"].num_overtaken == 1 and not reqs["d"].overtook
    order = ["a", "c"]
    while core.has_unfinished:
        out = _step(core)
        order += [c.request_id for c in out.chunks if c.request_id not in order]
    assert order == ["a", "c", "b", "d"]  # d, which could not finish in the free blocks, kept its place


def test_overtaking_one_head_is_bounded():
    """Short requests keep coming while a long one waits for blocks: MAX_OVERTAKES of them start
    before it, then it goes first."""
    core, sched = make_engine(num_blocks=10, block_size=4, max_num_seqs=64, budget=1000)
    reqs = {"hog": add(core, Spec("hog", list(range(20)), max_tokens=8))}  # 5 blocks, 7 at its end
    reqs["long"] = add(core, Spec("long", list(range(24)), max_tokens=4))  # 6 blocks: waits for hog
    for i in range(MAX_OVERTAKES + 5):
        reqs[f"s{i}"] = add(core, Spec(f"s{i}", [1, 2], max_tokens=2))  # 1 block each
    started = []
    while "long" not in started:
        out = _step(core)
        started += [c.request_id for c in out.chunks if c.request_id not in started]
    before_long = [r for r in started[: started.index("long")] if r.startswith("s")]
    # (a small one preempted by the hog's growth and started again overtakes twice)
    preempted_smalls = sum(reqs[r].num_preemptions for r in before_long)
    assert reqs["long"].num_overtaken == MAX_OVERTAKES
    assert MAX_OVERTAKES - preempted_smalls <= len(before_long) <= MAX_OVERTAKES


def test_max_num_seqs_caps_each_step():
    core, sched = make_engine(num_blocks=100, block_size=4, max_num_seqs=2)
    for i in range(5):
        add(core, Spec(f"r{i}", [i], max_tokens=3))
    out = _step(core)
    assert [c.request_id for c in out.chunks] == ["r0", "r1"]
    while core.has_unfinished:
        assert len(_step(core).chunks) <= 2


def test_abort_frees_blocks_when_waiting_running_or_mid_prefill():
    core, sched = make_engine(num_blocks=16, block_size=2, budget=6)
    bm = sched.block_manager
    dec = add(core, Spec("dec", [1, 2, 3], max_tokens=9))
    _step(core)
    pre = add(core, Spec("pre", list(range(12)), max_tokens=2))
    wait = add(core, Spec("wait", [4], max_tokens=2))
    _step(core)
    assert dec.status is RequestStatus.RUNNING and dec.output_token_ids and dec.block_ids
    assert pre.status is RequestStatus.RUNNING and 0 < pre.num_computed_tokens < 12 and pre.block_ids
    assert wait.status is RequestStatus.WAITING
    for req in (wait, pre, dec):
        used = bm.num_blocks - bm.num_free_blocks
        held = len(req.block_ids)
        assert core.abort(req.request_id)
        assert (req.status, req.finish_reason, req.block_ids) == (RequestStatus.FINISHED, "abort", [])
        assert bm.num_blocks - bm.num_free_blocks == used - held
        assert not core.abort(req.request_id)  # a second abort is a no-op
    assert not core.has_unfinished and not sched.has_unfinished and bm.num_free_blocks == 16
    assert not core.abort("never-added")


def test_abort_between_schedule_and_apply_is_skipped():
    core, sched = make_engine(num_blocks=16, block_size=2)
    a = add(core, Spec("a", [1, 2, 3], max_tokens=4))
    b = add(core, Spec("b", [4, 5], max_tokens=4))
    planned = core.schedule()
    core.abort("a")
    got = core.apply(planned, [StepOutput(tokens=np.array([7, 8]))])
    assert got == [TokenOutput("b", 8, Finish.RUNNING, cached_tokens=0)]
    assert b.output_token_ids == [8] and a.output_token_ids == [PENDING_TOKEN]  # a's token never came
    assert sched.block_manager.num_free_blocks == 16 - len(b.block_ids)


def test_add_rejects_what_could_never_run():
    sched, _ = make_sched(num_blocks=4, block_size=4, max_model_len=20)
    with pytest.raises(ValueError, match=r"^prompt_token_ids: .*max_model_len=20"):
        sched.add(make_request(Spec("x", [1] * 21, max_tokens=1), 0.0))
    with pytest.raises(ValueError, match=r"^max_tokens: .*max_tokens <= 5"):
        sched.add(make_request(Spec("x", [1] * 15, max_tokens=6), 0.0))
    with pytest.raises(ValueError, match=r"^max_tokens: .*needs 5 KV blocks .* has 4"):
        sched.add(make_request(Spec("x", [1] * 16, max_tokens=2), 0.0))
    sched.add(make_request(Spec("x", [1] * 16, max_tokens=1), 0.0))  # exactly fills the cache
    with pytest.raises(ValueError, match=r"^request_id: 'x' is already"):
        sched.add(make_request(Spec("x", [1], max_tokens=1), 1.0))
    assert sched.num_waiting == 1


def test_finish_checks_its_arguments():
    sched, bm = make_sched(num_blocks=8, block_size=2)
    a = make_request(Spec("a", [1, 2, 3], max_tokens=4), arrival=0.0)
    sched.add(a)
    sched.schedule()
    with pytest.raises(ValueError, match=r"^reason:"):
        sched.finish("a", "done")
    with pytest.raises(ValueError, match=r"^request_id:"):
        sched.finish("zzz", "stop")
    assert sched.finish("a", "length") is a and a.finish_reason == "length"
    assert bm.num_free_blocks == 8 and not sched.has_unfinished


@pytest.mark.parametrize("name", ["max_num_seqs", "max_num_batched_tokens", "max_model_len"])
def test_constructor_rejects_non_positive_limits(name):
    kwargs = dict(max_num_seqs=1, max_num_batched_tokens=1, max_model_len=1)
    kwargs[name] = 0
    with pytest.raises(ValueError, match=f"^{name}:"):
        Scheduler(BlockManager(4, 4), **kwargs)


def test_no_admission_in_a_step_that_preempted():
    # Re-admitting the victim with the blocks it just gave up would only thrash.
    core, sched = make_engine(num_blocks=5, block_size=1, budget=3)
    reqs = {"a": add(core, Spec("a", [1], max_tokens=5)), "b": add(core, Spec("b", [2, 3], max_tokens=3))}
    _step(core)
    _step(core)
    out = _step(core)  # a evicts b, which frees 3 blocks for a's 1; b would fit a 2-token chunk
    assert out.preempted == ("b",) and [c.request_id for c in out.chunks] == ["a"]
    assert sched.block_manager.num_free_blocks == 2
    while core.has_unfinished:
        _step(core)
    assert reqs["a"].output_token_ids == reference_output([1], 5, (), 0)
    assert reqs["b"].output_token_ids == reference_output([2, 3], 3, (), 0)


def test_a_request_starts_only_with_room_for_its_whole_prompt():
    # A long prompt whose first chunk fits but the rest does not: started on one chunk's
    # blocks, it was preempted at its next chunk (it is the newest) and started again the
    # step after, recomputing its prompt over and over until the old request was done.
    core, sched = make_engine(num_blocks=10, block_size=4, budget=8)
    a = add(core, Spec("a", list(range(25)), max_tokens=4))  # 7 blocks, all its life
    while not a.output_token_ids:
        _step(core)
    b = add(core, Spec("b", list(range(40, 64)), max_tokens=1))  # 6 blocks; 3 are free until a ends
    prompt_chunks = []
    while core.has_unfinished:
        out = _step(core)
        assert not out.preempted
        prompt_chunks += [(c.start_pos, len(c.token_ids)) for c in out.chunks if c.request_id == "b"]
    assert b.num_preemptions == 0 and prompt_chunks == [(0, 8), (8, 8), (16, 8)]
    assert a.output_token_ids == reference_output(list(range(25)), 4, (), 0)
    assert b.output_token_ids == reference_output(list(range(40, 64)), 1, (), 0)
