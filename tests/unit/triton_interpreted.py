"""The Triton kernel cases, run in Triton's CPU interpreter against the torch paths:
``python triton_interpreted.py <cases as JSON> <results file>``, where the cases map a
name to (case function, its arguments). Run by test_triton_kernels.py in a fresh process
with TRITON_INTERPRET=1 (the variable must be set before Triton is first imported). A
failing case does not stop the ones after it; one JSON line per case goes to the results
file: [name, None] when it passed, [name, its traceback] when it failed."""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import numpy as np
import torch
import triton.language as tl
from triton.runtime import interpreter

from raymoe.actors.engine import attention_torch, decode_attention_triton, kv_write_triton
from raymoe.actors.models import (
    expert_mlp_triton,
    fp8_linear_triton,
    fp8_widen_triton,
    latent_norm_rope_triton,
    moe_combine_triton,
    ops,
    qk_norm_rope_triton,
    skinny_linear_triton,
)
from raymoe.actors.models.expert_mlp import expert_mlp
from raymoe.actors.models.fp8 import dequantize_blocks, quantize_blocks, quantize_groups
from raymoe.actors.models.linear import linear
from raymoe.actors.models.moe_combine import combine, combine_add_rms_norm
from raymoe.actors.models.moe_dispatch import busy_slots, dispatch
from raymoe.actors.models.spec import GroupedTopK
from raymoe.cluster.expert_slots import replica_tables
from raymoe.comm import reduce_add_rms_norm_triton

assert os.environ.get("TRITON_INTERPRET") == "1"

_convert_float = interpreter._convert_float


def _exact_downcast(data, from_type, to_type, rounding_mode):
    """The interpreter rounds float32 -> float8e4nv without carrying a rounded-up mantissa into
    the exponent (31.7 becomes 16, not 32), and float32 -> bfloat16 by truncation; a GPU rounds
    both to nearest. torch converts exactly."""
    if from_type == tl.float32 and to_type in (tl.float8e4nv, tl.bfloat16):
        target, bits = (
            (torch.float8_e4m3fn, torch.uint8) if to_type == tl.float8e4nv else (torch.bfloat16, torch.uint16)
        )
        converted = torch.from_numpy(np.ascontiguousarray(data)).to(target)
        return converted.view(bits).numpy().reshape(data.shape)
    return _convert_float(data, from_type, to_type, rounding_mode)


interpreter._convert_float = _exact_downcast
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, as pytest's conftest does
from dispatch_checks import assert_same_grouping, choices_by_slot  # noqa: E402


