"""EPLB in the controller: a generator advanced once per engine step.

Cycle: reset the expert-load window, wait ``rebalance_every_steps`` steps (or
until a rebalance is requested), read the recorded load, plan (pure, in a thread,
while steps run), then hand the ranks the changed layers in chunks of
``layers_per_chunk``. Each chunk's copies travel in the ranks' background while steps go
on, and the ranks switch it at the start of a step once it has landed everywhere (see
actors/engine/expert_mover.py); the generator only follows their progress. Between two
chunks some layers use the new expert slots and some the old; each layer's map and
weights switch together, so every step stays correct.

Every rank routes every token of a step (MoE layers gather all DP replicas),
so all ranks record the same load; rank 0's counts are the load.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import statistics
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Optional, Protocol

import torch

from raymoe.actors.engine.expert_mover import MoveChunk
from raymoe.actors.engine.failures import StepTimeoutError
from raymoe.cluster.config import EplbConfig
from raymoe.cluster.eplb_planner import EplbPlan, plan_with_policy
from raymoe.cluster.layout import RankLayout

log = logging.getLogger(__name__)

NOT_ENOUGH_LOAD = "not enough load recorded: no tokens were routed since the last rebalance; serve requests first"
GAVE_UP = "its request stopped waiting for the plan (told it did not start): the experts stay where they are"
_IDLE_POLL_S = 0.002  # between polls of planning or moves while no step runs
_PROGRESS_POLL_S = 0.02  # the ranks are asked how far the moves got at most this often


# a requested load's counts: exact in float64, and their sums over experts and ranks stay finite
MAX_ROUTED_TOKENS = 2**53


def logical_load_tensor(value: Any) -> torch.Tensor:
    """A rebalance request's ``logical_load`` (from JSON: per MoE layer, the routed-token count
    of each expert) as float64 [layers, experts]; ValueError naming the field for anything else."""
    layers = value if isinstance(value, list) and value and all(isinstance(row, list) for row in value) else []
    counts = [v for row in layers for v in row]
    if not counts or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in counts):
        raise ValueError("logical_load: must be a list per MoE layer of each expert's routed-token count (numbers)")
    if len({len(row) for row in layers}) != 1:
        raise ValueError("logical_load: every MoE layer needs a count for each expert (rows of one length)")
    bad = next((v for v in counts if not 0 <= v <= MAX_ROUTED_TOKENS), None)  # NaN fails the test too
    if bad is not None:
        raise ValueError(f"logical_load: counts must be in [0, 2**53], got {bad!r}")
    return torch.tensor(layers, dtype=torch.float64)


class RebalanceRefused(RuntimeError):
    """A requested rebalance did not start; the message says why."""


@dataclass
class _Request:
    load: Optional[torch.Tensor]  # [moe_layers, E]; None: the recorded load
    started: Optional["asyncio.Future[None]"]  # resolved once the plan is made (or refused)


class Planner(Protocol):
    """Runs ``plan_with_policy`` away from the caller's event loop (a thread, or another
    process: a plan at scale takes seconds of Python that would stall the steps)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Awaitable[EplbPlan]: ...


