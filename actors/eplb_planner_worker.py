"""EPLB planning off the controller's event loop: a planner actor on the controller's node,
and the client the EPLB manager plans through (it replaces a worker that died or hung)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raymoe.cluster.eplb_planner import EplbPlan, plan_with_policy
from raymoe.cluster.expert_slots import default_expert_slots

log = logging.getLogger(__name__)


class EplbPlannerWorker:
    """EPLB planning in a process of its own (a Ray actor on the controller's node, started
    with the EPLB manager, so that its imports are done before the first rebalance): a plan
    at scale is seconds of Python, which in a thread of the controller would slow its event
    loop, and with it every step."""

    def __init__(self) -> None:
        # a first plan pays for torch's first calls: pay it now rather than in a rebalance
        plan_with_policy(
            torch.ones(1, 4, dtype=torch.float64),
            default_expert_slots(1, 4, 4),
            2,
            policy="auto",
            nodes=1,
            bytes_per_expert=1,
        )

    def plan(self, *args: Any, **kwargs: Any) -> EplbPlan:
        return plan_with_policy(*args, **kwargs)


def start_planner_worker() -> Any:
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(num_cpus=0)(EplbPlannerWorker).options(scheduling_strategy=here).remote()


class PlanningTimedOut(Exception):
    """The planner gave no plan within eplb.planning_timeout_s."""


class PlannerClient:
    """The EPLB manager's planner: plans on an EplbPlannerWorker, and when that worker has died
    (killed, out of memory) starts a new one and asks it once more, so a rebalance outlives it.
    A worker that gives no plan in ``timeout_s`` (hung, stopped) is killed and replaced, and
    that plan fails (not asked again: the same input could hang the new worker too)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.worker = start_planner_worker()

    async def __call__(self, *args: Any, **kwargs: Any) -> EplbPlan:
        try:
            return await self._plan(*args, **kwargs)
        except ray.exceptions.RayActorError:
            log.warning("the EPLB planner worker died: starting a new one")
            self.worker = start_planner_worker()
            return await self._plan(*args, **kwargs)

    async def _plan(self, *args: Any, **kwargs: Any) -> EplbPlan:
        try:
            return await asyncio.wait_for(self.worker.plan.remote(*args, **kwargs), self.timeout_s)
        except asyncio.TimeoutError:
            ray.kill(self.worker)
            self.worker = start_planner_worker()
            raise PlanningTimedOut(
                f"no plan in {self.timeout_s:g} s (eplb.planning_timeout_s): the planner worker was replaced"
            ) from None
