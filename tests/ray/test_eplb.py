"""Rebalancing experts while serving leaves the outputs unchanged: greedy tokens equal and
logits within float tolerance before, during (layers mixed old/new) and after a rebalance,
for ep 2 and 4 with redundant experts, moving one layer per step or all at once."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest
import ray
import torch
from processes import kill_processes

from raymoe.cluster.config import config_from_dict
from raymoe.deploy import LLM, SamplingParams

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

PROMPTS = ["Hello world", "The capital of France is", "abc " * 20, "x"]
SAMPLING = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def _expert_slots(ctx) -> list[list[int]]:
    return ctx.state["runner"].expert_map.physical_to_logical_cpu.tolist()


def _rebalanced(controller, n: int) -> dict:
    """The EPLB status once ``n`` rebalances are done (moves go on while the engine idles)."""
    deadline = time.monotonic() + 60
    status = ray.get(controller.eplb_status.remote())
    while status["rebalances"] < n and time.monotonic() < deadline:
        time.sleep(0.05)
        status = ray.get(controller.eplb_status.remote())
    assert status["rebalances"] == n, status
    return status


def _rel(a, b) -> float:
    a, b = torch.stack(a), torch.stack(b)
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("ep,chunk", [(2, 1), (4, None)], ids=["ep2-chunk1", "ep4-all-layers"])
def test_outputs_unchanged_across_rebalance(ray_session, ep, chunk):
    config = config_from_dict(
        {
            "model": {"dtype": "float32"},
            "parallel": {"tp": 1, "dp": ep, "ep": ep},
            "engine": {"num_kv_blocks": 256},
            "eplb": {
                "enabled": True,
                "num_redundant_experts": ep,
                "rebalance_every_steps": 10**6,
                "layers_per_chunk": chunk,
            },
        }
    )
    with LLM(config, collect_logits=True) as llm:
        controller = llm.controller
        before = llm.generate(PROMPTS, SAMPLING)
        initial = ray.get(controller.run_on_ranks.remote(_expert_slots))[0]
        status = ray.get(controller.rebalance.remote(_hot_load()))  # ~100k routed tokens a layer
        assert status["enabled"]
        during = llm.generate(PROMPTS, SAMPLING)  # the moves happen while these steps run
        status = _rebalanced(controller, 1)
        assert status["layers_done"] == status["layers_total"] > 0
        assert status["balancedness_after"] > status["balancedness_before"] + 0.05
        after = llm.generate(PROMPTS, SAMPLING)
        expert_slots = ray.get(controller.run_on_ranks.remote(_expert_slots))
        assert all(p == expert_slots[0] for p in expert_slots), "ranks disagree on the expert slots"
        assert expert_slots[0] != initial, "nothing moved"
        for b, d, a in zip(before, during, after):
            assert b.token_ids == d.token_ids == a.token_ids
            assert _rel(d.logits, b.logits) < 1e-5 and _rel(a.logits, b.logits) < 1e-5

        # a rebalance from the load the ranks recorded while serving
        llm.generate(PROMPTS, SAMPLING)
        ray.get(controller.rebalance.remote())
        again = llm.generate(PROMPTS, SAMPLING)
        status = _rebalanced(controller, 2)
        assert status["balancedness_after"] >= status["balancedness_before"]
        assert len(status["rank_load_after"][0]) == ep
        for b, g in zip(before, again):
            assert b.token_ids == g.token_ids


def test_rebalance_needs_eplb_enabled(ray_session):
    with LLM(config_from_dict({"engine": {"num_kv_blocks": 64}})) as llm:
        with pytest.raises(ray.exceptions.RayTaskError, match="eplb.enabled"):
            ray.get(llm.controller.rebalance.remote())


def _planner_fault_config(**eplb):
    return config_from_dict(
        {
            "parallel": {"tp": 1, "dp": 2, "ep": 2},
            "engine": {"num_kv_blocks": 64},
            "eplb": {"enabled": True, "num_redundant_experts": 2, "rebalance_every_steps": 10**6, **eplb},
        }
    )


def _signal_planner_worker(sig: signal.Signals, deadline: float) -> int:
    """Send ``sig`` to the planner worker's process once it is up (it starts beside the engine,
    its first plan warming it up); its pid."""
    pids = []
    while not pids:
        assert time.monotonic() < deadline, "no planner worker process"
        time.sleep(0.05)
        pids = kill_processes(b"ray::EplbPlannerWorker", sig)
    assert len(pids) == 1
    return pids[0]


def _wait_gone(pid: int, deadline: float) -> None:
    while os.path.exists(f"/proc/{pid}"):
        assert time.monotonic() < deadline, f"process {pid} outlived its end"
        time.sleep(0.05)


def _hot_load() -> list[list[float]]:
    """Routed-token counts [4 layers][8 experts] with experts 0 and 4 hot in every layer."""
    hot = torch.ones(8)
    hot[0], hot[4] = 60.0, 25.0
    return ((torch.rand(4, 8) + hot) * 1000).tolist()


def test_a_rebalance_outlives_a_killed_planner_worker(ray_session):
    """The planner's worker process killed with -9: the next rebalance starts a new worker and
    completes; the engine never restarts its ranks."""
    with LLM(_planner_fault_config()) as llm:
        controller = llm.controller
        deadline = time.monotonic() + 30
        _wait_gone(_signal_planner_worker(signal.SIGKILL, deadline), deadline)
        ray.get(controller.rebalance.remote(_hot_load()))
        status = _rebalanced(controller, 1)
        assert status["balancedness_after"] > status["balancedness_before"]
        assert llm.generate(PROMPTS, SAMPLING)[0].finish_reason == "length"
        assert ray.get(controller.stats.remote()).restarts == 0


def test_a_hung_planner_worker_is_replaced_and_only_its_rebalance_skipped(ray_session):
    """The planner's worker process stopped (SIGSTOP: alive, never answering): the rebalance is
    refused once eplb.planning_timeout_s passes, the stopped worker is killed, and the next
    rebalance plans on a new worker and completes; serving goes on throughout."""
    # the new worker's start (a process, torch's import, a warm-up plan) counts in the timeout
    with LLM(_planner_fault_config(planning_timeout_s=10)) as llm:
        controller = llm.controller
        stopped = _signal_planner_worker(signal.SIGSTOP, time.monotonic() + 30)
        t0 = time.monotonic()
        with pytest.raises(Exception, match="PlanningTimedOut"):
            ray.get(controller.rebalance.remote(_hot_load()), timeout=60)
        assert 9 < time.monotonic() - t0 < 30
        assert llm.generate(PROMPTS, SAMPLING)[0].finish_reason == "length"
        _wait_gone(stopped, time.monotonic() + 30)
        ray.get(controller.rebalance.remote(_hot_load()))
        status = _rebalanced(controller, 1)
        assert status["balancedness_after"] > status["balancedness_before"]
        assert ray.get(controller.stats.remote()).restarts == 0


def test_a_rank_group_restart_refuses_the_pending_rebalance_and_keeps_one_planner(ray_session):
    """A rank dies while a rebalance waits for its plan (the planner stopped): the caller is told
    at once that the ranks restarted (it waited planning_timeout_s + 60 s), and the new rank
    group plans on the same planner worker (each restart started one more, ~300 MB each)."""
    with LLM(_planner_fault_config(planning_timeout_s=60)) as llm:
        controller = llm.controller
        stopped = _signal_planner_worker(signal.SIGSTOP, time.monotonic() + 30)
        pending = controller.rebalance.remote(_hot_load())
        time.sleep(1.0)  # the rebalance is planning
        assert kill_processes(b"ray::RankWorker")
        t0 = time.monotonic()
        ray.get(controller.health.remote())  # finds the dead rank (no step runs): the group restarts
        with pytest.raises(Exception, match="the rank group restarted"):
            ray.get(pending, timeout=50)
        assert time.monotonic() - t0 < 30
        os.kill(stopped, signal.SIGCONT)
        assert llm.generate(PROMPTS, SAMPLING)[0].finish_reason == "length"
        assert ray.get(controller.stats.remote()).restarts == 1
        assert kill_processes(b"ray::EplbPlannerWorker", 0) == [stopped]  # signal 0: only look
        ray.get(controller.rebalance.remote(_hot_load()))
        assert _rebalanced(controller, 1)["balancedness_after"] > 0


@pytest.mark.parametrize("kind", ["qwen2_moe", "glm4_moe", "deepseek_v3"])
def test_rebalance_keeps_outputs_with_shared_experts_and_grouped_routing(ray_session, tmp_path, kind):
    """EPLB moves the routed experts only (shared experts stay dense on every rank), also
    under grouped sigmoid routing with a correction bias: greedy tokens and logits unchanged."""
    from model_zoo import write_checkpoint

    path = write_checkpoint(kind, tmp_path / kind)
    config = config_from_dict(
        {
            "model": {"path": str(path), "dtype": "float32"},
            "parallel": {"tp": 1, "dp": 2, "ep": 2},
            "engine": {"num_kv_blocks": 128},
            "eplb": {
                "enabled": True,
                "num_redundant_experts": 2,
                "rebalance_every_steps": 10**6,
                "layers_per_chunk": 1,
            },
        }
    )
    prompts = [[5, 6, 7, 8], [9] * 20, [300, 301]]
    with LLM(config, collect_logits=True) as llm:
        controller = llm.controller
        before = llm.generate(prompts, SAMPLING)
        moe_layers = len(ray.get(controller.run_on_ranks.remote(_expert_slots))[0])
        hot = torch.ones(8)
        hot[1], hot[6] = 50.0, 30.0
        ray.get(controller.rebalance.remote(((torch.rand(moe_layers, 8) + hot) * 1000).tolist()))  # routed tokens
        during = llm.generate(prompts, SAMPLING)
        status = _rebalanced(controller, 1)
        assert status["layers_total"] > 0 and status["balancedness_after"] > status["balancedness_before"]
        after = llm.generate(prompts, SAMPLING)
    for b, d, a in zip(before, during, after):
        assert b.token_ids == d.token_ids == a.token_ids
        assert _rel(d.logits, b.logits) < 1e-5 and _rel(a.logits, b.logits) < 1e-5
