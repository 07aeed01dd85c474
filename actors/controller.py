"""The controller actor: owns the rank cluster and drives the engine.

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
import logging
import time
from typing import Any, Callable, Optional, Sequence

import ray
import torch

from raymoe.actors.cluster import RankCluster, start_rank_cluster
from raymoe.actors.engine.async_engine import AsyncEngine
from raymoe.actors.engine.block_manager import BlockManager
from raymoe.actors.engine.core import EngineCore
from raymoe.actors.engine.eplb import EplbManager
from raymoe.actors.engine.executor import RayStepExecutor
from raymoe.actors.engine.messages import EngineStats, ModelInfo, NewRequest, OutputBatch, Rejection
from raymoe.actors.engine.runner import resolve_dtype
from raymoe.actors.engine.scheduler import Scheduler
from raymoe.actors.engine.tokenizer import Tokenizer
from raymoe.actors.models.builtin import resolve_model_path
from raymoe.actors.models.spec import ModelSpec, load_spec
from raymoe.cluster.config import BUILTIN_PREFIX, Config
from raymoe.cluster.layout import RankLayout

log = logging.getLogger(__name__)


class Controller:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.layout = RankLayout.from_config(config.parallel)
        self.cluster: Optional[RankCluster] = None
        self.engine: Optional[AsyncEngine] = None
        self.executor: Optional[RayStepExecutor] = None
        self.eplb: Optional[EplbManager] = None
        self.tokenizer: Optional[Tokenizer] = None
        self.model_info: Optional[ModelInfo] = None

    # ---- bring-up ---------------------------------------------------------------

    # Methods that wait on the ranks run their blocking part in a thread (to_thread), so
    # the event loop -- and with it every request stream -- never stalls behind them.

    async def start(self) -> dict[str, Any]:
        """Bring up every rank; returns what each rank reported (rank, device, node, GPU)."""
        assert self.cluster is None, "controller already started"
        t0 = time.perf_counter()
        self.cluster = await asyncio.to_thread(
            start_rank_cluster, self.layout, self.config.parallel
        )
        return {"layout": self.layout.describe(), "ranks": self.cluster.infos, "startup_s": round(time.perf_counter() - t0, 2)}

    async def load_model(self, collect_logits: bool = False) -> ModelInfo:
        """Load the model on every rank, size the KV cache, build the engine."""
        return await asyncio.to_thread(self._load_model, collect_logits)

    def _load_model(self, collect_logits: bool) -> ModelInfo:
        if self.layout.cp > 1:
            # the layout and its groups support cp, but attention here is not context-parallel:
            # every cp rank would compute the same attention (correct, never faster) -- say so
            raise ValueError(
                "parallel.cp: the engine does not implement context-parallel attention yet; use cp: 1 "
                "(tp, dp and ep are supported)"
            )
        cluster = self._cluster()
        t0 = time.perf_counter()
        path = str(resolve_model_path(self.config.model.path))
        if self.config.model.path.startswith(BUILTIN_PREFIX):
            # every node needs the files: each rank writes them where its node lacks them
            cluster.call("execute", _resolve_on_rank, self.config.model.path)
        spec = load_spec(path)
        self.tokenizer = Tokenizer.from_dir(path)
        max_model_len = spec.max_model_len(self.config.model.max_model_len)
        num_blocks = min(cluster.call("load_model", self.config, path, max_model_len))
        if num_blocks < 1:
            raise RuntimeError(
                "no memory left for the KV cache after loading the model: raise engine.kv_memory_fraction, "
                "spread the model over more GPUs (tp/ep), or use a smaller model"
            )
        cluster.call("allocate_kv_cache", num_blocks)
        eng = self.config.engine
        schedulers = [
            Scheduler(BlockManager(num_blocks, eng.block_size), eng.max_num_seqs, eng.max_num_batched_tokens, max_model_len)
            for _ in range(self.layout.dp)
        ]
        self.executor = RayStepExecutor(self.layout, cluster.actors)
        core = EngineCore(schedulers, self.tokenizer.eos_token_ids, None, self.config.model.seed, collect_logits)
        self.eplb = self._eplb_manager(spec)
        pipelined = self.config.engine.pipelined_steps
        if pipelined is None:
            pipelined = self.config.parallel.device == "cuda"
        self.engine = AsyncEngine(core, self.executor.run_async, self.config.serve.max_queued_requests, self.eplb,
                                  pipelined)  # fmt: skip
        self.model_info = ModelInfo(
            model=path,
            architecture=spec.architecture,
            vocab_size=spec.vocab_size,
            max_model_len=max_model_len,
            kv_blocks_per_replica=num_blocks,
            block_size=eng.block_size,
            load_s=round(time.perf_counter() - t0, 2),
        )
        return self.model_info

    def _eplb_manager(self, spec: ModelSpec) -> Optional[EplbManager]:
        if not self.config.eplb.enabled or spec.moe is None:
            return None
        cluster = self._cluster()
        placement = ray.get(cluster.actors[0].physical_to_logical.remote())
        device = torch.device("cuda" if self.config.parallel.device == "cuda" else "cpu")
        elem = torch.empty((), dtype=resolve_dtype(self.config.model.dtype, spec, device)).element_size()
        expert_bytes = 3 * spec.hidden_size * spec.moe.intermediate_size * elem
        return EplbManager(self.config.eplb, self.layout, cluster.actors, placement, spec.moe.num_experts, expert_bytes)

    # ---- expert-parallel load balancing ------------------------------------------------

    def rebalance(self, logical_load: Optional[list[list[float]]] = None) -> dict[str, Any]:
        """Start a rebalance now (from ``logical_load`` [moe layers][experts], or the recorded
        load); it proceeds between engine steps. Returns the EPLB status."""
        if self.eplb is None:
            raise ValueError("eplb.enabled is false (or the model has no MoE layers): nothing to rebalance")
        self.eplb.request(None if logical_load is None else torch.tensor(logical_load, dtype=torch.float64))
        self._engine().wake()
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
        if self.tokenizer is None:
            raise RuntimeError("no model loaded (load_model)")
        return self.tokenizer

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

    # ---- cluster operations ---------------------------------------------------------

    async def barrier(self, group: str = "world") -> float:
        """Barrier over every group of ``group`` kind (each rank joins its own); returns seconds."""
        t0 = time.perf_counter()
        await asyncio.gather(*self._cluster().call_async("barrier", group))
        return time.perf_counter() - t0

    async def execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Run ``fn(ctx, *args, **kwargs)`` on every rank; results in rank order."""
        return list(await asyncio.gather(*self._cluster().call_async("execute", fn, *args, **kwargs)))

    def rank_actors(self) -> list[Any]:
        """The rank actor handles, index = global rank (tools and benchmarks)."""
        return list(self._cluster().actors)

    async def health(self) -> dict[str, Any]:
        base = {"layout": self.layout.describe()}
        if self.cluster is None:
            return {"status": "starting", **base}
        if self.engine is not None and self.engine.error is not None:
            return {"status": "degraded", "error": f"engine failed: {self.engine.error}", **base}
        try:
            ranks = list(await asyncio.gather(*self.cluster.call_async("health")))
        except Exception as e:  # a dead rank: degraded, with the reason
            return {"status": "degraded", "error": f"{type(e).__name__}: {e}", **base}
        return {"status": "ok", "ranks": ranks, **base}

    async def shutdown(self) -> None:
        if self.cluster is not None:
            await asyncio.to_thread(self.cluster.shutdown)
            self.cluster = None

    def _engine(self) -> AsyncEngine:
        if self.engine is None:
            raise RuntimeError("no model loaded (load_model)")
        return self.engine

    def _cluster(self) -> RankCluster:
        if self.cluster is None:
            raise RuntimeError("controller not started")
        return self.cluster


def _resolve_on_rank(ctx: Any, path: str) -> str:
    return str(resolve_model_path(path))
