"""The kernels of the dense part of a layer, compiled for this GPU, against references:
the one-row Triton linear (F.linear), the rotary embedding (transformers'), the fused q/k
norm + rotary Triton kernel (the unfused path: FlashInfer's norm and rotary), the Triton KV
write into a bf16 or FP8 cache (the torch backend's ``write_kv``)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from raymoe.actors.engine.attention_torch import write_kv  # noqa: E402
from raymoe.actors.models import ops  # noqa: E402
from raymoe.actors.models.linear import linear  # noqa: E402


@pytest.mark.parametrize("rows", [1, 3, 4])
@pytest.mark.parametrize("n,k,bias", [(5120, 2048, False), (2048, 4096, True), (120, 2048, False)])
def test_skinny_linear_matches_cublas(rows, n, k, bias):
    g = torch.Generator(device="cuda").manual_seed(rows)
    bf = dict(device="cuda", dtype=torch.bfloat16, generator=g)
    x, w = torch.randn(rows, k, **bf), torch.randn(n, k, **bf) / k**0.5
    b = torch.randn(n, **bf) if bias else None
    want = torch.nn.functional.linear(x.float(), w.float(), b.float() if bias else None)
    got = linear(x, w, b, backend="triton").float()
    assert got.shape == (rows, n)
    assert ((got - want).norm() / want.norm()).item() < 5e-3  # one bf16 rounding of the output


def test_zero_rows_take_the_torch_path():
    # a step where no chunk samples computes logits for 0 rows: the one-row kernel must not run
    w = torch.randn(128, 2048, device="cuda", dtype=torch.bfloat16)
    assert linear(torch.zeros(0, 2048, device="cuda", dtype=torch.bfloat16), w).shape == (0, 128)


def test_kv_append_of_no_tokens_is_a_no_op():
    from raymoe.actors.engine.attention_flashinfer import KVAppend

    cache = torch.zeros(4, 2, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
    append = KVAppend(0, torch.device("cuda"))
    append.fill(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    empty = torch.zeros(0, 2, 64, device="cuda", dtype=torch.bfloat16)
    append(cache, empty, empty)  # an idle replica's eager step
    assert not cache.any()


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
@pytest.mark.parametrize("graph", [False, True])
def test_kv_append_writes_where_write_kv_does(graph, cache_dtype):
    from raymoe.actors.engine.attention_flashinfer import KVAppend
    from raymoe.actors.engine.attention_torch import to_cache_dtype

    blocks_total, block_size, kv_heads, d, tokens = 12, 16, 2, 64, 7
    cache = torch.zeros(blocks_total, 2, block_size, kv_heads, d, device="cuda", dtype=cache_dtype)
    # k and v are views into one qkv row, as the attention block produces them; some past FP8's range
    qkv = torch.randn(tokens, (4 + 2 * kv_heads) * d, device="cuda", dtype=torch.bfloat16) * 200
    k = qkv[:, 4 * d : (4 + kv_heads) * d].view(tokens, kv_heads, d)
    v = qkv[:, (4 + kv_heads) * d :].view(tokens, kv_heads, d)
    blocks, offsets = torch.tensor([3, 3, 5, 0, 11]), torch.tensor([0, 1, 15, 4, 9])
    append = KVAppend(tokens, torch.device("cuda"))
    # 5 real rows; the last two are padding: they go to offset 0 of the scratch block 9
    append.fill(blocks, offsets, pad_block=9)
    if graph:
        append(cache.clone(), k, v)  # warm-up outside the capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            append(cache, k, v)
        g.replay()
    else:
        append(cache, k, v)
    want = torch.zeros_like(cache)
    write_kv(want, blocks.cuda(), offsets.cuda(), k=k[:5], v=v[:5])
    others = torch.arange(blocks_total, device="cuda") != 9
    assert torch.equal(cache[others].view(torch.uint8), want[others].view(torch.uint8))
    # the two padding rows race for the same place: either one's k (and v) may land there
    bits = lambda x: to_cache_dtype(x, cache_dtype).view(torch.uint8)  # noqa: E731
    assert any(torch.equal(cache[9, 0, 0].view(torch.uint8), bits(k[t])) for t in (5, 6))
    assert any(torch.equal(cache[9, 1, 0].view(torch.uint8), bits(v[t])) for t in (5, 6))
    assert not cache[9, :, 1:].view(torch.uint8).any()
    if cache_dtype == torch.float8_e4m3fn:  # saturated, not NaN
        assert cache.float().abs().max() == 448 and not cache.float().isnan().any()


@pytest.mark.parametrize(
    "head_dim,rotary_dim",
    # FlashInfer's kernel where it fits; the odd widths of small configs (12, 20, MLA's 4) and a
    # rotated half of 12 at head_dim 64 read misaligned vectors there and take torch's path
    [(128, 128), (128, 64), (64, 32), (64, 24), (12, 12), (20, 20), (12, 4), (4, 4)],
)
def test_rotary_matches_transformers(head_dim, rotary_dim):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator(device="cuda").manual_seed(head_dim + rotary_dim)
    tokens, heads, kv_heads = 5, 8, 2
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    positions = torch.tensor([0, 7, 100, 1023, 4095], device="cuda")
    inv_freq = 1.0 / (1e4 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
    freqs = torch.arange(4096, dtype=torch.float)[:, None] * inv_freq[None, :]
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1).cuda()
    emb = torch.cat((freqs, freqs), dim=-1).cuda()[positions]  # transformers' [T, rotary_dim]
    rot = slice(0, rotary_dim)
    want_q, want_k = apply_rotary_pos_emb(  # [T, heads, D]: cos/sin broadcast over heads (dim 1)
        q[..., rot].float(), k[..., rot].float(), emb.cos(), emb.sin(), unsqueeze_dim=1
    )
    want_q = torch.cat((want_q, q[..., rotary_dim:].float()), dim=-1)
    want_k = torch.cat((want_k, k[..., rotary_dim:].float()), dim=-1)
    got_q, got_k = ops.rotary_(positions, q.clone(), k.clone(), cos_sin)
    torch.cuda.synchronize()
    for got, want in ((got_q, want_q), (got_k, want_k)):
        assert got.shape == want.shape
        assert ((got.float() - want).norm() / want.norm()).item() < 1e-2


def test_qk_norm_rotary_kernel_matches_torch():
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens, heads, kv_heads, d = 5, 32, 4, 128
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, device="cuda", dtype=torch.bfloat16, generator=g)
    q = qkv[:, : heads * d].view(tokens, heads, d)
    k = qkv[:, heads * d : (heads + kv_heads) * d].view(tokens, kv_heads, d)
    wq = torch.rand(d, device="cuda", generator=g).to(torch.bfloat16) + 0.5
    wk = torch.rand(d, device="cuda", generator=g).to(torch.bfloat16) + 0.5
    positions = torch.tensor([0, 7, 100, 1023, 4095], device="cuda")
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    freqs = torch.arange(4096, dtype=torch.float)[:, None] * inv_freq[None, :]
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1).cuda()
    norm_rope = dict(q_weight=wq, k_weight=wk, eps=1e-6, cos_sin=cos_sin)
    want_q, want_k = ops.qk_norm_rotary_(positions, q.clone(), k.clone(), **norm_rope, backend="torch")
    got_q, got_k = ops.qk_norm_rotary_(positions, q, k, **norm_rope, backend="triton")
    assert got_q.data_ptr() == q.data_ptr()  # in place, in the qkv buffer
    for got, want in ((got_q, want_q), (got_k, want_k)):
        assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2


def test_latent_norm_rotary_kernel_matches_torch():
    """MLA's norm + rotary at DeepSeek-V2-Lite's widths (16 heads, nope 128, latent 512, rope
    64), reading the query and latent in place from one projection row."""
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens, heads = 5, 16
    proj = torch.randn(tokens, heads * 192 + 576, device="cuda", dtype=torch.bfloat16, generator=g)
    q, latent = proj[:, : heads * 192].view(tokens, heads, 192), proj[:, heads * 192 :]
    weight = torch.rand(512, device="cuda", generator=g).to(torch.bfloat16) + 0.5
    positions = torch.tensor([0, 7, 100, 1023, 4095], device="cuda")
    inv_freq = 1.0 / (1e4 ** (torch.arange(0, 64, 2, dtype=torch.float) / 64))
    freqs = torch.arange(4096, dtype=torch.float)[:, None] * inv_freq[None, :]
    args = dict(
        norm_weight=weight, eps=1e-6, cos_sin=torch.cat((freqs.cos(), freqs.sin()), dim=-1).cuda(), nope_dim=128
    )
    before = proj.clone()
    want = ops.latent_norm_rotary(positions, q, latent, **args, backend="torch")
    got = ops.latent_norm_rotary(positions, q, latent, **args, backend="triton")
    assert torch.equal(proj, before), "the projection row is read, not written"
    for g_, w_ in zip(got, want):
        assert g_.shape == w_.shape and g_.is_contiguous()
        assert ((g_.float() - w_.float()).norm() / w_.float().norm()).item() < 1e-2


@pytest.mark.parametrize("ranks,tokens,width", [(2, 1, 2048), (4, 64, 7168), (8, 3, 40)])
def test_one_shot_collectives_over_buffers_of_simulated_peers(ranks, tokens, width):
    """The symmetric-memory kernels with each peer's buffer simulated as a buffer on this GPU:
    the gather copies every rank's rows bit for bit; the sum of one replica's rows (a
    reduce-scatter) fused with add + norm matches torch's float32 sum, add and norm."""
    from raymoe.comm.gather_rows_triton import gather_rows
    from raymoe.comm.reduce_add_rms_norm_triton import reduce_add_rms_norm_

    g = torch.Generator(device="cuda").manual_seed(ranks)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    rows = 2 * tokens  # two replicas' rows in every buffer, after 5 elements of something else
    parts = [torch.randn(rows, width, device="cuda", generator=g).bfloat16() for _ in range(ranks)]
    buffers = [torch.cat([torch.zeros(5, **bf), p.flatten()]) for p in parts]
    addresses = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64, device="cuda")
    assert torch.equal(gather_rows(addresses, 5, parts[0]), torch.cat(parts))

    residual = torch.randn(tokens, width, device="cuda", generator=g).bfloat16()
    weight = torch.randn(width, device="cuda", generator=g).bfloat16()
    mine = slice(tokens, rows)  # the second replica's rows
    summed = sum(p[mine].float() for p in parts).bfloat16()
    want_normed, want_residual = ops.add_rms_norm(summed, residual.clone(), weight, 1e-6)
    normed = reduce_add_rms_norm_(addresses, 5 + tokens * width, residual, weight, eps=1e-6)
    torch.testing.assert_close(residual, want_residual, rtol=2**-7, atol=2**-7)
    torch.testing.assert_close(normed, want_normed, rtol=2**-6, atol=2**-6)


