"""Scheduler: continuous batching, chunked prefill, recompute preemption, aborts, no leaks.

A fake runner keeps a real (token-valued) paged KV cache: it writes each chunk's tokens
into the slots its block table names and computes the next token from what it reads back
through the block table. A wrong table, a block shared by two live requests, or a bad
resume therefore shows up as a wrong token, checked against `reference_output`, which
runs the same fake model on a plain list with no scheduler at all.
"""

import math
import random
from dataclasses import dataclass

import pytest

from raymoe.actors.engine.block_manager import BlockManager
from raymoe.actors.engine.request import Request, RequestStatus, SamplingParams
from raymoe.actors.engine.scheduler import MAX_OVERTAKES, Scheduler, SchedulerOutput

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


class FakeRunner:
    def __init__(self, num_blocks, block_size):
        self.block_size = block_size
        self.kv = [[None] * block_size for _ in range(num_blocks)]

    def step(self, out: SchedulerOutput):
        bs = self.block_size
        for c in out.chunks:  # every write lands before any read, as in one batched forward
            for pos, tok in enumerate(c.token_ids, start=c.start_pos):
                self.kv[c.block_ids[pos // bs]][pos % bs] = tok
        sampled = {}
        for c in out.chunks:
            if c.sample:
                ctx = [self.kv[c.block_ids[p // bs]][p % bs] for p in range(c.start_pos + len(c.token_ids))]
                sampled[c.request_id] = fake_next(ctx, c.seed)
        return sampled


@dataclass
class Spec:
    rid: str
    prompt: list
    max_tokens: int
    eos: frozenset = frozenset()
    seed: int = 0
    arrive_step: int = 0


def make_request(spec, arrival):
    return Request(spec.rid, list(spec.prompt), SamplingParams(max_tokens=spec.max_tokens), seed=spec.seed,
                   arrival=arrival, eos_token_ids=spec.eos)


def make_sched(num_blocks, block_size, max_num_seqs=8, budget=64, max_model_len=1000):
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len), bm


def check_schedule(sched, bm, out, live):
    """Invariants right after schedule(); `live` maps id -> every unfinished request."""
    assert out.num_tokens <= sched.max_num_batched_tokens and out.num_tokens == sum(len(c.token_ids) for c in out.chunks)
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
    assert all(r.overtook for r in running if waiting and r.arrival > min(waiting)), "FCFS / newest-first preemption broken"
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
    if req.output_token_ids[-1] in req.eos_token_ids:
        return "stop"
    if len(req.output_token_ids) >= req.sampling.max_tokens:
        return "length"
    return None


def run_engine(specs, sched, bm, rng=None, abort_prob=0.0, max_steps=5000):
    """Drive schedule -> fake model -> update -> stop checks until every request ends."""
    runner = FakeRunner(bm.num_blocks, bm.block_size)
    pending, live, ended, aborted = sorted(specs, key=lambda s: s.arrive_step), {}, {}, set()
    step = 0
    while pending or sched.has_unfinished:
        while pending and pending[0].arrive_step <= step:
            req = make_request(pending.pop(0), arrival=float(len(live) + len(ended)))
            sched.add(req)
            live[req.request_id] = req
        out = sched.schedule()
        check_schedule(sched, bm, out, live)
        if rng is not None and live and rng.random() < abort_prob:  # abort between schedule and update
            rid = rng.choice(sorted(live))
            assert sched.abort(rid) is live[rid] and not live[rid].block_ids
            ended[rid] = live.pop(rid)
            aborted.add(rid)
        got = sched.update(out, runner.step(out))
        assert all(c.request_id in {r.request_id for r in got} for c in out.chunks if c.sample and c.request_id in live)
        check_blocks(bm, live, {})
        for req in got:
            reason = stop_reason(req)
            if reason:
                assert sched.finish(req.request_id, reason) is req and req.is_finished
                ended[req.request_id] = live.pop(req.request_id)
        step += 1
        assert step < max_steps, "scheduler made no progress"
    assert not live and bm.num_free_blocks == bm.num_blocks and bm.usage == 0.0
    return ended, aborted


def random_specs(rng, n, max_prompt, max_out):
    return [
        Spec(f"r{i}", [rng.randrange(VOCAB) for _ in range(rng.randint(1, max_prompt))], rng.randint(1, max_out),
             eos=frozenset(rng.sample(range(VOCAB), rng.choice([0, 1, 3]))), seed=rng.randrange(1000),
             arrive_step=rng.randint(0, 12))
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

    big, _ = run_engine(specs, *make_sched(1000, block_size, **kwargs))
    tight, _ = run_engine(specs, *make_sched(tight_blocks, block_size, **kwargs))
    for s in specs:
        expect = reference_output(s.prompt, s.max_tokens, s.eos, s.seed)
        assert big[s.rid].output_token_ids == expect
        assert tight[s.rid].output_token_ids == expect  # preemption + recompute changes nothing
        assert tight[s.rid].finish_reason == ("stop" if expect[-1] in s.eos else "length")
    assert sum(r.num_preemptions for r in big.values()) == 0
    assert sum(r.num_preemptions for r in tight.values()) > 0, "the tight cache never preempted"

    chaos, aborted = run_engine(specs, *make_sched(tight_blocks, block_size, **kwargs), rng=rng, abort_prob=0.15)
    assert aborted
    for s in specs:
        req = chaos[s.rid]
        expect = reference_output(s.prompt, s.max_tokens, s.eos, s.seed)
        if s.rid in aborted:
            assert req.finish_reason == "abort" and req.output_token_ids == expect[: len(req.output_token_ids)]
        else:
            assert req.output_token_ids == expect


def test_chunked_prefill_splits_a_long_prompt():
    sched, bm = make_sched(num_blocks=64, block_size=4, budget=8)
    prompt = list(range(3, 40))  # 37 tokens
    req = make_request(Spec("long", prompt, max_tokens=3), arrival=0.0)
    sched.add(req)
    runner, starts, seen = FakeRunner(64, 4), [], []
    while not req.output_token_ids:
        out = sched.schedule()
        check_schedule(sched, bm, out, {"long": req})
        (chunk,) = out.chunks
        starts.append(chunk.start_pos)
        seen += chunk.token_ids
        assert chunk.sample == (chunk.start_pos + len(chunk.token_ids) == len(prompt))
        sched.update(out, runner.step(out))
        assert len(req.block_ids) == math.ceil(req.num_computed_tokens / 4)
    assert starts == [0, 8, 16, 24, 32] and seen == prompt
    out = sched.schedule()  # then a one-token decode of the sampled token
    assert [(c.start_pos, c.token_ids, c.sample) for c in out.chunks] == [(37, tuple(req.output_token_ids), True)]


def test_prefill_chunk_takes_the_budget_left_after_decodes():
    sched, bm = make_sched(num_blocks=64, block_size=4, budget=8)
    runner = FakeRunner(64, 4)
    a = make_request(Spec("a", [1, 2], max_tokens=50), arrival=0.0)
    sched.add(a)
    out = sched.schedule()
    sched.update(out, runner.step(out))
    b = make_request(Spec("b", list(range(20)), max_tokens=2), arrival=1.0)
    sched.add(b)
    sizes = []
    while not b.output_token_ids:
        out = sched.schedule()
        check_schedule(sched, bm, out, {"a": a, "b": b})
        assert out.chunks[0].request_id == "a" and len(out.chunks[0].token_ids) == 1  # the decode goes first
        sizes.append(len(out.chunks[1].token_ids))
        sched.update(out, runner.step(out))
    assert sizes == [7, 7, 6]
    assert a.output_token_ids == reference_output([1, 2], 50, (), 0)[: len(a.output_token_ids)]


def _step(sched, runner, reqs):
    """One engine step with invariant checks; `reqs` may include finished requests."""
    out = sched.schedule()
    check_schedule(sched, sched.block_manager, out, {k: r for k, r in reqs.items() if not r.is_finished})
    for req in sched.update(out, runner.step(out)):
        if stop_reason(req):
            sched.finish(req.request_id, stop_reason(req))
    return out


def test_preemption_takes_the_newest_and_resume_recomputes_prompt_plus_outputs():
    sched, bm = make_sched(num_blocks=4, block_size=2)
    runner = FakeRunner(4, 2)
    a = make_request(Spec("a", [5, 6, 7], max_tokens=4), arrival=0.0)
    b = make_request(Spec("b", [8, 9, 10], max_tokens=4), arrival=1.0)
    sched.add(a), sched.add(b)
    _step(sched, runner, {"a": a, "b": b})
    _step(sched, runner, {"a": a, "b": b})
    out = _step(sched, runner, {"a": a, "b": b})  # a needs a third block; the cache is full
    assert out.preempted == ("b",) and [c.request_id for c in out.chunks] == ["a"]
    assert (b.status, b.num_computed_tokens, b.block_ids, b.num_preemptions) == (RequestStatus.WAITING, 0, [], 1)
    assert len(b.output_token_ids) == 2  # outputs survive preemption
    while not a.is_finished:
        out = _step(sched, runner, {"a": a, "b": b})
        assert [c.request_id for c in out.chunks] == ["a"]
    out = _step(sched, runner, {"b": b})
    (chunk,) = out.chunks
    assert chunk.start_pos == 0 and list(chunk.token_ids) == b.prompt_token_ids + b.output_token_ids[:2]
    assert chunk.sample and chunk.num_output_tokens == 2
    while not b.is_finished:
        _step(sched, runner, {"b": b})
    assert a.output_token_ids == reference_output([5, 6, 7], 4, (), 0)
    assert b.output_token_ids == reference_output([8, 9, 10], 4, (), 0)
    assert bm.num_free_blocks == 4


def test_request_preempts_itself_when_it_is_the_newest():
    sched, bm = make_sched(num_blocks=8, block_size=1)
    runner = FakeRunner(8, 1)
    reqs = {r: make_request(Spec(r, [i + 1], max_tokens=5), arrival=float(i)) for i, r in enumerate("abcd")}
    for req in reqs.values():
        sched.add(req)
    _step(sched, runner, reqs)
    _step(sched, runner, reqs)
    assert bm.num_free_blocks == 0
    out = _step(sched, runner, reqs)  # a evicts d, b takes the freed block, c finds none and evicts itself
    assert out.preempted == ("d", "c") and [c.request_id for c in out.chunks] == ["a", "b"]
    first_seen = []
    while sched.has_unfinished:
        out = _step(sched, runner, reqs)
        first_seen += [c.request_id for c in out.chunks if c.request_id in "cd" and c.request_id not in first_seen]
    assert first_seen == ["c", "d"]  # waiting keeps arrival order after preemption
    for i, r in enumerate("abcd"):
        assert reqs[r].output_token_ids == reference_output([i + 1], 5, (), 0)
    assert bm.num_free_blocks == 8


def test_a_short_request_overtakes_a_head_that_does_not_fit():
    sched, bm = make_sched(num_blocks=6, block_size=4)
    runner = FakeRunner(6, 4)
    reqs = {
        "a": make_request(Spec("a", list(range(8)), max_tokens=2), arrival=0.0),  # 2 blocks
        "b": make_request(Spec("b", list(range(20)), max_tokens=1), arrival=1.0),  # 5 blocks: waits for a
        "c": make_request(Spec("c", [1, 2], max_tokens=3), arrival=2.0),  # 1 block for its whole life: overtakes b
        "d": make_request(Spec("d", list(range(9)), max_tokens=8), arrival=3.0),  # 4 blocks in all: must wait
    }
    for req in reqs.values():
        sched.add(req)
    out = _step(sched, runner, reqs)
    assert [c.request_id for c in out.chunks] == ["a", "c"] and sched.num_waiting == 2
    assert reqs["c"].overtook and reqs["b"].num_overtaken == 1 and not reqs["d"].overtook
    order = ["a", "c"]
    while sched.has_unfinished:
        out = _step(sched, runner, reqs)
        order += [c.request_id for c in out.chunks if c.request_id not in order]
    assert order == ["a", "c", "b", "d"]  # d, which could not finish in the free blocks, kept its place


def test_overtaking_one_head_is_bounded():
    """Short requests keep coming while a long one waits for blocks: MAX_OVERTAKES of them start
    before it, then it goes first."""
    sched, bm = make_sched(num_blocks=10, block_size=4, max_num_seqs=64, budget=1000)
    runner = FakeRunner(10, 4)
    reqs = {"hog": make_request(Spec("hog", list(range(20)), max_tokens=8), arrival=0.0)}  # 5 blocks, 7 at its end
    reqs["long"] = make_request(Spec("long", list(range(24)), max_tokens=4), arrival=1.0)  # 6 blocks: waits for hog
    for i in range(MAX_OVERTAKES + 5):
        reqs[f"s{i}"] = make_request(Spec(f"s{i}", [1, 2], max_tokens=2), arrival=2.0 + i)  # 1 block each
    for req in reqs.values():
        sched.add(req)
    started = []
    while "long" not in started:
        out = _step(sched, runner, reqs)
        started += [c.request_id for c in out.chunks if c.request_id not in started]
    before_long = [r for r in started[: started.index("long")] if r.startswith("s")]
    # (a small one preempted by the hog's growth and started again overtakes twice)
    preempted_smalls = sum(reqs[r].num_preemptions for r in before_long)
    assert reqs["long"].num_overtaken == MAX_OVERTAKES
    assert MAX_OVERTAKES - preempted_smalls <= len(before_long) <= MAX_OVERTAKES


def test_max_num_seqs_caps_each_step():
    sched, bm = make_sched(num_blocks=100, block_size=4, max_num_seqs=2)
    runner = FakeRunner(100, 4)
    reqs = {f"r{i}": make_request(Spec(f"r{i}", [i], max_tokens=3), arrival=float(i)) for i in range(5)}
    for req in reqs.values():
        sched.add(req)
    out = _step(sched, runner, reqs)
    assert [c.request_id for c in out.chunks] == ["r0", "r1"]
    while sched.has_unfinished:
        assert len(_step(sched, runner, reqs).chunks) <= 2


def test_abort_frees_blocks_when_waiting_running_or_mid_prefill():
    sched, bm = make_sched(num_blocks=16, block_size=2, budget=6)
    runner = FakeRunner(16, 2)
    dec = make_request(Spec("dec", [1, 2, 3], max_tokens=9), arrival=0.0)
    sched.add(dec)
    _step(sched, runner, {"dec": dec})
    pre = make_request(Spec("pre", list(range(12)), max_tokens=2), arrival=1.0)
    wait = make_request(Spec("wait", [4], max_tokens=2), arrival=2.0)
    sched.add(pre), sched.add(wait)
    _step(sched, runner, {"dec": dec, "pre": pre, "wait": wait})
    assert dec.status is RequestStatus.RUNNING and dec.output_token_ids and dec.block_ids
    assert pre.status is RequestStatus.RUNNING and 0 < pre.num_computed_tokens < 12 and pre.block_ids
    assert wait.status is RequestStatus.WAITING
    for req in (wait, pre, dec):
        used = bm.num_blocks - bm.num_free_blocks
        held = len(req.block_ids)
        assert sched.abort(req.request_id) is req
        assert (req.status, req.finish_reason, req.block_ids) == (RequestStatus.FINISHED, "abort", [])
        assert bm.num_blocks - bm.num_free_blocks == used - held
        assert sched.abort(req.request_id) is None  # a second abort is a no-op
    assert not sched.has_unfinished and bm.num_free_blocks == 16
    assert sched.abort("never-added") is None


def test_abort_between_schedule_and_update_is_skipped():
    sched, bm = make_sched(num_blocks=16, block_size=2)
    a = make_request(Spec("a", [1, 2, 3], max_tokens=4), arrival=0.0)
    b = make_request(Spec("b", [4, 5], max_tokens=4), arrival=1.0)
    sched.add(a), sched.add(b)
    out = sched.schedule()
    sched.abort("a")
    got = sched.update(out, {"a": 7, "b": 8})
    assert got == [b] and b.output_token_ids == [8] and a.output_token_ids == []
    assert bm.num_free_blocks == 16 - len(b.block_ids)


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


def test_finish_and_update_check_their_arguments():
    sched, bm = make_sched(num_blocks=8, block_size=2)
    a = make_request(Spec("a", [1, 2, 3], max_tokens=4), arrival=0.0)
    sched.add(a)
    out = sched.schedule()
    with pytest.raises(ValueError, match=r"^sampled: .*'a'"):
        sched.update(out, {})
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
    sched, bm = make_sched(num_blocks=5, block_size=1, budget=3)
    runner = FakeRunner(5, 1)
    reqs = {"a": make_request(Spec("a", [1], max_tokens=5), 0.0), "b": make_request(Spec("b", [2, 3], max_tokens=3), 1.0)}
    sched.add(reqs["a"]), sched.add(reqs["b"])
    _step(sched, runner, reqs)
    _step(sched, runner, reqs)
    out = _step(sched, runner, reqs)  # a evicts b, which frees 3 blocks for a's 1; b would fit a 2-token chunk
    assert out.preempted == ("b",) and [c.request_id for c in out.chunks] == ["a"] and bm.num_free_blocks == 2
    while sched.has_unfinished:
        _step(sched, runner, reqs)
    assert reqs["a"].output_token_ids == reference_output([1], 5, (), 0)
    assert reqs["b"].output_token_ids == reference_output([2, 3], 3, (), 0)
