"""The FP8 Triton kernels compiled for this GPU against their reference: activations quantised
per row and 128 columns (fp8.quantize_groups), weights dequantised from their 128 x 128 block
scales, products in float32. The shapes are Qwen3-30B-A3B's projections and experts."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from raymoe.actors.models.expert_mlp import expert_mlp  # noqa: E402
from raymoe.actors.models.fp8 import dequantize_blocks, quantize_blocks, quantize_groups  # noqa: E402
from raymoe.actors.models.linear import linear  # noqa: E402

BLOCK = (128, 128)


def _through_fp8(x: torch.Tensor) -> torch.Tensor:
    q, scale = quantize_groups(x, BLOCK[1])
    return q.float() * scale.repeat_interleave(BLOCK[1], 1)[:, : x.shape[1]]


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("rows", [1, 7, 33, 64, 301])
@pytest.mark.parametrize("n,k", [(5120, 2048), (2048, 4096), (1000, 2048)])
def test_fp8_linear_matches_its_reference(rows, n, k):
    g = torch.Generator(device="cuda").manual_seed(rows + n)
    x = torch.randn(rows, k, device="cuda", generator=g).bfloat16()
    w, scale = quantize_blocks(torch.randn(n, k, device="cuda", generator=g) / k**0.5, BLOCK)
    want = _through_fp8(x.float()) @ dequantize_blocks(w, scale, BLOCK).T
    got = linear(x, w, scale=scale, block=BLOCK, backend="triton")
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    assert _rel(got, want) < 5e-3  # the output's bf16 rounding, and float32 sums in another order
    # and against the weights' bf16 originals: the FP8 error itself stays a few percent
    assert _rel(got, x.float() @ dequantize_blocks(w, scale, BLOCK).T) < 0.06


@pytest.mark.parametrize("rows", [1, 7, 33, 301])
def test_fp8_linear_replays_in_a_cuda_graph(rows):
    """Each path (matrix-vector, Triton GEMM, cuBLAS with its padded rows) as decode graphs run it:
    a replay on new inputs gives what an eager call on them gives."""
    g = torch.Generator(device="cuda").manual_seed(rows)
    n, k = 2048, 4096
    w, scale = quantize_blocks(torch.randn(n, k, device="cuda", generator=g) / k**0.5, BLOCK)
    x = torch.randn(rows, k, device="cuda", generator=g).bfloat16()
    linear(x, w, scale=scale, block=BLOCK, backend="triton")  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = linear(x, w, scale=scale, block=BLOCK, backend="triton")
    x.copy_(torch.randn(rows, k, device="cuda", generator=g).bfloat16())
    graph.replay()
    torch.testing.assert_close(out, linear(x, w, scale=scale, block=BLOCK, backend="triton"), rtol=0, atol=0)


@pytest.mark.parametrize("tokens,h_in_bf16", [(1, True), (16, True), (200, True), (400, False)])
def test_fp8_expert_mlp_matches_its_reference_in_and_out_of_a_cuda_graph(tokens, h_in_bf16):
    """400 tokens: 200 rows a slot, where x and h are quantised once, h from float32 by the
    first kernel (not from bf16: FP8 roundings of the two differ by about 1e-2)."""
    slots, hidden, inter, top_k = 16, 2048, 768, 8
    g = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, hidden, device="cuda", generator=g).bfloat16()
    w13, s13 = quantize_blocks(torch.randn(slots, 2 * inter, hidden, device="cuda", generator=g) / hidden**0.5, BLOCK)
    w2, s2 = quantize_blocks(torch.randn(slots, hidden, inter, device="cuda", generator=g) / inter**0.5, BLOCK)
    slot = torch.randint(0, slots, (tokens * top_k,), device="cuda", generator=g)
    keys, order = torch.sort(slot, stable=True)
    ends = torch.searchsorted(keys, torch.arange(1, slots + 1, device="cuda"), out_int32=True)
    rows = order // top_k
    w13d, w2d = dequantize_blocks(w13, s13, BLOCK), dequantize_blocks(w2, s2, BLOCK)
    want = torch.empty(tokens * top_k, hidden, device="cuda")
    for e in range(slots):
        r = slice(int(ends[e - 1]) if e else 0, int(ends[e]))
        gate_up = _through_fp8(x[rows[r]].float()) @ w13d[e].T
        h = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        h = h.bfloat16().float() if h_in_bf16 else h
        want[r] = _through_fp8(h) @ w2d[e].T
    fp8 = dict(w13_scale=s13, w2_scale=s2, fp8_block=BLOCK, backend="triton")
    got = expert_mlp(x, rows, ends, w13=w13, w2=w2, **fp8)
    assert _rel(got, want) < 1e-2

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = expert_mlp(x, rows, ends, w13=w13, w2=w2, **fp8)
    x.copy_(torch.randn(tokens, hidden, device="cuda", generator=g))  # new inputs, same addresses
    graph.replay()
    torch.testing.assert_close(out, expert_mlp(x, rows, ends, w13=w13, w2=w2, **fp8), rtol=0, atol=0)


@pytest.mark.parametrize("rows,split_k", [(7, 2), (64, 4), (64, 8)])
def test_fp8_linear_with_k_split_matches_its_reference_and_repeats_bit_for_bit(rows, split_k):
    """The Triton GEMM with K split over programs (fp8_linear_triton.py): the same products as
    unsplit, and, its parts summed in a fixed order, the same bits on every call and in a graph."""
    from raymoe.actors.models import fp8_linear_triton

    g = torch.Generator(device="cuda").manual_seed(rows * split_k)
    n, k = 2048, 4096
    x = torch.randn(rows, k, device="cuda", generator=g).bfloat16()
    w, scale = quantize_blocks(torch.randn(n, k, device="cuda", generator=g) / k**0.5, BLOCK)
    bias = torch.randn(n, device="cuda", generator=g).bfloat16()
    config = dict(fp8_linear_triton.pick_config(rows), SPLIT_K=split_k)

    def run():
        return fp8_linear_triton.fp8_linear(x, w, scale, block=BLOCK, bias=bias, config=config)

    want = _through_fp8(x.float()) @ dequantize_blocks(w, scale, BLOCK).T + bias.float()
    got = run()
    assert _rel(got, want) < 5e-3
    assert torch.equal(got, run())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    graph.replay()
    assert torch.equal(out, got)


def test_fp8_experts_at_prefill_sizes_widen_their_weights_for_the_grouped_gemm():
    """From FP8_WIDEN_ROWS_PER_SLOT rows a slot (backend None) the weights are widened to bf16
    (bit for bit fp8.dequantize_blocks') and x stays as it is: the bf16 MLP on the dequantised
    weights, not the FP8 kernels' rounding."""
    from raymoe.actors.models.expert_mlp import FP8_WIDEN_ROWS_PER_SLOT
    from raymoe.actors.models.fp8_widen_triton import widen_blocks

    slots, hidden, inter, top_k = 16, 2048, 768, 8
    tokens = FP8_WIDEN_ROWS_PER_SLOT * slots // top_k
    g = torch.Generator(device="cuda").manual_seed(7)
    x = torch.randn(tokens, hidden, device="cuda", generator=g).bfloat16()
    w13, s13 = quantize_blocks(torch.randn(slots, 2 * inter, hidden, device="cuda", generator=g) / hidden**0.5, BLOCK)
    w2, s2 = quantize_blocks(torch.randn(slots, hidden, inter, device="cuda", generator=g) / inter**0.5, BLOCK)
    w13d = dequantize_blocks(w13, s13, BLOCK, torch.bfloat16)
    assert torch.equal(widen_blocks(w13, s13, BLOCK, torch.bfloat16), w13d)
    slot = torch.randint(0, slots, (tokens * top_k,), device="cuda", generator=g)
    keys, order = torch.sort(slot, stable=True)
    ends = torch.searchsorted(keys, torch.arange(1, slots + 1, device="cuda"), out_int32=True)
    rows = order // top_k
    got = expert_mlp(x, rows, ends, w13=w13, w2=w2, w13_scale=s13, w2_scale=s2, fp8_block=BLOCK)
    w2d = dequantize_blocks(w2, s2, BLOCK, torch.bfloat16)
    want = expert_mlp(x, rows, ends, w13=w13d, w2=w2d, backend="torch")
    assert torch.equal(got, want)
    fp8_kernels = expert_mlp(
        x, rows, ends, w13=w13, w2=w2, w13_scale=s13, w2_scale=s2, fp8_block=BLOCK, backend="triton"
    )
    assert 0 < _rel(fp8_kernels, want.float()) < 0.1
