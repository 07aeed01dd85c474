"""benchmarks/engine_bench.py's step builders and timers against the engine they time, on the
CPU (the script itself runs on GPUs only, where a stale call costs device time: it once
called ModelRunner.collect with an argument the runner no longer took)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_engine_local import _engine

_PATH = Path(__file__).parents[2] / "benchmarks" / "engine_bench.py"
_spec = importlib.util.spec_from_file_location("engine_bench", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

BLOCK = 16


@pytest.fixture(scope="module")
def ctx():
    engine = _engine(num_kv_blocks=64, block_size=BLOCK, max_num_batched_tokens=64)
    return SimpleNamespace(state={"runner": engine.local.core.executor.runner}, device=torch.device("cpu"))


def test_prefill_cases_parse_and_count_their_blocks():
    p = bench.Prefill.parse("3x40@32")
    assert p == bench.Prefill(3, 40, 32) and str(p) == "3 x 40 after 32 cached"
    assert bench.Prefill.parse("8x4096") == bench.Prefill(8, 4096, 0)
    # 2 shared blocks of cached prefix, then each sequence's 72 positions take 3 more of its own
    assert p.blocks(BLOCK) == 2 + 3 * 3
    step = bench.prefill_step(p, BLOCK, (p.seqs * p.tokens,), 512)
    assert step.num_chunks == 3


def test_decode_and_cached_prefill_steps_run_through_the_timers(ctx):
    vocab = ctx.state["runner"].spec.vocab_size
    decode = bench.decode_step(4, 40, BLOCK, 0, (4,))
    times = bench.time_step(ctx, decode, 2)
    assert 0 < times["median_s"] and 0 < times["pipelined_s"]
    touched = bench.touched_bytes(ctx, decode)
    assert touched["experts"] > 0 and touched["kv"] > 0 and touched["weights"] > 0

    cached = bench.Prefill(2, 8, cached=2 * BLOCK)
    step = bench.prefill_step(cached, BLOCK, (16,), vocab)
    assert 0 < bench.time_step(ctx, step, 2, False)["median_s"]
    kv_read = bench.touched_bytes(ctx, step)["kv"]
    fresh = bench.prefill_step(bench.Prefill(2, 8), BLOCK, (16,), vocab)
    assert kv_read > bench.touched_bytes(ctx, fresh)["kv"], "the cached prefix is attended to"
