"""How the Triton decode attention cuts a batch's sequences into parts (plan_parts): every
token in exactly one part, no part empty or longer than the batch's chunk, never more parts
than the fixed grid of a CUDA graph holds (max_parts), and a long sequence spread out
whatever the batch size."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("triton")

from raymoe.actors.engine.decode_attention_triton import TARGET_PROGRAMS, max_parts, plan_parts  # noqa: E402


def _parts(lens, kv_heads, step, target=TARGET_PROGRAMS) -> list[int]:
    _, first, _ = plan_parts(np.array(lens), kv_heads=kv_heads, step=step, target_programs=target)
    return np.diff(first).tolist()


@pytest.mark.parametrize("seed", range(40))
def test_parts_cover_each_sequence_within_the_grid(seed):
    rng = np.random.default_rng(seed)
    batch = int(rng.integers(1, 300))
    kv_heads, step = int(rng.choice([1, 2, 4, 8])), int(rng.choice([64, 128]))
    target = int(rng.choice([1, 132, 264, 1000]))
    # mostly short sequences, some very long ones
    lens = np.where(rng.random(batch) < 0.1, rng.integers(1, 200_000, batch), rng.integers(1, 3000, batch))
    part_len, first, part_seq = plan_parts(lens, kv_heads=kv_heads, step=step, target_programs=target)
    parts = np.diff(first)
    assert first[0] == 0 and (parts >= 1).all()
    assert first[-1] <= max_parts(batch, kv_heads, target)
    assert (part_len % step == 0).all()
    # the parts [s * part_len, min((s + 1) * part_len, len)) cover [0, len), the last one not empty
    assert ((parts - 1) * part_len < lens).all() and (parts * part_len >= lens).all()
    chunk = max(step, -(-int(lens.sum()) * kv_heads // target))
    assert part_len.max() <= -(-chunk // step) * step
    assert part_seq.tolist() == np.repeat(np.arange(batch), parts).tolist()


def test_the_batch_sizes_the_engine_step_was_measured_at_keep_their_parts():
    # a batch that fills the GPU: one part each, nothing to merge
    assert _parts([1024] * 64, kv_heads=4, step=128) == [1] * 64
    assert _parts([1024] * 256, kv_heads=4, step=128) == [1] * 256
    # one sequence of 1,024 tokens: 16 parts of one step each
    assert _parts([1024], kv_heads=4, step=64) == [16]
    assert _parts([1024] * 8, kv_heads=4, step=64) == [8] * 8


def test_a_long_sequence_is_spread_over_the_gpu_at_any_batch_size():
    # alone: about TARGET_PROGRAMS / kv_heads parts
    assert _parts([32768], kv_heads=4, step=64) == [64]
    # beside 127 short ones, in a batch that would otherwise run one part a sequence
    parts = _parts([32768] + [1024] * 127, kv_heads=4, step=128)
    assert parts[1:] == [1] * 127 and parts[0] >= 8
