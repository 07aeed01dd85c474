"""The Triton paged decode attention (decode_attention_triton.py), compiled for this GPU,
against FlashInfer's decode over the same FP8 or bf16 cache and page table, eager and
replayed in a CUDA graph whose sequences change length between replays."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from raymoe.actors.engine.decode_attention_triton import TritonDecode  # noqa: E402

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


def _decode(indptr, indices, lens, **kwargs) -> TritonDecode:
    decode = TritonDecode(lens.shape[0], indices.shape[0], KV_HEADS, lens.device, **kwargs)
    decode.plan(indptr.cpu(), indices, lens.cpu())
    return decode


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.bfloat16])
# one long sequence among short ones: in a small batch, and in one that fills the GPU
@pytest.mark.parametrize(
    "lens", [[1], [1000], [17, 1, 4096, 300], [1024] * 64, [20000] + [1, 90] * 3, [8192] + [100] * 79]
)
def test_decode_attention_matches_flashinfer(lens, kv_dtype):
    q, cache, indptr, indices, n = _case(lens, kv_dtype, seed=len(lens))
    want = _flashinfer(q, cache, indptr, indices, n).float()
    # one part each, the default's parts, and parts of one step (64 tokens) each
    for target_programs in (1, 264, 100_000):
        decode = _decode(indptr, indices, n, target_programs=target_programs)
        got = decode.run(q, cache).float()
        # both round p to bf16 for the second product; the outputs are bf16
        assert (got - want).abs().max().item() < 2e-2, target_programs


def test_decode_attention_replays_in_a_cuda_graph_as_lengths_change():
    lens = [700, 40, 1500, 3]
    q, cache, indptr, indices, n = _case(lens, torch.float8_e4m3fn, seed=7)
    decode = _decode(indptr, indices, n)
    out = torch.empty_like(q)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        decode.run(q, cache, out=out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode.run(q, cache, out=out)
    # the same pages, fewer of their tokens: the parts change with the lengths
    for shorter in ([700, 40, 1500, 3], [1, 33, 1490, 2], [640, 16, 17, 1]):
        lens_now = torch.tensor(shorter, dtype=torch.int32)
        decode.plan(indptr.cpu(), indices, lens_now)
        graph.replay()
        want = _decode(indptr, indices, lens_now.cuda(), target_programs=1).run(q, cache)
        torch.testing.assert_close(out, want, rtol=0, atol=2e-2)
        assert not out.isnan().any()
