"""The controller actor: owns the rank group and drives the engine.

It reserves the placement group, starts the rank actors, has them build every
process group, loads the model, and runs the engine's step loop (an asyncio
task: every method here runs on the actor's event loop). Its clients (ingress
replicas, the offline LLM) submit requests in batches and poll for their outputs
(``actors/engine/messages.py``); text is their work, not the controller's.

``Controller`` is a plain class; callers start it with ``ray.remote(Controller)``
(see raymoe.deploy.launch).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any, Callable, Optional, Sequence

import torch

from raymoe.actors.engine.async_engine import AsyncEngine
from raymoe.actors.engine.builder import EngineModel, build_engine_core, open_model
from raymoe.actors.engine.eplb import EplbManager, RebalanceRefused, logical_load_tensor
from raymoe.actors.engine.failures import RestartBudget, describe_failure
from raymoe.actors.engine.messages import EngineStats, ModelInfo, NewRequest, OutputBatch, Rejection
from raymoe.actors.engine.tokenizer import Tokenizer
from raymoe.actors.eplb_planner_worker import PlannerClient
from raymoe.actors.models.builtin import resolve_model_path
from raymoe.actors.models.fp8 import resolve_fp8_block
from raymoe.actors.models.spec import ModelSpec, resolve_dtype
from raymoe.actors.rank_group import RankGroup, start_rank_group
from raymoe.actors.step_executor import WARMUP_TIMEOUT_S, RayStepExecutor
from raymoe.cluster.config import BUILTIN_PREFIX, Config
from raymoe.cluster.layout import RankLayout

log = logging.getLogger(__name__)

RANK_HEALTH_TIMEOUT_S = 5.0
# from a request to its plan, past eplb.planning_timeout_s: the steps before planning starts
REBALANCE_START_MARGIN_S = 60.0


class Controller:
    def __init__(self, config: Config, placement_group_name: str = "") -> None:
        """``placement_group_name``: the name of the ranks' placement group (see
        ``start_rank_group``); empty: unnamed."""
        self.config = config
        self.placement_group_name = placement_group_name
        self.layout = RankLayout.from_config(config.parallel)
        self.rank_group: Optional[RankGroup] = None
        self.engine: Optional[AsyncEngine] = None
        self.executor: Optional[RayStepExecutor] = None
        self.eplb: Optional[EplbManager] = None
        self.model: Optional[EngineModel] = None
        self.model_info: Optional[ModelInfo] = None
        self.planner: Optional[PlannerClient] = None  # one EPLB planner worker, whatever the rank groups

    # ---- bring-up ---------------------------------------------------------------

    # Methods that wait on the ranks run their blocking part in a thread (to_thread), so
    # the event loop -- and with it every request stream -- never stalls behind them.

    async def start(self) -> dict[str, Any]:
        """Bring up every rank; returns what each rank reported (rank, device, node, GPU)."""
        assert self.rank_group is None, "controller already started"
        t0 = time.perf_counter()
        self.rank_group = await self._start_rank_group()
        return {
            "layout": self.layout.describe(),
            "ranks": self.rank_group.infos,
            "startup_s": round(time.perf_counter() - t0, 2),
        }

    async def load_model(self, collect_logits: bool = False) -> ModelInfo:
        """Load the model on every rank, size the KV cache, build the engine."""
        return await asyncio.to_thread(self._load_model, collect_logits)

    def _load_model(self, collect_logits: bool) -> ModelInfo:
        t0 = time.perf_counter()
        self.model = model = open_model(self.config)
        num_blocks = self._load_ranks(model.path)
        eng = self.config.engine
        core = build_engine_core(self.config, model, num_blocks, collect_logits=collect_logits)
        pipelined = eng.pipelined_steps if eng.pipelined_steps is not None else self.config.parallel.device == "cuda"
        self.engine = AsyncEngine(
            core,
            self._executor(),
            max_queued=self.config.serve.max_queued_requests,
            background=self.eplb,
            pipelined=pipelined,
            max_steps_in_flight=eng.max_steps_in_flight,
            restart=self._restart_ranks,
            restart_budget=RestartBudget(eng.max_restarts, eng.restart_window_s),
            release=self._release_ranks,
        )
        self.model_info = model.info(num_blocks, eng.block_size, load_s=round(time.perf_counter() - t0, 2))
        return self.model_info

    def _load_ranks(self, path: str) -> int:
        """Load the model on the ranks of the current rank group, size and allocate their KV cache,
        and build what drives them (executor, EPLB); returns the KV blocks per replica."""
        ranks, timeout_s = self._rank_group(), self.config.engine.load_timeout_s
        if self.config.model.path.startswith(BUILTIN_PREFIX):
            # every node needs the files: each rank writes them where its node lacks them
            ranks.call("run_on_rank", _resolve_on_rank, self.config.model.path, timeout_s=timeout_s)
        loaded = ranks.call("load_model", self.config, path, self._model().max_model_len, timeout_s=timeout_s)
        num_blocks = min(loaded)
        if num_blocks < 1:
            raise RuntimeError(
                "no memory left for the KV cache after loading the model: raise engine.kv_memory_fraction, "
                "spread the model over more GPUs (tp/ep), or use a smaller model"
            )
        ranks.call("allocate_kv_cache", num_blocks, timeout_s=timeout_s)
        self.executor = RayStepExecutor(
            self.layout,
            ranks.actors,
            self.config.engine.step_timeout_s,
            warmup_timeout_s=WARMUP_TIMEOUT_S[self.config.parallel.device],
        )
        self.eplb = self._eplb_manager(self._model().spec)
        return num_blocks

    async def _restart_ranks(self) -> int:
        """After a failed step: kill the whole rank group and bring up a new one with the same
        layout and model (the engine's restart); returns the new KV blocks per replica."""
        t0 = time.perf_counter()
        if self.eplb is not None:  # a rebalance asked for on the old ranks is refused now
            self.eplb.close("the rank group restarted")
        old, self.rank_group = self.rank_group, None
        if old is not None:
            await asyncio.to_thread(old.kill)
        self.rank_group = await self._start_rank_group()
        num_blocks = await asyncio.to_thread(self._load_ranks, str(resolve_model_path(self.config.model.path)))
        engine = self._engine()
        engine.executor, engine.background = self._executor(), self.eplb
        log.warning("rank group restarted in %.1f s", time.perf_counter() - t0)
        return num_blocks

    async def _release_ranks(self) -> None:
        """The engine is down for good: free its ranks and their placement group (the devices),
        as a restart would, without starting new ones."""
        if self.eplb is not None:
            self.eplb.close("the engine is down")
        old, self.rank_group = self.rank_group, None
        if old is not None:
            await asyncio.to_thread(old.kill)
        log.warning("the engine is down for good: its ranks were released")

    async def _start_rank_group(self) -> RankGroup:
        return await asyncio.to_thread(
            functools.partial(
                start_rank_group,
                self.layout,
                self.config.parallel,
                name=self.placement_group_name,
                expert_moves=self.config.eplb.enabled,
            )
        )

    def _eplb_manager(self, spec: ModelSpec) -> Optional[EplbManager]:
        if not self.config.eplb.enabled or spec.moe is None:
            return None
        ranks = self._rank_group()
        timeout_s = self.config.engine.load_timeout_s  # part of the bring-up
        physical_to_logical = ranks.call("physical_to_logical", ranks=[0], timeout_s=timeout_s)[0]
        device = torch.device("cuda" if self.config.parallel.device == "cuda" else "cpu")
        elem = torch.empty((), dtype=resolve_dtype(self.config.model.dtype, spec, device)).element_size()
        fp8 = resolve_fp8_block(self.config.model.quantization, spec.fp8_block, device.type == "cuda", ())
        if fp8 is not None:
            elem = 1  # FP8 (the block scales add one float32 per 128 x 128 block: not counted)
        expert_bytes = 3 * spec.hidden_size * spec.moe.intermediate_size * elem
        return EplbManager(
            self.config.eplb,
            self.layout,
            ranks,
            physical_to_logical=physical_to_logical,
            num_logical=spec.moe.num_experts,
            bytes_per_expert=expert_bytes,
            expert_groups=spec.moe.grouped.num_groups if spec.moe.grouped is not None else 1,
            planner=self._planner(),
            call_timeout_s=self.config.engine.step_timeout_s,
        )

    def _planner(self) -> PlannerClient:
        if self.planner is None:
            self.planner = PlannerClient(self.config.eplb.planning_timeout_s)
        return self.planner

    # ---- expert-parallel load balancing ------------------------------------------------

    async def rebalance(self, logical_load: Optional[list[list[float]]] = None) -> dict[str, Any]:
        """Start a rebalance now (from ``logical_load`` [moe layers][experts], routed-token
        counts: the planner reads their sampling noise from them; or the recorded load) and
        return the EPLB status once it is planned; its moves proceed while steps
        run. Raises RebalanceRefused while one is under way, or with no load to plan on."""
        if self.eplb is None:
            raise ValueError("eplb.enabled is false (or the model has no MoE layers): nothing to rebalance")
        planned = self.eplb.request(None if logical_load is None else logical_load_tensor(logical_load))
        self._engine().wake()
        # a planner that hangs fails its plan after planning_timeout_s; past this wait the
        # request is cancelled, and a plan made later is dropped (EplbManager)
        timeout_s = self.config.eplb.planning_timeout_s + REBALANCE_START_MARGIN_S
        try:
            await asyncio.wait_for(planned, timeout_s)
        except asyncio.TimeoutError:
            raise RebalanceRefused(
                f"the engine did not start the rebalance within {timeout_s:.0f} s (see /health)"
            ) from None
        return self.eplb_status()

    def eplb_status(self) -> dict[str, Any]:
        """State of rebalancing, with the last plan's balancedness and per-rank load."""
        if self.eplb is None:
            return {"enabled": False}
        out = {"enabled": True, **self.eplb.status}
        plan = self.eplb.last_plan
        if plan is not None:
            out["rank_load_before"] = plan.rank_load_before.tolist()
            out["rank_load_after"] = plan.rank_load_after.tolist()
        return out

    # ---- requests (the client API: actors/engine/messages.py) ---------------------------

    def get_tokenizer(self) -> Tokenizer:
        """The model's tokenizer (picklable): clients tokenise and detokenise themselves."""
        return self._model().tokenizer

    def get_model_info(self) -> ModelInfo:
        if self.model_info is None:
            raise RuntimeError("no model loaded (load_model)")
        return self.model_info

    async def submit(self, client: str, requests: Sequence[NewRequest]) -> list[Rejection]:
        """Queue ``client``'s requests; a Rejection for each one refused."""
        return await self._engine().submit(client, requests)

    async def abort(self, client: str, seqs: Sequence[int]) -> None:
        await self._engine().abort(client, seqs)

    async def poll(self, client: str, timeout_s: float = 1.0) -> OutputBatch:
        """``client``'s outputs since its last poll (waits up to ``timeout_s`` for some)."""
        return await self._engine().poll(client, timeout_s)

    async def leave(self, client: str) -> None:
        await self._engine().leave(client)

    def stats(self) -> EngineStats:
        """Queue depth, running requests and KV-cache usage per DP replica, and counters."""
        return self._engine().stats()

    # ---- rank-group operations ------------------------------------------------------

    async def barrier(self, group: str = "world") -> float:
        """Barrier over every group of ``group`` kind (each rank joins its own); returns seconds."""
        t0 = time.perf_counter()
        await asyncio.gather(*self._rank_group().call_async("barrier", group))
        return time.perf_counter() - t0

    async def run_on_ranks(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Run ``fn(ctx, *args, **kwargs)`` on every rank; results in rank order."""
        return list(await asyncio.gather(*self._rank_group().call_async("run_on_rank", fn, *args, **kwargs)))

    def rank_actors(self) -> list[Any]:
        """The rank actor handles, index = global rank (tools and benchmarks)."""
        return list(self._rank_group().actors)

    def ping(self) -> bool:
        """Answers at once while the controller's event loop runs (its host's liveness check)."""
        return True

    async def health(self) -> dict[str, Any]:
        """``status``: starting | ok | recovering | degraded (down for good), with a ``reason``
        safe to show anyone; details (layout, ranks) for the admin route. A rank that died is
        found here even while no step runs, and the rank group restarts. A rank that does not
        answer in time is busy (a rank runs one call at a time: a long step, a first step's
        kernel compilation), not failed: hung ranks are the step timeout's to find."""
        base: dict[str, Any] = {"layout": self.layout.describe()}
        engine = self.engine
        if engine is not None and engine.error is not None:
            return {"status": "degraded", "reason": f"the engine is down: {describe_failure(engine.error)}", **base}
        if engine is not None and engine.recovering is not None:
            return {"status": "recovering", "reason": f"restarting the ranks after: {engine.recovering}", **base}
        group = self.rank_group
        if group is None:
            return {"status": "starting", "reason": "bringing up the ranks", **base}
        calls = group.call_async("health")
        done, busy = await asyncio.wait([asyncio.ensure_future(c) for c in calls], timeout=RANK_HEALTH_TIMEOUT_S)
        for task in busy:
            task.cancel()
        dead = next((t.exception() for t in done if t.exception() is not None), None)
        if dead is not None and group is not self.rank_group:  # the group was replaced meanwhile
            return {"status": "recovering", "reason": "the ranks restarted", **base}
        if dead is not None:
            log.warning("health: a rank failed: %r", dead)
            if engine is None:
                return {"status": "degraded", "reason": f"{describe_failure(dead)} (no model loaded yet)", **base}
            engine.report_failure(dead)
            return {"status": "recovering", "reason": f"restarting the ranks after: {describe_failure(dead)}", **base}
        ranks = [t.result() for t in done]
        return {
            "status": "ok",
            "reason": "serving",
            "ranks": sorted(ranks, key=lambda r: r["rank"]),
            "busy_ranks": len(busy),
            "restarts": engine.num_restarts if engine else 0,
            **base,
        }

    async def shutdown(self) -> None:
        """Stop the step loop first (no step or rebalance is left talking to the ranks),
        then the ranks."""
        if self.engine is not None:
            await self.engine.stop()
        if self.eplb is not None:
            self.eplb.close()
        if self.rank_group is not None:
            await asyncio.to_thread(self.rank_group.shutdown)
            self.rank_group = None

    def _engine(self) -> AsyncEngine:
        if self.engine is None:
            raise RuntimeError("no model loaded (load_model)")
        return self.engine

    def _executor(self) -> RayStepExecutor:
        if self.executor is None:
            raise RuntimeError("no model loaded (load_model)")
        return self.executor

    def _model(self) -> EngineModel:
        if self.model is None:
            raise RuntimeError("no model loaded (load_model)")
        return self.model

    def _rank_group(self) -> RankGroup:
        if self.rank_group is None:
            raise RuntimeError("controller not started")
        return self.rank_group


def _resolve_on_rank(ctx: Any, path: str) -> str:
    return str(resolve_model_path(path))