def expert_mlp_case(slots, hidden, inter, tokens, foreign, top_k=3, crowded=0.0):
    """``crowded``: the share of the rows sent to slot 1 (one slot with most of the rows)."""
    g = torch.Generator().manual_seed(slots + hidden)
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(slots, 2 * inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(slots, hidden, inter, generator=g) / inter**0.5
    bucket = torch.randint(0, slots + int(foreign), (tokens * top_k,), generator=g)
    bucket[torch.rand(tokens * top_k, generator=g) < crowded] = 1
    keys, order = torch.sort(bucket, stable=True)
    ends = torch.searchsorted(keys, torch.arange(1, slots + 1), out_int32=True)
    want = expert_mlp(x, order // top_k, ends, w13=w13, w2=w2, backend="torch")
    mine = int(ends[-1])  # rows past it are other ranks': neither path writes them
    # BM 16 < rows per slot: programs loop over several row blocks
    config = dict(BM=16, BN=32, BK=32, num_warps=4, num_stages=2)
    groups = busy_slots(ends, tokens * top_k)
    for tiled in (False, True):  # programs by slots, each over its row blocks; programs by row tiles
        run = dict(w13=w13, w2=w2, config=dict(config, TILED=tiled))
        got = expert_mlp_triton.expert_mlp(x, order // top_k, ends, groups, **run)
        torch.testing.assert_close(got[:mine], want[:mine], rtol=1e-5, atol=1e-5, msg=f"tiled={tiled}")
    try:
        narrow = dict(w13=w13[:, :, :8], w2=w2[:, :8], config=config)
        expert_mlp_triton.expert_mlp(x[:, :8], order // top_k, ends, groups, **narrow)
        raise AssertionError("hidden 8 must be refused")
    except ValueError as e:
        assert "multiple of 16" in str(e)


def dispatch_case(tokens, experts, physical, top_k, norm=True, ep=1, ep_rank=0, with_valid=False, grouped=None):
    """``grouped``: GroupedTopK's fields (a group-limited rule), None: softmax top-k."""
    g = torch.Generator().manual_seed(tokens * 7 + physical)
    logits = torch.randn(tokens, experts, generator=g)  # float32: no ties
    p2l = torch.cat(
        [torch.randperm(experts, generator=g), torch.randint(0, experts, (physical - experts,), generator=g)]
    )
    l2p, counts = replica_tables(p2l.view(1, -1), experts)
    slots = physical // ep
    valid = torch.rand(tokens, generator=g) < 0.7 if with_valid else None
    args = dict(logical_to_physical=l2p[0], replica_count=counts[0], num_physical=physical)
    args.update(norm_topk_prob=norm, slot_start=ep_rank * slots, slots=slots, valid=valid)
    if grouped is not None:
        rule = GroupedTopK(**grouped)
        bias = torch.randn(experts, generator=g) * 0.2 if rule.scoring == "sigmoid" else None
        args.update(grouped=rule, correction_bias=bias)
    got = dispatch(logits, top_k, **args, backend="triton")
    want = dispatch(logits, top_k, **args, backend="torch")
    if grouped is not None:  # the torch path keeps transformers' unsorted top-k order
        got, want = choices_by_slot(got), choices_by_slot(want)
    assert_same_grouping(got, want)


def combine_case(tokens, top_k, hidden, mine):
    g = torch.Generator().manual_seed(tokens)
    m = tokens * top_k
    y = torch.randn(m, hidden, generator=g)
    y[mine:] = float("nan")  # other ranks' rows: never read
    sorted_row = torch.randperm(m, generator=g).view(tokens, top_k)
    weights = torch.rand(tokens, top_k, generator=g).to(torch.bfloat16)
    ends = torch.tensor([mine // 2, mine], dtype=torch.int32)
    want = combine(y, sorted_row, weights, ends, backend="torch")
    out = torch.full((tokens, hidden), float("nan"))
    got = moe_combine_triton.combine(y, sorted_row, weights, ends, out=out)
    assert got is out, "the sum goes where it is asked to"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def combine_add_rms_norm_case(tokens, top_k, hidden, mine, shared=False):
    g = torch.Generator().manual_seed(tokens + hidden)
    bf16 = torch.bfloat16
    y = torch.randn(tokens * top_k, hidden, generator=g).to(bf16)
    y[mine:] = float("nan")  # other ranks' rows: never read
    sorted_row = torch.randperm(tokens * top_k, generator=g).view(tokens, top_k)
    weights = torch.rand(tokens, top_k, generator=g).to(bf16)
    ends = torch.tensor([mine // 2, mine], dtype=torch.int32)
    residual = torch.randn(tokens, hidden, generator=g).to(bf16)
    weight = torch.randn(hidden, generator=g).to(bf16)
    shared = torch.randn(tokens, hidden, generator=g).to(bf16) if shared else None
    args = (y, sorted_row, weights, ends)
    block = combine(*args, backend="torch") + (0 if shared is None else shared)
    want_normed, want_residual = ops.add_rms_norm(block, residual.clone(), weight, 1e-6)
    normed, got_residual = combine_add_rms_norm(
        *args, residual=residual, weight=weight, eps=1e-6, shared=shared, backend="triton"
    )
    assert got_residual is residual, "the residual is updated in place"
    # rounded toward zero by the interpreter (see reduce_add_rms_norm_case)
    torch.testing.assert_close(residual, want_residual, rtol=2**-6, atol=2**-6)
    torch.testing.assert_close(normed, want_normed, rtol=2**-5, atol=2**-5)


def qk_norm_rope_case(tokens, heads, kv_heads, dim):
    g = torch.Generator().manual_seed(tokens)
    # q and k as views of one qkv row, as the attention block makes them
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g)
    q = qkv[:, : heads * dim].view(tokens, heads, dim)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    wq, wk = torch.rand(dim, generator=g) + 0.5, torch.rand(dim, generator=g) + 0.5
    positions = torch.randint(0, 64, (tokens,), generator=g)
    cos_sin = torch.randn(64, dim, generator=g)
    norm_rope = dict(q_weight=wq, k_weight=wk, eps=1e-6, cos_sin=cos_sin)
    want_q, want_k = ops.qk_norm_rotary_(positions, q.clone(), k.clone(), **norm_rope, backend="torch")
    v_before = qkv[:, (heads + kv_heads) * dim :].clone()
    qk_norm_rope_triton.qk_norm_rope_(positions, q, k, **norm_rope)
    torch.testing.assert_close(q, want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, want_k, rtol=1e-5, atol=1e-5)
    assert torch.equal(qkv[:, (heads + kv_heads) * dim :], v_before), "v must be left alone"


def kv_write_case(tokens, kv_heads, dim, dtype):
    """k/v as views of one qkv row, some past FP8's range, written into a paged cache of
    ``dtype`` where the torch backend writes them (saturated and rounded for FP8)."""
    g = torch.Generator().manual_seed(tokens)
    qkv = torch.randn(tokens, (3 + 2 * kv_heads) * dim, generator=g) * 200
    k = qkv[:, 3 * dim : (3 + kv_heads) * dim].view(tokens, kv_heads, dim)
    v = qkv[:, (3 + kv_heads) * dim :].view(tokens, kv_heads, dim)
    assert k.abs().max() > 448
    blocks = torch.randperm(tokens + 3, generator=g)[:tokens].to(torch.int32)  # distinct: no two rows collide
    offsets = torch.randint(0, 4, (tokens,), generator=g, dtype=torch.int32)
    got = torch.zeros(tokens + 3, 2, 4, kv_heads, dim, dtype=getattr(torch, dtype))
    want = got.clone()
    kv_write_triton.write_kv(got, blocks, offsets, k=k, v=v)
    attention_torch.write_kv(want, blocks.long(), offsets.long(), k=k, v=v)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert got.float().abs().max() == (448 if dtype == "float8_e4m3fn" else qkv[:, 3 * dim :].abs().max())


def decode_attention_case(lens, heads, kv_heads, dim, page, target_programs, dtype, want_parts):
    """Paged decode attention over a cache of ``dtype`` (pages scattered, sequences of
    ``lens`` tokens, cut into ``want_parts`` parts each for ``target_programs`` programs)
    against softmax attention in float64; twice (the same tables serve every layer)."""
    g = torch.Generator().manual_seed(sum(lens) + target_programs)
    pages = [-(-n // page) for n in lens]
    blocks = sum(pages) + 2
    cache = (torch.randn(blocks, 2, page, kv_heads, dim, generator=g) * 2).to(getattr(torch, dtype))
    indices = torch.randperm(blocks, generator=g)[: sum(pages)].to(torch.int32)
    indptr = torch.tensor([0] + pages, dtype=torch.int32).cumsum(0).to(torch.int32)
    q = torch.randn(len(lens), heads, dim, generator=g)
    decode = decode_attention_triton.TritonDecode(
        len(lens), sum(pages), kv_heads, torch.device("cpu"), target_programs=target_programs
    )
    decode.plan(indptr, indices, torch.tensor(lens, dtype=torch.int32))
    first = decode.first_part.tolist()
    assert [first[b + 1] - first[b] for b in range(len(lens))] == want_parts
    for _ in range(2):
        got = decode.run(q, cache)
        for b, n in enumerate(lens):
            kv = cache[indices[indptr[b] : indptr[b + 1]].long()].double()  # [pages, 2, page, kv_heads, dim]
            k, v = (kv[:, i].flatten(0, 1)[:n].repeat_interleave(heads // kv_heads, 1) for i in (0, 1))
            weights = torch.softmax(torch.einsum("hd,thd->ht", q[b].double(), k) / dim**0.5, -1)
            want = torch.einsum("ht,thd->hd", weights, v)
            torch.testing.assert_close(got[b].double(), want, rtol=1e-4, atol=1e-4)


def latent_norm_rope_case(tokens, heads, nope, latent, rope, q_lora):
    g = torch.Generator().manual_seed(tokens + heads)
    # q and the latent as views of the projections' outputs, as the attention block makes them:
    # one row holding the query (or only the latent, when a q_b projection makes the query) and
    # the latent; columns left of the query's, so q's rows start past a row's beginning
    q_width, latent_width = heads * (nope + rope), latent + rope
    proj = torch.randn(tokens, 3 + (0 if q_lora else q_width) + latent_width, generator=g)
    q = (torch.randn(tokens, q_width, generator=g) if q_lora else proj[:, 3 : 3 + q_width]).view(tokens, heads, -1)
    latent_view = proj[:, proj.shape[1] - latent_width :]
    weight = torch.rand(latent, generator=g) + 0.5
    positions = torch.randint(0, 64, (tokens,), generator=g)
    args = dict(norm_weight=weight, eps=1e-6, cos_sin=torch.randn(64, rope, generator=g), nope_dim=nope)
    proj_before, q_before = proj.clone(), q.clone()
    want = ops.latent_norm_rotary(positions, q, latent_view, **args, backend="torch")
    got = latent_norm_rope_triton.latent_norm_rope(positions, q, latent_view, **args)
    for name, w, o in zip(("q_rope", "latent", "k_rope"), want, got):
        assert o.shape == w.shape and o.is_contiguous(), name
        torch.testing.assert_close(o, w, rtol=1e-5, atol=1e-5, msg=name)
    assert torch.equal(proj, proj_before) and torch.equal(q, q_before), "the inputs are read, not written"


def skinny_linear_case(rows, bias):
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 64, generator=g), torch.randn(40, 64, generator=g)  # 40: a partial column block
    b = torch.randn(40, generator=g) if bias else None
    config = dict(BN=16, BK=32, num_warps=4, num_stages=2)  # two K steps
    got = skinny_linear_triton.skinny_linear(x, w, b, config)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
    # linear() with the Triton backend asked for runs the kernel up to its own row limit
    got = linear(x, w, b, backend="triton")
    torch.testing.assert_close(got, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
    try:
        linear(torch.randn(17, 64), w, b, backend="triton")
    except ValueError as e:
        assert "1-16" in str(e), e
    else:
        raise AssertionError("17 rows on the one-row kernel must be refused")


def _activations_through_fp8(x: torch.Tensor, group: int) -> torch.Tensor:
    """x quantised per row and ``group`` columns, as the FP8 kernels do, then dequantised."""
    q, scale = quantize_groups(x, group)
    return q.float() * scale.repeat_interleave(group, 1)[:, : x.shape[1]]


def fp8_linear_case(rows, n, k, block, bias, split_k=None):
    g = torch.Generator().manual_seed(rows + n)
    x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g) if bias else None
    q, scale = quantize_blocks(w, tuple(block))
    want = torch.nn.functional.linear(_activations_through_fp8(x, block[1]), dequantize_blocks(q, scale, block), b)
    if split_k is not None:  # K split over programs, the last to finish a tile summing their parts
        config = dict(fp8_linear_triton.pick_config(rows), SPLIT_K=split_k)
        for _ in range(2):  # the second call finds the arrival counters zeroed again
            got = fp8_linear_triton.fp8_linear(x, q, scale, block=tuple(block), bias=b, config=config)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not fp8_linear_triton.arrival_counters(x.device, 1).any()
        return
    got = linear(x, q, b, scale=scale, block=tuple(block), backend="triton")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the torch path (CPU) dequantises the weight only: the FP8 activations' error is what differs
    plain = linear(x, q, b, scale=scale, block=tuple(block), backend="torch")
    torch.testing.assert_close(plain, torch.nn.functional.linear(x, dequantize_blocks(q, scale, block), b))
    assert 0 < (got - plain).abs().max() < 0.1 * plain.abs().max()
    # the prefill path's separate quantisation pass rounds as the reference does, bit for bit
    q_x, s_x = fp8_linear_triton.quantize_rows(x, block[1])
    want_q, want_s = quantize_groups(x, block[1])
    assert torch.equal(q_x.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(s_x, want_s)
    # cuBLAS's layout (fp8_scaled_mm.py): the same values, rows padded to a multiple of 4 with
    # zeros, the scales M-major
    q_m, s_m = fp8_linear_triton.quantize_rows(x, block[1], m_major_align=4)
    padded = -(-rows // 4) * 4
    assert q_m.shape == (padded, k) and s_m.shape == (padded, want_s.shape[1]) and s_m.stride() == (1, padded)
    assert torch.equal(q_m[:rows].view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(s_m[:rows], want_s)
    assert not q_m[rows:].float().any()


def expert_mlp_fp8_case(slots, hidden, inter, tokens, block, top_k=2, bn=16):
    g = torch.Generator().manual_seed(slots + hidden)
    block = tuple(block)
    x = torch.randn(tokens, hidden, generator=g)
    w13, s13 = quantize_blocks(torch.randn(slots, 2 * inter, hidden, generator=g) / hidden**0.5, block)
    w2, s2 = quantize_blocks(torch.randn(slots, hidden, inter, generator=g) / inter**0.5, block)
    bucket = torch.randint(0, slots + 1, (tokens * top_k,), generator=g)  # slot ``slots``: another rank's
    keys, order = torch.sort(bucket, stable=True)
    ends = torch.searchsorted(keys, torch.arange(1, slots + 1), out_int32=True)
    rows = order // top_k
    w13d, w2d = dequantize_blocks(w13, s13, block), dequantize_blocks(w2, s2, block)
    want = torch.zeros(int(ends[-1]), hidden)
    for e in range(slots):
        r = slice(int(ends[e - 1]) if e else 0, int(ends[e]))
        gate_up = _activations_through_fp8(x[rows[r]], block[1]) @ w13d[e].T
        h = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        want[r] = _activations_through_fp8(h, block[1]) @ w2d[e].T
    fp8 = dict(w13_scale=s13, w2_scale=s2, fp8_block=block)
    config = dict(BM=16, BN=bn, BK=999, num_warps=4, num_stages=2)  # BK: the FP8 block's
    got = expert_mlp(x, rows, ends, w13=w13, w2=w2, backend="triton", config=config, **fp8)
    torch.testing.assert_close(got[: want.shape[0]], want, rtol=1e-4, atol=1e-4)
    # the torch path dequantises the weights: the same maths without FP8 activations
    plain = expert_mlp(x, rows, ends, w13=w13, w2=w2, backend="torch", **fp8)[: want.shape[0]]
    torch.testing.assert_close(plain, expert_mlp(x, rows, ends, w13=w13d, w2=w2d, backend="torch")[: want.shape[0]])


def fp8_widen_case(slots, n, k, block):
    """Widened weights equal fp8.dequantize_blocks' bit for bit, partial blocks included."""
    g = torch.Generator().manual_seed(n + k)
    q, scale = quantize_blocks(
        torch.randn(slots, n, k, generator=g) * torch.rand(slots, 1, 1, generator=g), tuple(block)
    )
    got = fp8_widen_triton.widen_blocks(q, scale, tuple(block), torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == (slots, n, k)
    assert torch.equal(got, dequantize_blocks(q, scale, tuple(block), torch.bfloat16))


def reduce_add_rms_norm_case(ranks, tokens, width):
    """Each rank's partial sits in the second half of its own buffer, as in symmetric memory."""
    g = torch.Generator().manual_seed(ranks * width)
    bf16 = torch.bfloat16
    parts = [torch.randn(tokens, width, generator=g).to(bf16) for _ in range(ranks)]
    buffers = [torch.cat([torch.full((tokens * width,), float("nan"), dtype=bf16), p.flatten()]) for p in parts]
    residual = torch.randn(tokens, width, generator=g).to(bf16)
    weight = torch.randn(width, generator=g).to(bf16)
    summed = sum(p.float() for p in parts).to(bf16)  # the all-reduce: a float32 sum, rounded once
    want_normed, want_residual = ops.add_rms_norm(summed, residual.clone(), weight, 1e-6)
    addresses = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64)
    normed = reduce_add_rms_norm_triton.reduce_add_rms_norm_(addresses, tokens * width, residual, weight, eps=1e-6)
    # Triton's interpreter rounds float32 -> bfloat16 toward zero (a GPU rounds to nearest, and
    # tests/gpu checks the residual bit for bit there): a few bfloat16 steps apart here
    torch.testing.assert_close(residual, want_residual, rtol=2**-6, atol=2**-6)
    torch.testing.assert_close(normed, want_normed, rtol=2**-5, atol=2**-5)


def gather_rows_case(ranks, tokens, width):
    """Each rank's rows sit past the start of its own buffer, as in symmetric memory."""
    from raymoe.comm.gather_rows_triton import gather_rows

    g = torch.Generator().manual_seed(ranks * width)
    parts = [torch.randn(tokens, width, generator=g).to(torch.bfloat16) for _ in range(ranks)]
    buffers = [torch.cat([torch.full((7,), float("nan"), dtype=torch.bfloat16), p.flatten()]) for p in parts]
    addresses = torch.tensor([b.data_ptr() for b in buffers][::-1], dtype=torch.int64)  # any order of ranks
    got = gather_rows(addresses, 7, parts[0])
    assert torch.equal(got, torch.cat(parts[::-1])), "gathered rows differ (a copy: bit for bit)"


def reduce_add_rms_norm_gather_case(replicas, attn, rows, tokens, width, mine):
    """Each (replica, attention rank)'s buffer: its partial rows, then (every rank publishes
    both) its replica's residual rows; this rank's replica ``mine`` has ``tokens`` of ``rows``."""
    from raymoe.comm.reduce_add_rms_norm_triton import reduce_add_rms_norm_gather_

    g = torch.Generator().manual_seed(replicas * attn + width)
    bf16 = torch.bfloat16
    partials = torch.randn(replicas, attn, rows, width, generator=g).to(bf16)
    residuals = torch.randn(replicas, rows, width, generator=g).to(bf16)
    weight = torch.randn(width, generator=g).to(bf16)
    buffers = [
        torch.cat([torch.full((3,), float("nan"), dtype=bf16), partials[d, a].flatten(), residuals[d].flatten()])
        for d in range(replicas)
        for a in range(attn)
    ]
    table = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64).view(replicas, attn)
    residual = residuals[mine, :tokens].clone()
    got = reduce_add_rms_norm_gather_(table, 3, residual, weight, mine=mine, rows=rows, eps=1e-6)
    summed = partials.float().sum(1).to(bf16)  # each replica's all-reduce: a float32 sum, rounded once
    want_normed, want_residuals = ops.add_rms_norm(summed.flatten(0, 1), residuals.flatten(0, 1).clone(), weight, 1e-6)
    # the interpreter rounds float32 -> bfloat16 toward zero (see reduce_add_rms_norm_case)
    torch.testing.assert_close(got, want_normed, rtol=2**-5, atol=2**-5)
    want_residual = want_residuals.view(replicas, rows, width)[mine, :tokens]
    torch.testing.assert_close(residual, want_residual, rtol=2**-6, atol=2**-6)


CASE_FUNCTIONS = {
    f.__name__: f
    for f in (
        expert_mlp_case,
        dispatch_case,
        combine_case,
        combine_add_rms_norm_case,
        qk_norm_rope_case,
        kv_write_case,
        decode_attention_case,
        latent_norm_rope_case,
        skinny_linear_case,
        reduce_add_rms_norm_case,
        gather_rows_case,
        reduce_add_rms_norm_gather_case,
        fp8_linear_case,
        expert_mlp_fp8_case,
        fp8_widen_case,
    )
}

if __name__ == "__main__":
    cases, results = json.loads(sys.argv[1]), Path(sys.argv[2])
    for name, (function, arguments) in cases.items():
        try:
            CASE_FUNCTIONS[function](**arguments)
            error = None
        except Exception:
            error = traceback.format_exc()
        with results.open("a") as f:
            f.write(json.dumps([name, error]) + "\n")
