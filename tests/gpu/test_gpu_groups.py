"""GPU rank actors through the controller: device choice, NCCL collectives, torch
symmetric memory (rendezvous + one-shot all-reduce, no multicast) inside the ranks.

Needs CUDA; the two-GPU tests need two GPUs on this host.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
ray = pytest.importorskip("ray")
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

from raymoe.cluster.config import config_from_dict  # noqa: E402
from raymoe.deploy.launch import start_controller  # noqa: E402

two_gpus = pytest.mark.skipif(GPUS < 2, reason="needs 2 GPUs on this host")


def _cuda_config(tp: int):
    return config_from_dict({"parallel": {"tp": tp, "device": "cuda", "placement_timeout_s": 60}})


def _expected_index(gpu_id: int, visible: str | None) -> int:
    """Every GPU of the node is visible to a rank: a Ray GPU id indexes them directly,
    or by its position when the node itself runs under CUDA_VISIBLE_DEVICES."""
    ids = [v.strip() for v in (visible or "").split(",") if v.strip()]
    return ids.index(str(gpu_id)) if str(gpu_id) in ids else gpu_id


# ---- run on the ranks (travel by value) --------------------------------------------------


def _device_report(ctx) -> dict:
    return {
        "rank": ctx.rank,
        "device": str(ctx.device),
        "current": torch.cuda.current_device(),
        "visible": torch.cuda.device_count(),
        "ray_gpu_ids": [int(g) for g in ray.get_gpu_ids()],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "nvls_off": os.environ.get("NCCL_NVLS_ENABLE") == "0",
        "multicast_off": os.environ.get("TORCH_SYMM_MEM_DISABLE_MULTICAST") == "1",
    }


def _single_rank(ctx) -> dict:
    g = ctx.groups.tp
    x = torch.arange(4.0, device=ctx.device)
    return {
        "size": g.world_size,
        "no_groups": g.device_group is None and g.cpu_group is None,
        "same_tensor": g.all_reduce(x) is x and g.all_gather(x) is x and g.reduce_scatter(x) is x,
        "values": x.cpu().tolist(),
        "objects": g.all_gather_object(ctx.rank),
    }


def _nccl_collectives(ctx, n: int) -> dict:
    import torch.distributed as dist

    g = ctx.groups.tp
    x = torch.arange(n, device=ctx.device, dtype=torch.float32) + 1000.0 * ctx.rank
    summed = g.all_reduce(x.clone())
    gathered = g.all_gather(x.view(1, n), dim=0)
    scattered = g.reduce_scatter(x.view(g.world_size, -1).clone(), dim=0)
    torch.cuda.synchronize(ctx.device)
    g.barrier()
    return {
        "backends": (dist.get_backend(g.device_group), dist.get_backend(g.cpu_group)),
        "sum": summed.cpu(),
        "gathered": gathered.cpu(),
        "scattered": scattered.cpu(),
        "on_device": summed.device == ctx.device,
    }


def _symm_mem_all_reduce(ctx, n: int) -> dict:
    """The tp group's all-reduce of bf16 (symmetric memory up to its size limit, NCCL above),
    eagerly and twice in a row inside a CUDA graph (the symmetric buffer reused), against NCCL."""
    import torch.distributed as dist

    g = ctx.groups.tp
    x = (torch.arange(n, device=ctx.device) % 61 + ctx.rank).to(torch.bfloat16)  # small integers: exact
    nccl = x.clone()
    dist.all_reduce(nccl, group=g.device_group)
    eager = g.all_reduce(x.clone())
    static = x.clone()
    side = torch.cuda.Stream(ctx.device)
    side.wait_stream(torch.cuda.current_stream(ctx.device))
    with torch.cuda.stream(side):
        g.all_reduce(static.clone())  # warm-up outside the capture
    torch.cuda.current_stream(ctx.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        once = g.all_reduce(static)
        twice = g.all_reduce(once.clone())  # NCCL reduces in place: keep `once` as it was
    static.copy_(x * 2)
    graph.replay()
    torch.cuda.synchronize(ctx.device)
    return {
        "symmetric": g.symmetric is not None and g.symmetric.eligible(x),
        "nccl": nccl.float().cpu(),
        "eager": eager.float().cpu(),
        "once": once.float().cpu(),
        "twice": twice.float().cpu(),
    }


FUSED_WIDTH = 2048


def _fused_inputs(rank: int, tokens: int, calls: int):
    """Rank ``rank``'s partials for ``calls`` calls; the residual and weight every rank shares."""
    parts = torch.randn(calls, tokens, FUSED_WIDTH, generator=torch.Generator().manual_seed(rank + 1))
    shared = torch.Generator().manual_seed(0)
    residual = torch.randn(tokens, FUSED_WIDTH, generator=shared)
    weight = 1 + 0.1 * torch.randn(FUSED_WIDTH, generator=shared)
    return parts.to(torch.bfloat16), residual.to(torch.bfloat16), weight.to(torch.bfloat16)


