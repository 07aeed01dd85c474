"""The Triton MoE kernels compiled for this GPU against the torch paths: the dispatch
(the same groups exactly, on float32 logits, which have no ties), the expert MLP in bf16 at decode and
larger row counts (each picks other block sizes) and in float32 (not TF32), with other ranks' rows, the combine
(alone and fused with the residual add and RMSNorm), and all three inside a CUDA graph replayed on new inputs."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from dispatch_checks import assert_same_grouping, choices_by_slot  # noqa: E402

from raymoe.actors.models import ops  # noqa: E402
from raymoe.actors.models.expert_mlp import expert_mlp  # noqa: E402
from raymoe.actors.models.moe_combine import combine, combine_add_rms_norm  # noqa: E402
from raymoe.actors.models.moe_dispatch import dispatch  # noqa: E402
from raymoe.actors.models.spec import GroupedTopK  # noqa: E402
from raymoe.cluster.expert_slots import replica_tables  # noqa: E402


def _mlp_case(
    tokens: int,
    slots: int = 32,
    hidden: int = 512,
    inter: int = 192,
    top_k: int = 8,
    foreign: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
):
    g = torch.Generator(device="cuda").manual_seed(seed)
    bf = dict(device="cuda", dtype=dtype, generator=g)
    x = torch.randn(tokens, hidden, **bf)
    w13 = torch.randn(slots, 2 * inter, hidden, **bf) / hidden**0.5
    w2 = torch.randn(slots, hidden, inter, **bf) / inter**0.5
    bucket = torch.randint(0, slots + int(foreign), (tokens * top_k,), device="cuda", generator=g)
    bucket[-1] = slots if foreign else 0  # at least one row of another rank
    keys, order = torch.sort(bucket.to(torch.int16), stable=True)
    ends = torch.searchsorted(keys, torch.arange(1, slots + 1, dtype=torch.int16, device="cuda"), out_int32=True)
    return x, order // top_k, ends, w13, w2


def _rel_error(got, want) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.mark.parametrize("tokens", [1, 16, 256, 1024])
@pytest.mark.parametrize("foreign", [False, True])
def test_expert_mlp_triton_matches_grouped_mm(tokens, foreign):
    x, rows, ends, w13, w2 = _mlp_case(tokens, foreign=foreign)
    want = expert_mlp(x, rows, ends, w13=w13, w2=w2, backend="torch")
    got = expert_mlp(x, rows, ends, w13=w13, w2=w2, backend="triton")
    mine = int(ends[-1])  # rows past it are other ranks': neither path writes them
    # the torch path rounds gate/up to bf16 before SiLU-and-mul, Triton does not
    assert _rel_error(got[:mine], want[:mine]) < 1e-2


@pytest.mark.parametrize("tokens", [1, 256])
def test_expert_mlp_triton_float32_is_not_tf32(tokens):
    # TF32 keeps 10 mantissa bits: about 1e-3 relative here; float32 sums differ by about 1e-7
    x, rows, ends, w13, w2 = _mlp_case(tokens, dtype=torch.float32)
    want = expert_mlp(x, rows, ends, w13=w13, w2=w2, backend="torch")
    got = expert_mlp(x, rows, ends, w13=w13, w2=w2, backend="triton")
    assert _rel_error(got, want) < 1e-5


def _dispatch_args(tokens: int, experts: int = 128, physical: int = 160, top_k: int = 8, ep: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=g).cuda()
    p2l = torch.cat(
        [torch.randperm(experts, generator=g), torch.randint(0, experts, (physical - experts,), generator=g)]
    )
    l2p, counts = replica_tables(p2l.view(1, -1), experts)
    slots = physical // ep
    valid = (torch.rand(tokens, generator=g) < 0.9).cuda()
    return dict(
        logits=logits,
        top_k=top_k,
        norm_topk_prob=True,
        logical_to_physical=l2p[0].cuda(),
        replica_count=counts[0].cuda(),
        num_physical=physical,
        slot_start=slots,
        slots=slots,
        valid=valid,
    )


@pytest.mark.parametrize("tokens", [1, 64, 256, 512])
def test_dispatch_triton_groups_as_torch(tokens):
    args = _dispatch_args(tokens)
    assert_same_grouping(dispatch(**args, backend="triton"), dispatch(**args, backend="torch"))


@pytest.mark.parametrize("tokens", [1, 64, 256])
def test_dispatch_triton_routes_grouped_as_torch(tokens):
    """DeepSeek-V3's router (sigmoid + correction bias, 4 of 8 groups, top-8 of 256)."""
    args = _dispatch_args(tokens, experts=256, physical=288)
    bias = (torch.randn(256, generator=torch.Generator().manual_seed(1)) * 0.2).cuda()
    rule = GroupedTopK(num_groups=8, topk_groups=4, routed_scaling_factor=2.5)
    args.update(grouped=rule, correction_bias=bias)
    got, want = dispatch(**args, backend="triton"), dispatch(**args, backend="torch")
    assert_same_grouping(choices_by_slot(got), choices_by_slot(want))


