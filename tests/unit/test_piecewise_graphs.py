"""The token buckets the piecewise graphs capture (piecewise_graphs.py): every step size up to
the limit has one, and padding to it stays within the bounds the docstring promises."""

from __future__ import annotations

import pytest

from raymoe.actors.engine.piecewise_graphs import mixed_step_buckets
from raymoe.cluster.config import config_from_dict


@pytest.mark.parametrize("limit", [1, 16, 100, 512, 2048, 4096, 5000, 8192])
def test_every_step_size_has_a_bucket_padded_within_bounds(limit):
    buckets = mixed_step_buckets(limit)
    assert buckets == sorted(set(buckets)) and buckets[-1] == limit
    for tokens in range(1, limit + 1):
        bucket = next(b for b in buckets if b >= tokens)
        if tokens > 1024:
            assert bucket <= 1.25 * tokens, (tokens, bucket)
        elif tokens > 512:
            assert bucket <= 1.5 * tokens, (tokens, bucket)
        else:
            assert bucket <= max(16, 2 * tokens), (tokens, bucket)


def test_zero_turns_them_off_and_a_negative_limit_is_refused():
    assert mixed_step_buckets(0) == []
    with pytest.raises(ValueError, match="engine.mixed_step_graph_tokens"):
        config_from_dict({"engine": {"mixed_step_graph_tokens": -1}})
