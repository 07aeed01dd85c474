"""The Triton expert kernels, compiled for this GPU, against the torch._grouped_mm path
in bf16: decode-sized and prefill-sized row counts (each picks other block sizes), with
rows of other ranks' slots, and inside a CUDA graph."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from raymoe.actors.models.expert_mlp import expert_mlp  # noqa: E402


def _case(tokens: int, slots: int = 32, hidden: int = 512, inter: int = 192, top_k: int = 8, foreign: bool = False, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    bf = dict(device="cuda", dtype=torch.bfloat16, generator=g)
    x = torch.randn(tokens, hidden, **bf)
    w13 = torch.randn(slots, 2 * inter, hidden, **bf) / hidden**0.5
    w2 = torch.randn(slots, hidden, inter, **bf) / inter**0.5
    bucket = torch.randint(0, slots + int(foreign), (tokens * top_k,), device="cuda", generator=g)
    keys, order = torch.sort(bucket.to(torch.int16), stable=True)
    ends = torch.searchsorted(keys, torch.arange(1, slots + 1, dtype=torch.int16, device="cuda"), out_int32=True)
    return x, order // top_k, ends, w13, w2


def _rel_error(got, want) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.mark.parametrize("tokens", [1, 16, 256, 2048])
@pytest.mark.parametrize("foreign", [False, True])
def test_triton_matches_grouped_mm(tokens, foreign):
    x, rows, ends, w13, w2 = _case(tokens, foreign=foreign)
    want = expert_mlp(x, rows, ends, w13, w2, backend="torch")
    got = expert_mlp(x, rows, ends, w13, w2, backend="triton")
    # the torch path rounds gate/up to bf16 before SiLU-and-mul, Triton does not
    assert _rel_error(got, want) < 1e-2
    if foreign:
        tail = got[int(ends[-1]):]
        assert tail.shape[0] > 0 and bool((tail == 0).all()), "other ranks' rows must be zeros"


def test_triton_in_a_cuda_graph_follows_new_routing():
    x, rows, ends, w13, w2 = _case(64, foreign=True)
    graph = torch.cuda.CUDAGraph()
    expert_mlp(x, rows, ends, w13, w2, backend="triton")  # compile outside the capture
    with torch.cuda.graph(graph):
        out = expert_mlp(x, rows, ends, w13, w2, backend="triton")
    x2, rows2, ends2, _, _ = _case(64, foreign=True, seed=1)  # another routing, same shapes
    assert not torch.equal(ends, ends2)
    x.copy_(x2)
    rows.copy_(rows2), ends.copy_(ends2)
    graph.replay()
    assert _rel_error(out, expert_mlp(x, rows, ends, w13, w2, backend="torch")) < 1e-2
