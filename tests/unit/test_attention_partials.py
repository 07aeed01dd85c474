"""Context-parallel attention's maths: attention over keys split into parts (each part's
softmax-weighted values and log-sum-exp, some parts without any key a query may see) merges
into torch's scaled_dot_product_attention over all keys, causal and with GQA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raymoe.actors.engine.attention_torch import merge_partials, partial_attention


@pytest.mark.parametrize("parts", [1, 2, 3, 4])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_merged_partials_equal_full_attention(parts, scale):
    g = torch.Generator().manual_seed(parts)
    heads, n, ctx, d, dv = 4, 5, 11, 16, 12
    q = torch.randn(heads, n, d, generator=g, dtype=torch.float64)
    keys = torch.randn(heads, ctx, d, generator=g, dtype=torch.float64)
    vals = torch.randn(heads, ctx, dv, generator=g, dtype=torch.float64)
    key_pos = torch.arange(ctx)
    query_pos = ctx - n + torch.arange(n)
    mask = key_pos[None, :] <= query_pos[:, None]
    want = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=scale)  # [H, n, Dv]

    outs, lses = [], []
    for r in range(parts):  # part r holds positions r, r + parts, ... (as cp rank r does)
        mine = key_pos % parts == r
        o, lse = partial_attention(q, keys[:, mine], vals[:, mine], mask[:, mine], scale)
        outs.append(o.transpose(0, 1))  # [n, H, Dv]
        lses.append(lse)
    got = merge_partials(torch.stack(outs), torch.stack(lses)).transpose(0, 1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_a_part_without_visible_keys_adds_nothing():
    q = torch.randn(2, 1, 8)
    keys, vals = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    nothing = torch.zeros(1, 3, dtype=torch.bool)
    o, lse = partial_attention(q, keys, vals, nothing, None)
    assert torch.equal(o, torch.zeros_like(o)) and bool(torch.isneginf(lse).all())
    everything = torch.ones(1, 3, dtype=torch.bool)
    full, full_lse = partial_attention(q, keys, vals, everything, None)
    merged = merge_partials(torch.stack([o.transpose(0, 1), full.transpose(0, 1)]), torch.stack([lse, full_lse]))
    torch.testing.assert_close(merged, full.transpose(0, 1))