def plan_in_thread(*args: Any, **kwargs: Any) -> Awaitable[EplbPlan]:
    return asyncio.to_thread(plan_with_policy, *args, **kwargs)


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
        expert_groups: int = 1,
        planner: Planner = plan_in_thread,
        call_timeout_s: Optional[float] = None,
    ) -> None:
        """``expert_groups``: the routing's expert groups (group-limited routing; 1 = none),
        which hierarchical planning packs whole onto nodes. ``call_timeout_s``: a call to the
        ranks the manager waits on (while no step runs) that takes longer means a hung rank
        (StepTimeoutError, as for a step)."""
        self.config, self.ranks, self.planner = config, ranks, planner
        self.call_timeout_s = call_timeout_s
        self.ep = layout.ep
        # hierarchical planning is possible when the EP group spans nodes evenly
        spans = layout.nodes if layout.nodes > 1 and self.ep % layout.nodes == 0 else 1
        self.nodes = spans if num_logical % spans == 0 else 1
        self.physical_to_logical = physical_to_logical.clone()  # [moe_layers, P], what the ranks run now
        self.num_logical, self.bytes_per_expert, self.expert_groups = num_logical, bytes_per_expert, expert_groups
        self.requested: Optional[_Request] = None
        self.last_plan: Optional[EplbPlan] = None
        self.status: dict[str, Any] = {"state": "starting", "rebalances": 0}
        self._gen = self._run()
        self._window_opened: Optional[asyncio.Future[list[Any]]] = None
        self._calls: set[asyncio.Future[Any]] = set()  # calls to the ranks not answered yet
        self._planning: Optional[asyncio.Future[EplbPlan]] = None
        self._current: Optional[_Request] = None  # the rebalance under way
        self._closed: Optional[str] = None  # why close() was called
        # seconds between steps, outside rebalances and during one (planning and moves):
        # what a rebalance costs the steps
        self._step_s: collections.deque[float] = collections.deque(maxlen=512)
        self._rebalance_step_s: list[float] = []
        self._last_step: Optional[float] = None
        self._after_step = False

    @property
    def busy(self) -> bool:
        """A rebalance is requested or under way: advance even when no request is running."""
        return self.requested is not None or self.status["state"] in ("planning", "moving")

    def request(self, logical_load: Optional[torch.Tensor] = None) -> "asyncio.Future[None]":
        """Rebalance at the next step, from ``logical_load`` [moe_layers, E] or the recorded
        load. The future resolves once the plan is made; it fails with RebalanceRefused when
        there is no load to plan on. Raises RebalanceRefused while a rebalance is under way."""
        num_moe_layers = self.physical_to_logical.shape[0]
        if logical_load is not None and tuple(logical_load.shape) != (num_moe_layers, self.num_logical):
            raise ValueError(
                f"logical_load: expected shape [{num_moe_layers}, {self.num_logical}] "
                f"(MoE layers x experts), got {list(logical_load.shape)}"
            )
        if self._closed is not None:
            raise RebalanceRefused(f"{self._closed}: ask again")
        if self.busy:
            raise RebalanceRefused(
                f"a rebalance is under way (state {self.status['state']}, "
                f"{self.status.get('layers_done', 0)}/{self.status.get('layers_total', '?')} layers moved): "
                "ask again once it is done"
            )
        self.requested = _Request(logical_load, asyncio.get_running_loop().create_future())
        return self.requested.started

    async def on_step(self, after_step: bool = True) -> None:
        """Advance once; ``after_step``: an engine step has just completed (False: the loop is idle)."""
        self._after_step = after_step
        if after_step:
            now = time.perf_counter()
            if self._last_step is not None:
                rebalancing = self.status["state"] in ("planning", "moving")
                (self._rebalance_step_s if rebalancing else self._step_s).append(now - self._last_step)
            self._last_step = now
        else:
            self._last_step = None
        await self._gen.__anext__()

    async def _run(self) -> AsyncIterator[None]:
        while True:
            self._window_opened = self._submit("take_expert_load")  # a fresh window, before the next step
            waited = 0
            while self.requested is None and waited < self.config.rebalance_every_steps:
                self.status.update(state="waiting", steps_to_rebalance=self.config.rebalance_every_steps - waited)
                waited += 1
                yield
            request, self.requested = self.requested or _Request(None, None), None
            async for _ in self._rebalance(request):
                yield

    async def _rebalance(self, request: _Request) -> AsyncIterator[None]:
        self._current = request
        t0 = time.perf_counter()
        self._rebalance_step_s = []
        for stale in ("skipped", "rebalance_steps", "rebalance_step_ms_median", "rebalance_step_ms_max", "move_s"):
            self.status.pop(stale, None)
        self.status.update(state="planning")
        load = request.load
        if load is None:
            if self._window_opened is not None:  # long answered, unless a rank hangs
                async for _ in self._until_answered(self._window_opened, "take_expert_load"):
                    yield
                self._window_opened.result()  # raises what a rank raised
            reading = self._submit("take_expert_load")
            async for _ in self._until_answered(reading, "take_expert_load"):  # read between steps
                yield
            load = self._logical_load(reading.result()[0])
        if not float(load.sum()) > 0:
            self.status.update(state="waiting", skipped=NOT_ENOUGH_LOAD)
            if request.started is not None and not request.started.done():
                request.started.set_exception(RebalanceRefused(NOT_ENOUGH_LOAD))
            return
        planning = self._planning = asyncio.ensure_future(
            self.planner(
                load,
                self.physical_to_logical,
                self.ep,
                policy=self.config.policy,
                nodes=self.nodes,
                bytes_per_expert=self.bytes_per_expert,
                min_improvement=self.config.min_improvement,
                expert_groups=self.expert_groups,
            )
        )
        while not planning.done():
            yield  # steps run while the planner thinks
            await self._pause_if_idle()
        failure = planning.exception()
        if failure is not None:  # a planner that failed ends this rebalance, not the engine
            why = f"planning failed ({type(failure).__name__}; the log has it): the experts stay where they are"
            log.warning("EPLB: %s", why, exc_info=failure)
            self.status.update(state="waiting", skipped=why)
            if request.started is not None and not request.started.done():
                request.started.set_exception(RebalanceRefused(why))
            return
        plan = planning.result()
        if request.started is not None and request.started.cancelled():
            # the caller stopped waiting and was told the rebalance did not start: keep to that
            self.status.update(state="waiting", skipped=GAVE_UP)
            return
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
        if request.started is not None and not request.started.done():
            request.started.set_result(None)
        async for _ in self._move(plan, changed, chunk):
            yield
        self.status.update(state="done", rebalances=self.status["rebalances"] + 1, **self._step_times())
        log.info(
            "EPLB: balancedness %.3f -> %.3f, %d layers moved, %.1f MiB",
            plan.balancedness_before,
            plan.balancedness_after,
            len(changed),
            plan.bytes_moved / 2**20,
        )

    async def _move(self, plan: EplbPlan, changed: list[int], chunk: int) -> AsyncIterator[None]:
        """Hand the ranks the changed layers in chunks, then follow them until all have switched."""
        t1 = time.perf_counter()
        chunks = [
            MoveChunk(changed[i : i + chunk], plan.physical_to_logical[changed[i : i + chunk]])
            for i in range(0, len(changed), chunk)
        ]
        # submitted now, so every rank has them before the next step; not waited for
        started = self._submit("start_expert_moves", chunks) if chunks else None
        progress: Optional[asyncio.Future[list[Any]]] = None
        next_poll = 0.0
        while chunks:
            yield  # the ranks switch each chunk at the start of a step once it has landed everywhere
            if not self._after_step:  # idle: no step start to switch at, so ask for one
                await self._all("advance_expert_moves")
            if progress is None and time.perf_counter() >= next_poll:
                progress, next_poll = self._submit("expert_moves_progress"), time.perf_counter() + _PROGRESS_POLL_S
            if progress is None or not progress.done():  # answered between steps; the loop does not wait
                await self._pause_if_idle()
                continue
            answers, progress = progress.result(), None
            await started  # long done (raises if a rank refused the chunks)
            self.status.update(layers_done=min(done for done, _ in answers))
            if not any(busy for _, busy in answers):
                break
        self.physical_to_logical[changed] = plan.physical_to_logical[changed]
        self.status.update(layers_done=len(changed), move_s=round(time.perf_counter() - t1, 4))

    def _step_times(self) -> dict[str, float]:
        """Step times (ms) outside rebalances (median) and during the last one (planning and
        moves: median, longest)."""
        out: dict[str, float] = {"rebalance_steps": len(self._rebalance_step_s)}
        if self._step_s:
            out["step_ms_median"] = round(1e3 * statistics.median(self._step_s), 3)
        if self._rebalance_step_s:
            out["rebalance_step_ms_median"] = round(1e3 * statistics.median(self._rebalance_step_s), 3)
            out["rebalance_step_ms_max"] = round(1e3 * max(self._rebalance_step_s), 3)
        if len(self._step_s) >= 20:
            out["step_ms_p95"] = round(1e3 * statistics.quantiles(self._step_s, n=20)[-1], 3)
        return out

    async def _pause_if_idle(self) -> None:
        """With no step running the loop calls back at once: give the planner thread and the
        ranks a moment instead of spinning."""
        if not self._after_step:
            await asyncio.sleep(_IDLE_POLL_S)

    def _logical_load(self, physical: torch.Tensor) -> torch.Tensor:
        """Logical load [moe_layers, E] from rank 0's physical counts under the current expert slots."""
        load = torch.zeros(self.physical_to_logical.shape[0], self.num_logical, dtype=torch.float64)
        return load.scatter_add_(1, self.physical_to_logical, physical.to(torch.float64))

    def close(self, why: str = "the engine shut down") -> None:
        """Forget the calls to the ranks still unanswered, stop planning, and refuse the
        rebalance asked for and any asked for later, saying ``why`` (shutdown or a restart: the
        ranks go away, and a planner timing out later would start a new worker)."""
        self._closed = why
        if self._planning is not None:
            self._planning.cancel()
        for request in (self.requested, self._current):
            if request is not None and request.started is not None and not request.started.done():
                request.started.set_exception(RebalanceRefused(f"{why}: ask again"))
        for call in list(self._calls):
            call.cancel()
            call.add_done_callback(lambda c: c.cancelled() or c.exception())  # nobody awaits it now

    def _submit(self, method: str, *args: Any) -> "asyncio.Future[list[Any]]":
        """Call ``method`` on every rank now (before the next step reaches them); the answers, in rank order."""
        call = asyncio.gather(*self.ranks.call_async(method, *args))
        self._calls.add(call)
        call.add_done_callback(self._calls.discard)
        return call

    async def _all(self, method: str, *args: Any) -> list[Any]:
        try:
            return list(await asyncio.wait_for(self._submit(method, *args), self.call_timeout_s))
        except asyncio.TimeoutError:
            raise StepTimeoutError(self._hung(method)) from None

    async def _until_answered(self, call: "asyncio.Future[list[Any]]", method: str) -> AsyncIterator[None]:
        """Yield (steps go on) until ``call`` is answered. Steps that run are timed by the
        executor (a call to the ranks waits behind the steps in flight, however long they take);
        past call_timeout_s without one, a rank that never answers is hung: StepTimeoutError."""
        idle_since: Optional[float] = None
        while not call.done():
            yield
            if call.done():
                break
            if self._after_step:
                idle_since = None
                continue
            idle_since = idle_since or time.perf_counter()
            if self.call_timeout_s is not None and time.perf_counter() - idle_since > self.call_timeout_s:
                raise StepTimeoutError(self._hung(method))
            await self._pause_if_idle()

    def _hung(self, method: str) -> str:
        return f"EPLB's {method} took over {self.call_timeout_s:g} s (engine.step_timeout_s): a rank is hung"