def test_replicas_sum_norm_and_gather_over_buffers_of_simulated_peers():
    """Data-parallel attention's norm before the MoE (the all-reduce over each replica's
    attention ranks, add + norm, the all-gather over replicas) as one kernel over 3 replicas of
    2 simulated ranks: every replica's normed rows and this replica's residual, against the
    unfused math."""
    from raymoe.comm.reduce_add_rms_norm_triton import reduce_add_rms_norm_gather_

    replicas, attn, rows, tokens, width, mine = 3, 2, 16, 11, 2048, 2
    g = torch.Generator(device="cuda").manual_seed(0)
    partials = torch.randn(replicas, attn, rows, width, device="cuda", generator=g).bfloat16()
    residuals = torch.randn(replicas, rows, width, device="cuda", generator=g).bfloat16()
    weight = torch.randn(width, device="cuda", generator=g).bfloat16()
    buffers = [
        torch.cat([partials[d, a].flatten(), residuals[d].flatten()]) for d in range(replicas) for a in range(attn)
    ]
    table = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64, device="cuda").view(replicas, attn)
    residual = residuals[mine, :tokens].clone()
    got = reduce_add_rms_norm_gather_(table, 0, residual, weight, mine=mine, rows=rows, eps=1e-6)
    summed = partials.float().sum(1).bfloat16().flatten(0, 1)
    want, want_residuals = ops.add_rms_norm(summed, residuals.flatten(0, 1).clone(), weight, 1e-6)
    torch.testing.assert_close(got, want, rtol=2**-6, atol=2**-6)
    assert torch.equal(residual, want_residuals.view(replicas, rows, width)[mine, :tokens])
