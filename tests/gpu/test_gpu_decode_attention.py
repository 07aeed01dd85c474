"""The Triton paged decode attention (decode_attention_triton.py), compiled for this GPU,
against FlashInfer's decode over the same FP8 or bf16 cache and page table, eager and
replayed in a CUDA graph whose sequences change length between replays."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from raymoe.actors.engine.decode_attention_triton import decode_attention, decode_splits  # noqa: E402

PAGE, HEADS, KV_HEADS, DIM = 16, 32, 4, 128


def _flashinfer(q, cache, indptr, indices, lens):
    import flashinfer

    workspace = torch.zeros(128 << 20, dtype=torch.uint8, device="cuda")
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=True)
    last = (lens - (indptr[1:] - indptr[:-1] - 1) * PAGE).cpu()
    wrapper.plan(indptr.cpu(), indices, last, HEADS, KV_HEADS, DIM, PAGE, q_data_type=q.dtype, kv_data_type=cache.dtype)
    return wrapper.run(q, cache)


def _case(lens: list[int], kv_dtype: torch.dtype, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    pages = [-(-n // PAGE) for n in lens]
    blocks = sum(pages) + 5
    cache = torch.randn(blocks, 2, PAGE, KV_HEADS, DIM, device="cuda", generator=g).to(kv_dtype)
    indices = torch.randperm(blocks, device="cuda", generator=g)[: sum(pages)].to(torch.int32)
    indptr = torch.tensor([0] + pages, device="cuda").cumsum(0).to(torch.int32)
    q = torch.randn(len(lens), HEADS, DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    return q, cache, indptr, indices, torch.tensor(lens, dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.bfloat16])
@pytest.mark.parametrize("lens", [[1], [1000], [17, 1, 4096, 300], [1024] * 64])
def test_decode_attention_matches_flashinfer(lens, kv_dtype):
    q, cache, indptr, indices, n = _case(lens, kv_dtype, seed=len(lens))
    want = _flashinfer(q, cache, indptr, indices, n).float()
    for splits in sorted({1, 3, decode_splits(len(lens), KV_HEADS)}):
        got = decode_attention(q, cache, indptr, indices, n, splits=splits).float()
        # both round p to bf16 for the second product; the outputs are bf16
        assert (got - want).abs().max().item() < 2e-2, splits


def test_decode_attention_replays_in_a_cuda_graph_as_lengths_change():
    lens = [700, 40, 1500, 3]
    q, cache, indptr, indices, n = _case(lens, torch.float8_e4m3fn, seed=7)
    splits = decode_splits(len(lens), KV_HEADS)
    out = torch.empty_like(q)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        decode_attention(q, cache, indptr, indices, n, splits=splits, out=out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(q, cache, indptr, indices, n, splits=splits, out=out)
    for shorter in ([700, 40, 1500, 3], [1, 33, 1490, 2], [640, 16, 17, 1]):
        n.copy_(torch.tensor(shorter, dtype=torch.int32))  # the same pages, fewer of their tokens
        graph.replay()
        want = decode_attention(q, cache, indptr, indices, n, splits=1)
        torch.testing.assert_close(out, want, rtol=0, atol=2e-2)
        assert not out.isnan().any()
