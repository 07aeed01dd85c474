"""Prefix caching: outputs equal with it on and off (greedy and seeded; prompts sharing no,
some and all full blocks; chunked prefill; forced preemption; pipelined steps), the block
accounting stays sound under random load (no block freed or evicted while held, holders
back to none, the evictable pool never holds a block in use), and with dp = 2 requests
that share a prefix land on one replica and reuse its blocks."""

from __future__ import annotations

import random

import pytest
from test_engine_local import Engine, _pipelined, _run
from test_engine_local import _engine as local_engine

from raymoe.actors.engine.block_manager import BlockManager
from raymoe.actors.engine.core import EngineCore
from raymoe.actors.engine.request import PENDING_TOKEN, Request, SamplingParams
from raymoe.actors.engine.scheduler import Scheduler

BLOCK = 4


def _engine(prefix_caching: bool, num_kv_blocks: int = 512, budget: int = 64) -> Engine:
    return local_engine(num_kv_blocks, BLOCK, budget, prefix_caching=prefix_caching)


def _shared_prompts(rng: random.Random) -> dict[str, list[int]]:
    """Prompts sharing no, part of one, and all full blocks with each other."""
    base = [rng.randrange(3, 500) for _ in range(6 * BLOCK)]
    return {
        "alone": [rng.randrange(3, 500) for _ in range(13)],
        "base": base + [7, 8],
        "some": base[: 3 * BLOCK] + [rng.randrange(3, 500) for _ in range(9)],
        "all": list(base),  # every full block cached: still computes its last token
        "longer": base + [rng.randrange(3, 500) for _ in range(2 * BLOCK + 1)],
        "again": base + [7, 8],
    }


SAMPLINGS = [
    SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True),
]


def _staggered(engine: Engine, prompts: dict[str, list[int]], sampling: SamplingParams) -> dict:
    """The first request alone (its blocks get cached), then the rest together."""
    first, *rest = prompts
    out = _run(engine, {first: (prompts[first], sampling)})
    out.update(_run(engine, {rid: (prompts[rid], sampling) for rid in rest}))
    return out


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "seeded"])
@pytest.mark.parametrize(
    "num_kv_blocks,budget", [(512, 64), (512, 6), (24, 64)], ids=["plain", "chunked", "preempting"]
)
def test_outputs_equal_with_caching_on_and_off(sampling, num_kv_blocks, budget):
    prompts = _shared_prompts(random.Random(1))
    ordered = dict(sorted(prompts.items(), key=lambda kv: kv[0] != "base"))  # base first: its blocks get cached
    off = _staggered(_engine(False, num_kv_blocks, budget), ordered, sampling)
    cached = _engine(True, num_kv_blocks, budget)
    on = _staggered(cached, ordered, sampling)
    assert on == off
    hits = sum(s.block_manager.num_cached_tokens for s in cached.local.core.schedulers)
    assert hits >= 6 * BLOCK  # at least one request reused base's blocks
    if num_kv_blocks == 24:  # the small cache preempts, and evicts cached blocks
        assert cached.local.core.num_preemptions > 0
        assert sum(s.block_manager.num_evictions for s in cached.local.core.schedulers) > 0
    for s in cached.local.core.schedulers:
        assert s.block_manager.num_free_blocks == s.block_manager.num_blocks  # all released


def test_pipelined_outputs_equal_with_caching_on_and_off():
    prompts = _shared_prompts(random.Random(2))
    sampling = SAMPLINGS[1]
    requests = {rid: (ids, sampling) for rid, ids in prompts.items()}
    off = _pipelined(_engine(False, budget=8), requests)
    on = _pipelined(_engine(True, budget=8), requests)
    assert {r: v["tokens"] for r, v in on.items()} == {r: v["tokens"] for r, v in off.items()}


def test_block_accounting_stays_sound_under_random_load():
    """Random requests over a few shared prefixes through a small cache, stepped with
    pipelined-style pending tokens, aborts and finishes; invariants checked every step."""
    rng = random.Random(0)
    bm = BlockManager(48, BLOCK, prefix_caching=True)
    sched = Scheduler(bm, max_num_seqs=6, max_num_batched_tokens=20, max_model_len=200)
    prefixes = [[rng.randrange(3, 99) for _ in range(rng.randrange(4, 30))] for _ in range(4)]
    live, n = {}, 0

    def check():
        held = {b: h for b, h in bm._holders.items()}
        for req in list(sched._running) + list(sched._waiting):
            for b in req.block_ids:
                assert req.request_id in held[b], f"{req.request_id} lists block {b} it does not hold"
        assert not set(bm._free) & set(held) and not set(bm._evictable) & set(held)
        assert len(bm._free) + len(bm._evictable) + len(held) == bm.num_blocks
        for key, block in bm._block_of.items():
            assert bm._key_of[block] == key

    for _ in range(400):
        if rng.random() < 0.4 and len(live) < 12:
            prompt = rng.choice(prefixes) + [rng.randrange(3, 99) for _ in range(rng.randrange(1, 10))]
            req = Request(f"r{n}", prompt, SamplingParams(max_tokens=rng.randrange(1, 20)), seed=n, arrival=float(n))
            sched.add(req)
            live[req.request_id], n = req, n + 1
        out = sched.schedule()
        pending = sched.advance(out)
        check()
        got = sched.fill(pending, [rng.randrange(3, 99) for _ in pending])
        for req, _, _ in got:
            if len(req.output_token_ids) >= req.sampling.max_tokens:
                sched.finish(req.request_id, "length")
                del live[req.request_id]
        if live and rng.random() < 0.05:
            rid = rng.choice(sorted(live))
            sched.abort(rid)
            del live[rid]
        check()
    for rid in list(live):
        sched.abort(rid)
    assert not bm._holders and bm.num_free_blocks == bm.num_blocks
    assert bm.num_cached_tokens > 0 and bm.num_evictions > 0  # the load did share and evict