def _reduce_add_rms_norm(ctx, tokens: int, calls: int) -> dict:
    """RMSNorm.add_forward of a PartialSum over the tp group, every other partial written
    straight into the symmetric buffer (the copy skipped): ``calls`` calls in a row with
    no other sync between them (a buffer reused too early shows as wrong sums), eagerly,
    then in a CUDA graph replayed twice (the second replay goes on from the first's
    residual)."""
    from raymoe.actors.models.layers import PartialSum, RMSNorm

    g, dev = ctx.groups.tp, ctx.device
    parts, residual, weight = (t.to(dev) for t in _fused_inputs(ctx.rank, tokens, calls))
    norm = RMSNorm(FUSED_WIDTH, 1e-6, torch.bfloat16, dev)
    norm.weight.copy_(weight)

    def one_pass(res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = []
        for i in range(calls):
            # as the MoE combine does: every other partial written straight where the sum reads it
            mine = g.partial_buffer(res) if i % 2 else None
            x = mine.copy_(parts[i]) if mine is not None else parts[i].clone()
            h, res = norm.add_forward(PartialSum(x, g), res)
            outs.append(h)
        g.finish_pass()
        return torch.stack(outs), res

    eager, eager_residual = one_pass(residual.clone())
    static = residual.clone()
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        one_pass(static.clone())  # warm-up outside the capture
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs, res = one_pass(static)
    static.copy_(residual)
    graph.replay()
    first, first_residual = outs.clone(), res.clone()
    graph.replay()
    torch.cuda.synchronize(dev)
    return {
        "fused": g.partial_buffer(static) is not None,
        "eager": eager.cpu(),
        "eager_residual": eager_residual.cpu(),
        "first": first.cpu(),
        "first_residual": first_residual.cpu(),
        "second": outs.cpu(),
        "second_residual": res.cpu(),
    }


def _one_step_collectives(ctx, tokens: int) -> dict:
    """The world group's one-step all-gather (of each rank's first ``tokens`` rows) and sum of
    this rank's rows fused with add + norm (a reduce-scatter), in a row with the tp group's
    fused all-reduce between them, eagerly and in a CUDA graph replayed twice."""
    from raymoe.actors.models import ops

    g, dev = ctx.groups.world, ctx.device
    parts, residual, weight = (t.to(dev) for t in _fused_inputs(ctx.rank, 2 * tokens, 1))
    x, residual = parts[0], residual[:tokens]
    mine = ctx.rank * tokens

    def reduce_rows(out: torch.Tensor) -> torch.Tensor:
        return g.reduce_scatter(out)

    def one_pass(res: torch.Tensor):
        gathered = g.gather_over(g, x[:tokens].contiguous())
        h, res = g.reduce_rows_add_rms_norm(
            x, mine, res, weight, 1e-6, reduce_rows=reduce_rows, add_rms_norm=ops.add_rms_norm
        )
        # the norm before a data-parallel MoE layer: one replica of the two tp ranks here
        replicas = dict(attn=ctx.groups.tp, dp=ctx.groups.dp, rows=tokens + 3, add_rms_norm=ops.add_rms_norm)
        h_all, res = g.all_reduce_add_rms_norm_gather(x[:tokens].contiguous(), res, weight, 1e-6, **replicas)
        g.finish_pass()
        return gathered, h, h_all, res

    eager = [t.cpu() for t in one_pass(residual.clone())]
    static = residual.clone()
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        one_pass(static.clone())
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = one_pass(static)
    static.copy_(residual)
    graph.replay()
    torch.cuda.synchronize(dev)
    one_step = g.symmetric is not None and g.symmetric.one_step(x.numel(), x.dtype)
    return {"one_step": one_step, "eager": eager, "graph": [t.cpu() for t in outs]}


def _reference_passes(tokens: int, calls: int, passes: int):
    """The unfused math on the CPU: the all-reduce's sum rounded to bf16, then add + RMSNorm."""
    from raymoe.actors.models import ops

    (p0, residual, weight), (p1, _, _) = (_fused_inputs(r, tokens, calls) for r in range(2))
    outs, residuals = [], []
    for _ in range(passes):
        for i in range(calls):
            summed = (p0[i].float() + p1[i].float()).to(torch.bfloat16)
            h, residual = ops.add_rms_norm(summed, residual.clone(), weight, 1e-6)
            outs.append(h)
        residuals.append(residual.clone())
    return torch.stack(outs).view(passes, calls, tokens, FUSED_WIDTH), residuals


# ---- tests ------------------------------------------------------------------------------------


def test_one_gpu_tp1_controller_short_circuits(gpu_ray):
    controller = start_controller(_cuda_config(1))
    try:
        (report,) = ray.get(controller.run_on_ranks.remote(_device_report))
        gpu = report["ray_gpu_ids"]
        assert len(gpu) == 1
        assert report["device"] == f"cuda:{_expected_index(gpu[0], report['cuda_visible_devices'])}"
        assert report["current"] == torch.device(report["device"]).index
        assert report["visible"] == GPUS, "a rank sees every GPU of its node"
        assert report["nvls_off"] and report["multicast_off"]
        (single,) = ray.get(controller.run_on_ranks.remote(_single_rank))
        assert single == {
            "size": 1,
            "no_groups": True,
            "same_tensor": True,
            "values": [0.0, 1.0, 2.0, 3.0],
            "objects": [0],
        }
        health = ray.get(controller.health.remote())
        assert health["status"] == "ok" and health["ranks"][0]["gpu_total_gib"] > 0
    finally:
        ray.get(controller.shutdown.remote())
        ray.kill(controller)


@pytest.fixture(scope="module")
def tp2_controller(gpu_ray):
    if GPUS < 2:
        pytest.skip("needs 2 GPUs")
    controller = start_controller(_cuda_config(2))
    yield controller
    ray.get(controller.shutdown.remote())
    ray.kill(controller)


@two_gpus
def test_tp2_ranks_use_their_ray_gpu_and_see_all(tp2_controller):
    reports = ray.get(tp2_controller.run_on_ranks.remote(_device_report))
    devices = set()
    for r in reports:
        (gpu,) = r["ray_gpu_ids"]
        assert r["device"] == f"cuda:{_expected_index(gpu, r['cuda_visible_devices'])}"
        assert r["current"] == torch.device(r["device"]).index
        assert r["visible"] == GPUS
        assert r["nvls_off"] and r["multicast_off"]
        devices.add(r["device"])
    assert len(devices) == 2, "each rank has its own GPU"


@two_gpus
@pytest.mark.parametrize("n", [8, 1 << 20])
def test_tp2_nccl_collectives(tp2_controller, n):
    got = ray.get(tp2_controller.run_on_ranks.remote(_nccl_collectives, n))
    inputs = [torch.arange(n, dtype=torch.float32) + 1000.0 * r for r in range(2)]
    total = inputs[0] + inputs[1]
    for rank, r in enumerate(got):
        assert r["backends"] == ("nccl", "gloo")
        assert r["on_device"]
        assert torch.equal(r["sum"], total)
        assert torch.equal(r["gathered"], torch.stack(inputs))
        assert torch.equal(r["scattered"], total.view(2, -1)[rank : rank + 1])


@two_gpus
@pytest.mark.parametrize("n", [1024, 1 << 18, 2 << 20])
def test_tp2_symmetric_memory_all_reduce(tp2_controller, n):
    got = ray.get(tp2_controller.run_on_ranks.remote(_symm_mem_all_reduce, n))
    want = sum((torch.arange(n) % 61 + r).float() for r in range(2))
    for r in got:
        # 2 MiB of bf16 and less go through symmetric memory; 4 MiB stays on NCCL
        assert r["symmetric"] == (n * 2 <= 2 << 20)
        assert torch.equal(r["nccl"], want)
        assert torch.equal(r["eager"], want), "the group's all-reduce disagrees with NCCL"
        assert torch.equal(r["once"], 2 * want), "all-reduce replayed in a CUDA graph is wrong"
        assert torch.equal(r["twice"], 4 * want), "a second all-reduce in the same graph is wrong"


@two_gpus
@pytest.mark.parametrize("tokens,calls", [(1, 3), (256, 5), (600, 2)])
def test_tp2_all_reduce_fused_with_add_rms_norm(tp2_controller, tokens, calls):
    """1 and 256 tokens take the fused symmetric-memory kernel; 600 x 2048 bf16 (2.4 MiB) is
    over its limit and takes NCCL + add + norm. Both must give the unfused math's residual
    bit for bit (the same additions in the same order) and its norm to bf16 rounding."""
    got = ray.get(tp2_controller.run_on_ranks.remote(_reduce_add_rms_norm, tokens, calls))
    want, want_residuals = _reference_passes(tokens, calls, passes=2)
    for r in got:
        assert r["fused"] == (tokens * FUSED_WIDTH * 2 <= 2 << 20)
        for name, out, residual, expect in [
            ("eager", r["eager"], r["eager_residual"], 0),
            ("graph replay 1", r["first"], r["first_residual"], 0),
            ("graph replay 2", r["second"], r["second_residual"], 1),
        ]:
            assert torch.equal(residual, want_residuals[expect]), f"{name}: residual differs"
            torch.testing.assert_close(out, want[expect], rtol=2**-6, atol=2**-6, msg=f"{name}: norm differs")
        assert torch.equal(got[0]["second"], got[1]["second"]), "the ranks disagree"


@two_gpus
@pytest.mark.parametrize("tokens", [1, 64])
def test_world_one_step_gather_and_replica_rows_sum(tp2_controller, tokens):
    """The DP-attention path's collectives on the world group's symmetric buffer: the gather
    stacks every rank's rows bit for bit; each rank's own rows of the sum, added and normed,
    are the unfused math's; then the norm before a data-parallel MoE layer (sum over the tp
    ranks, add, norm, gather over replicas: one replica here) on that residual (residuals bit
    for bit, norms to bf16 rounding); eagerly and in a CUDA graph."""
    from raymoe.actors.models import ops

    got = ray.get(tp2_controller.run_on_ranks.remote(_one_step_collectives, tokens))
    inputs = [_fused_inputs(r, 2 * tokens, 1) for r in range(2)]
    for rank, r in enumerate(got):
        assert r["one_step"]
        (x0, residual, weight), (x1, _, _) = inputs
        mine = slice(rank * tokens, (rank + 1) * tokens)
        summed = (x0[0][mine].float() + x1[0][mine].float()).to(torch.bfloat16)
        want_h, _ = ops.add_rms_norm(summed, residual[:tokens].clone(), weight, 1e-6)
        # the one replica's residual is its first rank's (rank 0's rows of the sum): the tp
        # ranks of a real replica hold the same one, these two do not
        first = (x0[0][:tokens].float() + x1[0][:tokens].float()).to(torch.bfloat16)
        _, replica_residual = ops.add_rms_norm(first, residual[:tokens].clone(), weight, 1e-6)
        want_all, want_residual_2 = ops.add_rms_norm(first, replica_residual.clone(), weight, 1e-6)
        for gathered, h, h_all, res in (r["eager"], r["graph"]):
            assert torch.equal(gathered.cpu(), torch.cat([x0[0][:tokens], x1[0][:tokens]]))
            torch.testing.assert_close(h.cpu(), want_h, rtol=2**-6, atol=2**-6)
            assert torch.equal(res.cpu(), want_residual_2)
            assert h_all.shape == (tokens + 3, weight.shape[0])  # padded to the replicas' rows
            torch.testing.assert_close(h_all[:tokens].cpu(), want_all, rtol=2**-6, atol=2**-6)
