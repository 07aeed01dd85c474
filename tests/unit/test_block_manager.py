"""BlockManager: block arithmetic, deterministic hand-out, no sharing, no double free."""

import math
import random

import pytest

from raymoe.actors.engine.block_manager import BlockManager
from raymoe.actors.engine.request import Request, SamplingParams


def make_req(rid: str) -> Request:
    return Request(rid, [1], SamplingParams(), seed=0, arrival=0.0)


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_blocks_needed_is_ceil_minus_held(block_size):
    bm = BlockManager(num_blocks=64, block_size=block_size)
    req = make_req("a")
    for held_tokens in range(0, 40, 7):
        bm.free(req)
        bm.allocate(req, held_tokens)
        assert len(req.block_ids) == math.ceil(held_tokens / block_size)
        for after in range(0, 60):
            expect = max(0, math.ceil(after / block_size) - math.ceil(held_tokens / block_size))
            assert bm.blocks_needed(req, after) == expect
            assert bm.can_allocate(req, after) == (expect <= bm.num_free_blocks)


def test_fresh_manager_hands_out_lowest_ids_then_reuses_last_freed():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b, c = make_req("a"), make_req("b"), make_req("c")
    bm.allocate(a, 9)  # 3 blocks
    bm.allocate(b, 4)  # 1 block
    assert a.block_ids == [0, 1, 2] and b.block_ids == [3]
    bm.allocate(a, 12)  # still 3 blocks: nothing new
    assert a.block_ids == [0, 1, 2]
    bm.free(a)
    assert a.block_ids == []
    bm.allocate(c, 16)  # LIFO: a's blocks come back first, in a's order, then fresh ones
    assert c.block_ids == [0, 1, 2, 4]


def test_allocate_beyond_free_raises_and_changes_nothing():
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = make_req("a"), make_req("b")
    bm.allocate(a, 5)  # 3 blocks
    assert not bm.can_allocate(b, 3)
    with pytest.raises(ValueError, match="num_tokens_after"):
        bm.allocate(b, 3)
    assert b.block_ids == [] and bm.num_free_blocks == 1
    bm.allocate(b, 2)
    assert bm.num_free_blocks == 0 and bm.usage == 1.0


def test_double_free_and_foreign_free_are_caught():
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = make_req("a"), make_req("b")
    bm.allocate(a, 4)
    stale = list(a.block_ids)
    bm.free(a)
    a.block_ids.extend(stale)  # a table that still names blocks already returned
    with pytest.raises(AssertionError):
        bm.free(a)
    bm2 = BlockManager(num_blocks=4, block_size=2)
    bm2.allocate(a := make_req("a"), 2)
    b.block_ids.extend(a.block_ids)  # b claims a's block
    with pytest.raises(AssertionError):
        bm2.free(b)


def test_usage_and_counts():
    bm = BlockManager(num_blocks=10, block_size=1)
    assert (bm.num_blocks, bm.block_size, bm.num_free_blocks, bm.usage) == (10, 1, 10, 0.0)
    a = make_req("a")
    bm.allocate(a, 4)
    assert bm.num_free_blocks == 6 and bm.usage == pytest.approx(0.4)


@pytest.mark.parametrize("num_blocks, block_size", [(0, 4), (4, 0), (-1, 1)])
def test_constructor_rejects_bad_sizes(num_blocks, block_size):
    with pytest.raises(ValueError, match="num_blocks|block_size"):
        BlockManager(num_blocks, block_size)


@pytest.mark.parametrize("seed", range(5))
def test_random_grow_and_free_never_shares_or_leaks(seed):
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=rng.randint(4, 40), block_size=rng.randint(1, 8))
    reqs = [make_req(f"r{i}") for i in range(6)]
    tokens = {r.request_id: 0 for r in reqs}  # reference: tokens each request's cache holds
    for _ in range(400):
        req = rng.choice(reqs)
        if rng.random() < 0.25:
            bm.free(req)
            tokens[req.request_id] = 0
        else:
            after = tokens[req.request_id] + rng.randint(1, 3 * bm.block_size)
            if bm.can_allocate(req, after):
                bm.allocate(req, after)
                tokens[req.request_id] = after
            else:
                with pytest.raises(ValueError):
                    bm.allocate(req, after)
        owned = [b for r in reqs for b in r.block_ids]
        assert len(owned) == len(set(owned)), "a block is owned twice"
        assert all(0 <= b < bm.num_blocks for b in owned)
        for r in reqs:
            assert len(r.block_ids) == math.ceil(tokens[r.request_id] / bm.block_size)
        assert bm.num_free_blocks == bm.num_blocks - len(owned)
    for r in reqs:
        bm.free(r)
    assert bm.num_free_blocks == bm.num_blocks and bm.usage == 0.0
