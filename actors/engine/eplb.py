"""EPLB in the controller: a generator advanced once per engine step.

Cycle: reset the expert-load window, wait ``rebalance_every_steps`` steps (or
until a rebalance is requested), read the recorded load, plan (pure, in a
thread), then move the changed layers' expert weights ``layers_per_chunk`` layers
at a time, yielding between chunks so engine steps run in between. Between two
chunks some layers use the new expert slots and some the old; each layer's map and
weights switch together, so every step stays correct.

Every rank routes every token of a step (MoE layers gather all DP replicas),
so all ranks record the same load; rank 0's counts are the load.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Optional, Protocol

import torch

from raymoe.cluster.config import EplbConfig
from raymoe.cluster.eplb_planner import EplbPlan, plan_with_policy
from raymoe.cluster.layout import RankLayout

log = logging.getLogger(__name__)


class RankCalls(Protocol):
    """Calls a method on every rank at once (``RankGroup``): one awaitable result per rank,
    in rank order."""

    def call_async(self, method: str, *args: Any) -> list[Awaitable[Any]]: ...


class EplbManager:
    def __init__(
        self,
        config: EplbConfig,
        layout: RankLayout,
        ranks: RankCalls,
        *,
        physical_to_logical: torch.Tensor,
        num_logical: int,
        bytes_per_expert: int,
    ) -> None:
        self.config, self.ranks = config, ranks
        self.ep = layout.ep
        # hierarchical planning is possible when the EP group spans nodes evenly
        spans = layout.nodes if layout.nodes > 1 and self.ep % layout.nodes == 0 else 1
        self.nodes = spans if num_logical % spans == 0 else 1
        self.physical_to_logical = physical_to_logical.clone()  # [moe_layers, P], what the ranks run now
        self.num_logical, self.bytes_per_expert = num_logical, bytes_per_expert
        self.requested: Optional[torch.Tensor | str] = None
        self.last_plan: Optional[EplbPlan] = None
        self.status: dict[str, Any] = {"state": "starting", "rebalances": 0}
        self._gen = self._run()

    @property
    def busy(self) -> bool:
        """A rebalance is requested or under way: advance even when no request is running."""
        return self.requested is not None or self.status["state"] == "moving"

    def request(self, logical_load: Optional[torch.Tensor] = None) -> None:
        """Rebalance at the next step, from ``logical_load`` [moe_layers, E] or the recorded load."""
        num_moe_layers = self.physical_to_logical.shape[0]
        if logical_load is not None and tuple(logical_load.shape) != (num_moe_layers, self.num_logical):
            raise ValueError(
                f"logical_load: expected shape [{num_moe_layers}, {self.num_logical}] "
                f"(MoE layers x experts), got {list(logical_load.shape)}"
            )
        self.requested = logical_load if logical_load is not None else "recorded"

    async def on_step(self) -> None:
        await self._gen.__anext__()

    async def _run(self) -> AsyncIterator[None]:
        while True:
            await self._all("take_expert_load")  # a fresh window
            waited = 0
            while self.requested is None and waited < self.config.rebalance_every_steps:
                self.status.update(state="waiting", steps_to_rebalance=self.config.rebalance_every_steps - waited)
                waited += 1
                yield
            async for _ in self._rebalance():
                yield

    async def _rebalance(self) -> AsyncIterator[None]:
        requested, self.requested = self.requested, None
        load = requested if isinstance(requested, torch.Tensor) else await self._recorded_load()
        t0 = time.perf_counter()
        plan = await asyncio.to_thread(
            plan_with_policy,
            load,
            self.physical_to_logical,
            self.ep,
            policy=self.config.policy,
            nodes=self.nodes,
            bytes_per_expert=self.bytes_per_expert,
            min_improvement=self.config.min_improvement,
        )
        self.last_plan = plan
        changed = [i for i, n in enumerate(plan.moved_slots_per_layer.tolist()) if n]
        chunk = self.config.layers_per_chunk or max(1, len(changed))
        self.status.update(
            state="moving",
            layers_done=0,
            layers_total=len(changed),
            plan_s=round(time.perf_counter() - t0, 3),
            balancedness_before=plan.balancedness_before,
            balancedness_after=plan.balancedness_after,
            bytes_moved=plan.bytes_moved,
            mode=plan.mode,
            moved_slots=plan.moved_slots,
            skipped_slots=plan.skipped_slots,
        )
        for start in range(0, len(changed), chunk):
            if start:
                yield  # engine steps run between chunks
            layers = changed[start : start + chunk]
            t1 = time.perf_counter()
            await self._all("move_experts", layers, plan.physical_to_logical[layers])
            self.physical_to_logical[layers] = plan.physical_to_logical[layers]
            self.status.update(layers_done=start + len(layers), last_chunk_s=round(time.perf_counter() - t1, 4))
        self.status.update(state="done", rebalances=self.status["rebalances"] + 1)
        log.info(
            "EPLB: balancedness %.3f -> %.3f, %d layers moved, %.1f MiB",
            plan.balancedness_before,
            plan.balancedness_after,
            len(changed),
            plan.bytes_moved / 2**20,
        )

    async def _recorded_load(self) -> torch.Tensor:
        """Logical load [moe_layers, E] from rank 0's physical counts under the current expert slots."""
        physical = (await self._all("take_expert_load"))[0].to(torch.float64)
        load = torch.zeros(self.physical_to_logical.shape[0], self.num_logical, dtype=torch.float64)
        return load.scatter_add_(1, self.physical_to_logical, physical)

    async def _all(self, method: str, *args: Any) -> list[Any]:
        return list(await asyncio.gather(*self.ranks.call_async(method, *args)))