def _drive(core: EngineCore, steps: int) -> None:
    """Run the schedulers with made-up tokens (no model): enough for cache accounting."""
    for _ in range(steps):
        for sched in core.schedulers:
            out = sched.schedule()
            for req, _, _ in sched.fill(sched.advance(out), [11] * sum(c.sample for c in out.chunks)):
                if len(req.output_token_ids) >= req.sampling.max_tokens:
                    sched.finish(req.request_id, "length")
                    core._replica.pop(req.request_id)


def test_dp_routing_sends_a_shared_prefix_to_one_replica():
    rng = random.Random(3)
    schedulers = [
        Scheduler(BlockManager(400, 16, prefix_caching=True), 16, 1024, 2048),
        Scheduler(BlockManager(400, 16, prefix_caching=True), 16, 1024, 2048),
    ]
    core = EngineCore(schedulers, eos_token_ids=[], vocab_size=1000)
    groups = {g: [rng.randrange(3, 999) for _ in range(300)] for g in "ab"}
    sampling = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    placed: dict[str, set[int]] = {"a": set(), "b": set()}
    for i in range(12):  # interleaved: a, b, a, b, ...
        g = "ab"[i % 2]
        core.add_request(f"{g}{i}", groups[g] + [rng.randrange(3, 999) for _ in range(20)], sampling)
        placed[g].add(core._replica[f"{g}{i}"])
        _drive(core, 1)
    _drive(core, 20)
    assert all(len(p) == 1 for p in placed.values()) and placed["a"] != placed["b"]
    hits = sum(s.block_manager.num_cached_tokens for s in schedulers)
    reusable = 10 * (300 // 16) * 16  # every request but each group's first could reuse 18 blocks
    assert hits >= 0.9 * reusable, (hits, reusable)


def test_prompt_logprobs_are_computed_not_shared():
    """A request asking for prompt logprobs recomputes a cached prefix (its logits are needed)."""
    prompts = _shared_prompts(random.Random(4))
    plain = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    engine = _engine(True)
    _run(engine, {"base": (prompts["base"], plain)})
    bm = engine.local.core.schedulers[0].block_manager
    before = bm.num_cached_tokens
    asking = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=1)
    _run(engine, {"again": (prompts["again"], asking)})
    assert bm.num_cached_tokens == before
    _run(engine, {"again2": (prompts["again"], plain)})
    assert bm.num_cached_tokens > before


def test_a_one_step_request_leaves_its_blocks_cached():
    """A request that ends in its first step (prefill + one token) still shares its blocks."""
    prompts = _shared_prompts(random.Random(5))
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    engine = _engine(True)
    _run(engine, {"base": (prompts["base"], one)})
    _run(engine, {"again": (prompts["again"], one)})
    bm = engine.local.core.schedulers[0].block_manager
    assert bm.num_cached_tokens == (len(prompts["again"]) - 1) // BLOCK * BLOCK


def test_pending_outputs_are_never_keyed_nor_looked_up():
    """A request whose last outputs are still pending (pipelined steps) keys and looks up only
    the blocks of tokens it knows."""
    bm = BlockManager(16, BLOCK, prefix_caching=True)
    req = Request("r", list(range(3, 3 + 2 * BLOCK)), SamplingParams(max_tokens=8), seed=0, arrival=0.0)
    bm.allocate(req, 3 * BLOCK)
    req.output_token_ids = [9] * (BLOCK - 1) + [PENDING_TOKEN]  # the third block ends in a pending token
    req.num_computed_tokens = 3 * BLOCK
    bm.register_computed(req)
    assert len(bm._block_of) == 2  # the third block waits for its token
    waiting = Request("w", req.prompt_token_ids, SamplingParams(max_tokens=8), seed=1, arrival=1.0)
    waiting.output_token_ids = [9] * (BLOCK - 1) + [PENDING_TOKEN]
    blocks, next_key = bm.cached_prefix(waiting)
    assert blocks == req.block_ids[:2] and next_key is None


def test_first_token_reports_the_cached_prompt_tokens():
    """Each request's first output says how many prompt tokens the cache gave (the OpenAI
    usage's cached_tokens), later ones say nothing; a preempted request keeps its first count."""
    prompts = _shared_prompts(random.Random(6))
    sampling = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    engine = _engine(True)
    core = engine.local.core
    reported: dict[str, list] = {}

    def run(rids: list[str]) -> None:
        for rid in rids:
            core.add_request(rid, prompts[rid], sampling)
        while core.has_unfinished:
            for o in core.step():
                reported.setdefault(o.request_id, []).append(o.cached_tokens)

    run(["base"])
    run(["again", "some", "alone"])
    full = lambda n: n // BLOCK * BLOCK  # noqa: E731
    assert reported["base"] == [0, None, None]
    assert reported["again"] == [full(len(prompts["again"]) - 1), None, None]
    assert reported["some"] == [3 * BLOCK, None, None]
    assert reported["alone"] == [0, None, None]
