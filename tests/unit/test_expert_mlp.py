"""The torch paths of the MoE dispatch and the routed experts' MLP against plain Python
loops over tokens and choices (the Triton kernels are checked against these paths in
test_triton_kernels.py and tests/gpu)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raymoe.actors.models import ops
from raymoe.actors.models.expert_mlp import expert_mlp, pick_config
from raymoe.actors.models.moe_combine import combine
from raymoe.actors.models.moe_dispatch import dispatch
from raymoe.actors.models.ops import block_dividing, choose_backend
from raymoe.cluster.expert_slots import replica_tables


def _mlp_case(slots: int, hidden: int, inter: int, tokens: int, top_k: int, foreign: bool):
    """Random inputs; with ``foreign``, some choices go to another rank's slot (id = slots)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(slots, 2 * inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(slots, hidden, inter, generator=g) / inter**0.5
    bucket = torch.randint(0, slots + int(foreign), (tokens * top_k,), generator=g)
    bucket[-1] = slots if foreign else 0
    keys, order = torch.sort(bucket, stable=True)
    ends = torch.searchsorted(keys, torch.arange(1, slots + 1), out_int32=True)
    return x, order // top_k, ends, w13, w2, keys


# hidden 42 / intermediate 10 (an intermediate of 20 over moe_tp 2): float32 rows of 168 and 40 bytes,
# which torch._grouped_mm refuses (strides of a multiple of 16 bytes): a tiny model failed its first step
@pytest.mark.parametrize("hidden,inter", [(32, 24), (42, 10)], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("foreign", [False, True])
def test_expert_mlp_matches_a_loop_of_matmuls(foreign, hidden, inter):
    x, rows, ends, w13, w2, keys = _mlp_case(slots=5, hidden=hidden, inter=inter, tokens=7, top_k=3, foreign=foreign)
    mine = int(ends[-1])  # rows past it are another rank's: left unwritten
    want = torch.zeros(mine, x.shape[1])
    for r, (token, slot) in enumerate(zip(rows[:mine].tolist(), keys[:mine].tolist())):
        gate_up = w13[slot] @ x[token]
        want[r] = w2[slot] @ (F.silu(gate_up[:inter]) * gate_up[inter:])
    got = expert_mlp(x, rows, ends, w13=w13, w2=w2, backend="torch")
    assert got.shape == (rows.shape[0], x.shape[1])
    torch.testing.assert_close(got[:mine], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("all_local", [False, True])
def test_combine_sums_each_tokens_own_choices_and_never_reads_foreign_rows(all_local):
    g = torch.Generator().manual_seed(2)
    tokens, top_k, hidden = 5, 3, 8
    m = tokens * top_k
    mine = m if all_local else 9
    y = torch.randn(m, hidden, generator=g)
    y[mine:] = float("nan")  # garbage in other ranks' rows must not reach the output
    sorted_row = torch.randperm(m, generator=g).view(tokens, top_k)
    weights = torch.rand(tokens, top_k, generator=g)
    ends = torch.tensor([2, mine], dtype=torch.int32)
    want = torch.zeros(tokens, hidden)
    for t in range(tokens):
        for j in range(top_k):
            if sorted_row[t, j] < mine:
                want[t] += weights[t, j] * y[sorted_row[t, j]]
    got = combine(y, sorted_row, weights, ends, all_local=all_local, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("ep_rank,ep", [(0, 1), (1, 2)])
def test_dispatch_groups_each_choice_under_its_slot(norm_topk_prob, ep_rank, ep):
    tokens, experts, physical, top_k = 9, 6, 8, 2  # two experts have a second replica
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(tokens, experts, generator=g)
    p2l = torch.tensor([0, 1, 2, 3, 4, 5, 1, 4])
    l2p, counts = replica_tables(p2l.view(1, -1), experts)
    valid = torch.arange(tokens) != 4
    slots = physical // ep
    d = dispatch(
        logits,
        top_k,
        norm_topk_prob=norm_topk_prob,
        logical_to_physical=l2p[0],
        replica_count=counts[0],
        num_physical=physical,
        slot_start=ep_rank * slots,
        slots=slots,
        valid=valid,
        backend="torch",
    )

    probs = torch.softmax(logits, dim=-1)
    for t in range(tokens):
        chosen = sorted(range(experts), key=lambda e: -probs[t, e])[:top_k]
        picked = [int(p2l[d.physical[t, j]]) if valid[t] else -1 for j in range(top_k)]
        assert sorted(picked) == (sorted(chosen) if valid[t] else [-1] * top_k)
        want = probs[t, chosen] / (probs[t, chosen].sum() if norm_topk_prob else 1)
        got = {int(p2l[d.physical[t, j]]): float(d.weights[t, j]) for j in range(top_k)}
        if valid[t]:
            assert [got[e] for e in chosen] == pytest.approx(want.tolist(), abs=1e-6)
        for j in range(top_k):
            p, r = int(d.physical[t, j]), int(d.sorted_row[t, j])
            assert int(d.rows[r]) == t
            if valid[t]:  # replica = token index modulo the expert's replica count
                logical = int(p2l[p])
                assert p == int(l2p[0, logical, t % int(counts[0, logical])])
            local = p - ep_rank * slots
            if valid[t] and 0 <= local < slots:  # our slot: row r lies in its group
                assert (int(d.ends[local - 1]) if local else 0) <= r < int(d.ends[local])
            else:  # another rank's or an invalid choice: past the last group
                assert r >= int(d.ends[-1])
    assert sorted(d.sorted_row.flatten().tolist()) == list(range(tokens * top_k))
    # the slots the expert kernels run: those with rows, ascending, then -1s
    local = [int(p) - ep_rank * slots for t in range(tokens) for p in d.physical[t] if valid[t]]
    busy = sorted({s for s in local if 0 <= s < slots})
    assert d.groups.tolist() == busy + [-1] * (min(slots, tokens * top_k) - len(busy))


def test_unknown_backends_are_value_errors():
    x, rows, ends, w13, w2, _ = _mlp_case(slots=2, hidden=16, inter=16, tokens=2, top_k=1, foreign=False)
    with pytest.raises(ValueError, match="backend"):
        expert_mlp(x, rows, ends, w13=w13, w2=w2, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        combine(x, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), ends, backend="cuda")
    l2p, counts = replica_tables(torch.arange(4).view(1, -1), 4)
    with pytest.raises(ValueError, match="backend"):
        tables = dict(logical_to_physical=l2p[0], replica_count=counts[0], num_physical=4, slot_start=0, slots=4)
        dispatch(torch.randn(3, 4), 2, norm_topk_prob=True, **tables, backend="cuda")


@pytest.mark.parametrize("available", [True, False])
def test_choose_backend_takes_triton_on_cuda_where_it_fits_and_an_explicit_choice_as_is(monkeypatch, available):
    asked = []
    monkeypatch.setattr(ops, "triton_available", lambda: asked.append(1) or available)
    for on_cuda in (True, False):
        for fits in (True, False):
            asked.clear()
            want = "triton" if on_cuda and fits and available else "torch"
            assert choose_backend(None, op="op", on_cuda=on_cuda, fits=fits) == want
            assert len(asked) == (on_cuda and fits)  # only then: a missing Triton logs a warning
            for requested in ("triton", "torch"):
                assert choose_backend(requested, op="op", on_cuda=on_cuda, fits=fits) == requested
            with pytest.raises(ValueError, match=r"^expert_mlp backend must be 'triton' or 'torch', not 'cuda'$"):
                choose_backend("cuda", op="expert_mlp", on_cuda=on_cuda, fits=fits)


def test_block_dividing_is_the_largest_power_of_two_that_divides():
    assert block_dividing(2048, 1024) == 1024
    assert block_dividing(768, 128) == 128 and block_dividing(48, 64) == 16
    assert block_dividing(40, 64) is None  # no power of two >= 16 divides 40


def test_config_grows_row_blocks_with_rows_per_slot_then_leaves_prefill_to_grouped_mm():
    sizes = [pick_config(rows, 128)["BM"] for rows in (8, 512, 2048)]
    assert sizes == sorted(sizes) and sizes[0] == 16 and sizes[-1] > 16
    assert pick_config(8 * 4096, 128) is None
