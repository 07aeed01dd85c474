"""Steps in flight, through EngineCore: a step scheduled before the one before it is applied
runs on that step's pending tokens (the ranks take them from their last sampling), apply
brings them; requests whose pending token is their last are not scheduled again."""

import numpy as np

from raymoe.actors.engine.block_manager import BlockManager
from raymoe.actors.engine.core import EngineCore
from raymoe.actors.engine.delivery import TokenOutput
from raymoe.actors.engine.messages import Finish
from raymoe.actors.engine.request import PENDING_TOKEN, RequestStatus, SamplingParams
from raymoe.actors.engine.scheduler import Scheduler
from raymoe.actors.engine.step import StepOutput


def _engine(num_blocks: int = 16) -> EngineCore:
    sched = Scheduler(BlockManager(num_blocks, 4), max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    return EngineCore([sched], eos_token_ids=(), vocab_size=100)


def _add(core: EngineCore, rid: str, prompt: list[int], max_tokens: int) -> None:
    core.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0))


def _tokens(*tokens: int) -> list[StepOutput]:
    return [StepOutput(tokens=np.array(tokens, dtype=np.int64))]


def _scheduled(planned) -> list[str]:
    """The requests a step samples, in row order."""
    return [req.request_id for req, _ in planned.pending[0]]


def test_next_step_runs_on_the_pending_token():
    core = _engine()
    _add(core, "a", [5, 6, 7], max_tokens=8)
    first = core.schedule()
    ((req, index),) = first.pending[0]
    assert req.output_token_ids == [PENDING_TOKEN] and index == 0 and req.num_computed_tokens == 3
    second = core.schedule()  # before the first step's token is known
    (step,) = second.inputs
    assert step.token_ids.tolist() == [PENDING_TOKEN] and step.start_pos.tolist() == [3]
    assert step.sample.tolist() == [True]
    assert step.prev_rows.tolist() == [0]  # the token is row 0 of the step before, on the ranks
    assert step.output_index.tolist() == [1]  # the pending token counts: seeds draw as if it were known
    assert core.apply(first, _tokens(42)) == [TokenOutput("a", 42, Finish.RUNNING, cached_tokens=0)]
    assert req.output_token_ids == [42, PENDING_TOKEN] and req.num_computed_tokens == 4
    assert core.apply(second, _tokens(43)) == [TokenOutput("a", 43, Finish.RUNNING)]
    (step,) = core.schedule().inputs
    assert step.token_ids.tolist() == [43] and step.start_pos.tolist() == [4] and step.prev_rows.tolist() == [-1]


def test_a_pending_last_token_is_not_scheduled_again():
    core = _engine()
    _add(core, "short", [1, 2], max_tokens=1)
    _add(core, "long", [3, 4], max_tokens=5)
    first = core.schedule()
    nxt = core.schedule()
    assert _scheduled(nxt) == ["long"]  # "short" ends with its pending token
    got = core.apply(first, _tokens(9, 10))
    assert got == [
        TokenOutput("short", 9, Finish.LENGTH, cached_tokens=0),
        TokenOutput("long", 10, Finish.RUNNING, cached_tokens=0),
    ]
    bm = core.schedulers[0].block_manager
    assert bm.num_free_blocks == bm.num_blocks - 1  # "long" holds one


def test_apply_skips_requests_that_ended_meanwhile():
    core = _engine()
    for rid in "abc":
        _add(core, rid, [1, 2, 3], max_tokens=4)
    planned = core.schedule()
    core.abort("b")
    got = core.apply(planned, _tokens(7, 8, 9))
    assert got == [
        TokenOutput("a", 7, Finish.RUNNING, cached_tokens=0),
        TokenOutput("c", 9, Finish.RUNNING, cached_tokens=0),
    ]


def test_a_request_short_of_blocks_takes_them_from_one_that_is_ending():
    core = _engine(num_blocks=3)
    _add(core, "ending", [1, 2, 3, 4], max_tokens=1)  # one block; its first output is its last
    _add(core, "long", [5, 6, 7, 8, 9, 10, 11, 12], max_tokens=2)  # two blocks now, a third next
    first = core.schedule()
    ending = first.pending[0][0][0]
    sched = core.schedulers[0]
    assert sched.block_manager.num_free_blocks == 0
    nxt = core.schedule()  # "long" needs a block while "ending" waits for its last token
    assert _scheduled(nxt) == ["long"] and core.num_preemptions == 1 and ending.status is RequestStatus.WAITING
    got = core.apply(first, _tokens(13, 14))
    assert got == [
        TokenOutput("ending", 13, Finish.LENGTH, cached_tokens=0),
        TokenOutput("long", 14, Finish.RUNNING, cached_tokens=0),
    ]
    assert ending.output_token_ids == [13]
    assert sched.num_running == 1 and sched.num_waiting == 0