def test_dispatch_and_mlp_in_a_cuda_graph_follow_new_inputs():
    x, _, _, w13, w2 = _mlp_case(64, slots=80, foreign=True)
    args = _dispatch_args(64)

    def layer():
        d = dispatch(**args)
        y = expert_mlp(x, d.rows, d.ends, w13=w13, w2=w2, groups=d.groups)
        return combine(y, d.sorted_row, d.weights, d.ends), d

    layer()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, d = layer()
    new = _dispatch_args(64, seed=1)
    args["logits"].copy_(new["logits"])
    x.copy_(torch.randn_like(x))
    graph.replay()
    want = dispatch(**args, backend="torch")
    assert_same_grouping(d, want)
    y = expert_mlp(x, want.rows, want.ends, w13=w13, w2=w2, backend="torch")
    assert _rel_error(out, combine(y, want.sorted_row, want.weights, want.ends, backend="torch")) < 1e-2


@pytest.mark.parametrize("tokens", [1, 256])
def test_combine_triton_equals_torch_and_skips_foreign_rows(tokens):
    g = torch.Generator(device="cuda").manual_seed(tokens)
    m, top_k = tokens * 8, 8
    y = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16, generator=g)
    mine = m // 2
    y[mine:] = float("nan")
    sorted_row = torch.randperm(m, device="cuda", generator=g).view(tokens, top_k)
    weights = torch.rand(tokens, top_k, device="cuda", generator=g).to(torch.bfloat16)
    ends = torch.tensor([mine], dtype=torch.int32, device="cuda")
    want = combine(y, sorted_row, weights, ends, backend="torch")
    got = combine(y, sorted_row, weights, ends, backend="triton")
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("tokens", [1, 256])
def test_combine_fused_with_add_rms_norm(tokens):
    """The fused kernel's residual is the combine's bf16 sum added to it, bit for bit; its
    norm is RMSNorm of that residual to bf16 rounding."""
    g = torch.Generator(device="cuda").manual_seed(tokens)
    bf = dict(device="cuda", dtype=torch.bfloat16, generator=g)
    m, top_k = tokens * 8, 8
    y = torch.randn(m, 2048, **bf)
    mine = m // 2
    y[mine:] = float("nan")
    sorted_row = torch.randperm(m, device="cuda", generator=g).view(tokens, top_k)
    weights = torch.rand(tokens, top_k, **bf)
    ends = torch.tensor([mine], dtype=torch.int32, device="cuda")
    residual, weight = torch.randn(tokens, 2048, **bf), 1 + 0.1 * torch.randn(2048, **bf)
    summed = combine(y, sorted_row, weights, ends, backend="triton")
    want_residual = residual + summed
    want_normed = ops.rms_norm(want_residual, weight, 1e-6)
    normed, got_residual = combine_add_rms_norm(
        y, sorted_row, weights, ends, residual=residual, weight=weight, eps=1e-6, backend="triton"
    )
    assert got_residual is residual
    assert torch.equal(residual, want_residual)
    torch.testing.assert_close(normed, want_normed, rtol=2**-6, atol=2**-6)
