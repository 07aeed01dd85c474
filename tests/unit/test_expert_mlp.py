"""The routed experts' MLP grouped by slot: the torch path against a per-expert loop of
plain matmuls, and the Triton kernels (in Triton's CPU interpreter) against the torch path."""
from __future__ import annotations

import importlib
import sys

import pytest
import torch
import torch.nn.functional as F

from raymoe.actors.models.expert_mlp import expert_mlp, pick_config


def _case(slots: int, hidden: int, inter: int, tokens: int, top_k: int, foreign: bool, seed: int = 0):
    """Random inputs; with ``foreign``, some choices go to another rank's slot (id = slots)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(slots, 2 * inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(slots, hidden, inter, generator=g) / inter**0.5
    bucket = torch.randint(0, slots + int(foreign), (tokens * top_k,), generator=g)
    keys, order = torch.sort(bucket, stable=True)
    ends = torch.searchsorted(keys, torch.arange(1, slots + 1), out_int32=True)
    return x, order // top_k, ends, w13, w2, keys


def _loop_reference(x, rows, keys, w13, w2):
    """Row by row: y = down(silu(gate x) * up x) of the row's slot; other ranks' rows 0."""
    inter = w2.shape[2]
    y = torch.zeros(rows.shape[0], x.shape[1])
    for r, (token, slot) in enumerate(zip(rows.tolist(), keys.tolist())):
        if slot < w13.shape[0]:
            gate_up = w13[slot] @ x[token]
            y[r] = w2[slot] @ (F.silu(gate_up[:inter]) * gate_up[inter:])
    return y


@pytest.mark.parametrize("foreign", [False, True])
def test_torch_path_matches_a_loop_of_matmuls(foreign):
    x, rows, ends, w13, w2, keys = _case(slots=5, hidden=32, inter=24, tokens=7, top_k=3, foreign=foreign)
    got = expert_mlp(x, rows, ends, w13, w2, backend="torch")
    torch.testing.assert_close(got, _loop_reference(x, rows, keys, w13, w2), rtol=1e-5, atol=1e-5)
    if foreign:
        assert int(ends[-1]) < rows.shape[0], "the case must route some rows to another rank"


@pytest.fixture
def triton_interpreted(monkeypatch):
    """The Triton kernel module, built for Triton's CPU interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    # imported afresh: the kernels are decorated under the interpreter
    monkeypatch.delitem(sys.modules, "raymoe.actors.models.expert_mlp_triton", raising=False)
    return importlib.import_module("raymoe.actors.models.expert_mlp_triton")


# intermediate 48 forces 16-wide column blocks; 40 slots with 9 tokens leave most groups empty
@pytest.mark.parametrize("slots,hidden,inter,tokens,foreign", [(4, 64, 32, 5, False), (6, 128, 48, 9, True), (40, 32, 16, 9, True)])
def test_triton_kernels_match_the_torch_path(triton_interpreted, slots, hidden, inter, tokens, foreign):
    x, rows, ends, w13, w2, _ = _case(slots, hidden, inter, tokens, top_k=3, foreign=foreign, seed=1)
    want = expert_mlp(x, rows, ends, w13, w2, backend="torch")
    # rows per slot > BM: each program loops over several row blocks
    config = dict(BM=16, BN=32, BK=32, num_warps=4, num_stages=2)
    got = triton_interpreted.expert_mlp(x, rows, ends, w13, w2, config)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_triton_rejects_a_dimension_that_is_not_a_multiple_of_16(triton_interpreted):
    x, rows, ends, w13, w2, _ = _case(slots=2, hidden=40, inter=16, tokens=3, top_k=2, foreign=False)
    with pytest.raises(ValueError, match="multiple of 16"):
        triton_interpreted.expert_mlp(x, rows, ends, w13, w2, pick_config(6, 2))


def test_unknown_backend_is_a_value_error():
    x, rows, ends, w13, w2, _ = _case(slots=2, hidden=16, inter=16, tokens=2, top_k=1, foreign=False)
    with pytest.raises(ValueError, match="backend"):
        expert_mlp(x, rows, ends, w13, w2, backend="cuda")


def test_config_grows_row_blocks_with_rows_per_slot():
    sizes = [pick_config(rows, 128)["BM"] for rows in (8, 512, 2048, 8 * 4096)]
    assert sizes == sorted(sizes) and sizes[0] == 16 and sizes[-1] >= 64
