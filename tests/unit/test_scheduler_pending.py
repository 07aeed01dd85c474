"""Scheduler with a step in flight: advance() leaves the sampled tokens pending, the next
schedule() already runs on them, fill() brings them; requests whose pending token is
their last are not scheduled again."""
from raymoe.actors.engine.block_manager import BlockManager
from raymoe.actors.engine.request import PENDING_TOKEN, Request, SamplingParams
from raymoe.actors.engine.scheduler import Scheduler


def _scheduler(num_blocks: int = 16) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, 4), max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)


def _request(rid: str, prompt: list[int], max_tokens: int) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0), seed=1, arrival=0.0)


def test_next_step_runs_on_the_pending_token():
    sched = _scheduler()
    sched.add(_request("a", [5, 6, 7], max_tokens=8))
    first = sched.schedule()
    pending = sched.advance(first)
    (req, index), = pending
    assert req.output_token_ids == [PENDING_TOKEN] and index == 0 and req.num_computed_tokens == 3
    second = sched.schedule()  # before the first step's token is known
    (chunk,) = second.chunks
    assert chunk.token_ids == (PENDING_TOKEN,) and chunk.start_pos == 3 and chunk.sample
    assert chunk.num_output_tokens == 1  # the pending token counts: seeds draw as if it were known
    assert sched.fill(pending, [42]) == [(req, 0, 0)]
    assert req.output_token_ids == [42]
    sched.advance(second)
    assert req.output_token_ids == [42, PENDING_TOKEN] and req.num_computed_tokens == 4


def test_a_pending_last_token_is_not_scheduled_again():
    sched = _scheduler()
    sched.add(_request("short", [1, 2], max_tokens=1))
    sched.add(_request("long", [3, 4], max_tokens=5))
    pending = sched.advance(sched.schedule())
    nxt = sched.schedule()
    assert [c.request_id for c in nxt.chunks] == ["long"]  # "short" ends with its pending token
    got = sched.fill(pending, [9, 10])
    assert [(r.request_id, i) for r, i, _ in got] == [("short", 0), ("long", 0)]
    sched.finish("short", "length")
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks - 1  # "long" holds one


def test_fill_skips_requests_that_ended_meanwhile():
    sched = _scheduler()
    for rid in "abc":
        sched.add(_request(rid, [1, 2, 3], max_tokens=4))
    pending = sched.advance(sched.schedule())
    sched.abort("b")
    got = sched.fill(pending, [7, 8, 9])
    assert [(r.request_id, row) for r, _, row in got] == [("a", 0), ("c", 2)]
    assert [r.output_token_ids for r, _, _ in got] == [[7], [9]]


def test_update_is_advance_then_fill():
    one, two = _scheduler(), _scheduler()
    for s in (one, two):
        s.add(_request("a", [1, 2, 3, 4, 5], max_tokens=3))
    out_one, out_two = one.schedule(), two.schedule()
    assert out_one == out_two
    got = one.update(out_one, {"a": 11})
    two.fill(two.advance(out_two), [11])
    r1, r2 = got[0], two.schedule().chunks[0]
    assert r1.output_token_ids == [11] and r2.token_ids == (11,) and r2.start_pos == 5


def test_a_request_short_of_blocks_takes_them_from_one_that_is_ending():
    sched = Scheduler(BlockManager(3, 4), max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    sched.add(_request("ending", [1, 2, 3, 4], max_tokens=1))  # one block; its first output is its last
    sched.add(_request("long", [5, 6, 7, 8, 9, 10, 11, 12], max_tokens=2))  # two blocks now, a third next
    pending = sched.advance(sched.schedule())
    assert sched.block_manager.num_free_blocks == 0
    nxt = sched.schedule()  # "long" needs a block while "ending" waits for its last token
    assert [c.request_id for c in nxt.chunks] == ["long"] and nxt.preempted == ("ending",)
    got = sched.fill(pending, [13, 14])
    assert [(r.request_id, r.output_token_ids) for r, _, _ in got] == [("ending", [13]), ("long", [14])]
    sched.finish("ending", "length")  # what the engine's stop check does next
    assert sched.num_running == 1 and sched.num_waiting == 0
