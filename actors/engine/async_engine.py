"""AsyncEngine: one step loop serving every client's requests.

Lives in the controller actor's event loop. Clients submit requests in batches and poll
for their outputs (``messages``); the loop schedules whatever is queued at each step
(no batching delay), runs it on the ranks, applies the sampled tokens and sorts them
into the clients' outboxes (``delivery``). Its own work per step is scheduling and
applying tokens: text is the clients' work. On GPUs two steps stay in flight on the
ranks while the loop applies the one before them and schedules the next (pipelined
steps), so the device does not idle through the loop's own work and the Ray round trips
(one step while a request under a grammar is live: ``EngineCore.max_steps_in_flight``).

A client that stops polling for ``client_timeout_s`` is taken for gone: its requests
are aborted, which frees their KV blocks.

When a step fails (a rank died, a step timed out, a step raised), the loop recovers
through ``restart`` (the controller recreates the rank group): the requests that had
started fail at once with the reason (their KV is gone), the ones still queued stay
and run on the new ranks. At most ``max_restarts`` restarts within ``restart_window_s``;
past that, or without ``restart``, the engine stays down and says why.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable, Optional, Protocol, Sequence, Union

from raymoe.actors.engine.core import EngineCore
from raymoe.actors.engine.delivery import OutputRouter
from raymoe.actors.engine.failures import EngineStopped, RestartBudget, describe_failure
from raymoe.actors.engine.grammar import (
    GRAMMAR_FILL_BUDGET_S,
    GRAMMAR_STEP_BUDGET_S,
    GrammarMasks,
    GrammarRows,
    fill_masks,
    slow_matchers,
)
from raymoe.actors.engine.messages import EngineStats, NewRequest, OutputBatch, Rejection, RejectKind
from raymoe.actors.engine.pipeline_depth import PipelineDepth
from raymoe.actors.engine.step import StepInFlight, StepInput, StepOutput

log = logging.getLogger(__name__)

CLIENT_TIMEOUT_S = 60.0  # a client silent this long (no poll) has its requests aborted
_SILENCE_CHECK_S = 1.0


class AsyncExecutor(Protocol):
    """Runs engine steps on the ranks for the step loop (``RayStepExecutor``; in process,
    ``LocalExecutor``)."""

    async def run_step_async(
        self,
        inputs: Optional[Sequence[StepInput]],
        keep: int,
        late_grammar: Optional[Sequence[Optional[GrammarMasks]]] = None,
    ) -> list[list[StepOutput]]:
        """Launch ``inputs`` (one per DP replica; None: no new step), after handing the step
        launched last its grammar masks if it waits for them (``late_grammar``). Returns, for
        each step this call completes (oldest first), each replica's output: every launched
        step but the ``keep`` newest, which stay in flight."""
        ...


class BackgroundWork(Protocol):
    """Work the step loop advances once after every step (EPLB's ``EplbManager``)."""

    @property
    def busy(self) -> bool:
        """True: advance it even while no request runs."""
        ...

    async def on_step(self, after_step: bool = True) -> None:
        """Advance once; ``after_step`` False: called while no step runs."""
        ...


class AsyncEngine:
    def __init__(
        self,
        core: EngineCore,
        executor: AsyncExecutor,
        *,
        max_queued: int,
        background: Optional[BackgroundWork] = None,
        pipelined: bool = True,
        max_steps_in_flight: Union[int, str] = 2,
        client_timeout_s: float = CLIENT_TIMEOUT_S,
        restart: Optional[Callable[[], Awaitable[int]]] = None,
        restart_budget: Optional[RestartBudget] = None,
        release: Optional[Callable[[], Awaitable[None]]] = None,
    ) -> None:
        """``background``: work advanced once after every step (EPLB). ``pipelined``: keep steps
        in flight (see ``_steps``), ``max_steps_in_flight`` of them (1, 2 or "auto",
        pipeline_depth.py) when it plans the next. ``restart``:
        recreate the ranks after a failure (it also replaces ``executor`` and ``background``);
        returns the new KV blocks per replica. ``release``: free the ranks once the engine is
        down for good."""
        self.core = core
        self.background = background
        self.executor = executor
        self.max_queued = max_queued
        self.pipelined = pipelined
        self.depth = PipelineDepth(max_steps_in_flight)
        self.client_timeout_s = client_timeout_s
        self.router = OutputRouter(with_logits=core.collect_logits)
        self.num_submit_calls = 0
        self._wake = asyncio.Event()
        self._loop_task: Optional[asyncio.Task] = None
        self._next_silence_check = 0.0
        self._restart, self._release = restart, release
        self._restart_budget = restart_budget or RestartBudget(3, 600.0)
        self._pending_failure: Optional[BaseException] = None
        self.num_restarts = 0
        self.recovering: Optional[str] = None  # why, while a restart is under way
        self.error: Optional[BaseException] = None  # why the engine stopped for good
        # a step's grammar masks in a thread of their own: requests' compiles (seconds each, any
        # number at once) fill the default pool, and masks queued behind them stall every stream
        self._mask_thread = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")

    @property
    def num_waiting(self) -> int:
        return sum(s.num_waiting for s in self.core.schedulers)

    # ---- the client API (messages) ------------------------------------------------------

    async def submit(self, client: str, requests: Sequence[NewRequest]) -> list[Rejection]:
        """Queue ``requests`` of ``client``; a Rejection for each one refused (a request that
        can never run, a full queue, a failed engine)."""
        self.num_submit_calls += 1
        grammars = self.core.grammars
        for spec in {new.sampling.grammar for new in requests} - {None}:
            if grammars is not None and not grammars.is_cached(spec):  # off the loop; add_request finds it cached
                try:
                    await asyncio.to_thread(grammars.compile, spec)
                except Exception:  # noqa: BLE001 -- add_request compiles it again and refuses that request alone
                    pass
        rejected = []
        for new in requests:
            reason = self._add(client, new)
            if reason is not None:
                rejected.append(Rejection(new.seq, *reason))
        if len(rejected) < len(requests):
            self._start()
        return rejected

    async def abort(self, client: str, seqs: Sequence[int]) -> None:
        """Drop requests of ``client`` (its consumer went away, or it found a stop string)."""
        for seq in seqs:
            rid = self.router.request_id(client, seq)
            self.router.remove(rid)
            self.core.abort(rid)

    async def poll(self, client: str, timeout_s: float = 1.0) -> OutputBatch:
        """``client``'s outputs since its last poll; waits up to ``timeout_s`` for some."""
        return await self.router.poll(client, timeout_s)

    async def leave(self, client: str) -> None:
        """``client`` is going away: abort its requests."""
        for rid in self.router.drop_client(client):
            self.core.abort(rid)

    async def reconnect(self) -> None:
        """In process there is nothing to reconnect to (the client API's hook for a lost engine)."""

    def stats(self) -> EngineStats:
        scheds = self.core.schedulers
        return EngineStats(
            waiting=[s.num_waiting for s in scheds],
            running=[s.num_running for s in scheds],
            kv_usage=[s.block_manager.usage for s in scheds],
            prefix_cache_hit_tokens=[s.block_manager.num_cached_tokens for s in scheds],
            prefix_cache_query_tokens=[s.block_manager.num_started_tokens for s in scheds],
            steps=self.core.num_steps,
            preemptions=self.core.num_preemptions,
            polls=self.router.num_polls,
            submit_calls=self.num_submit_calls,
            restarts=self.num_restarts,
            recovering=self.recovering is not None,
            error=None if self.error is None else describe_failure(self.error),
        )

    def wake(self) -> None:
        """Run the loop now (e.g. to advance requested background work)."""
        self._start()

    async def stop(self) -> None:
        """Stop the step loop (before the ranks go away): clients' next poll says so."""
        task, self._loop_task = self._loop_task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.error = self.error or EngineStopped("it was shut down")
        self.router.fail(describe_failure(self.error))
        self._mask_thread.shutdown(wait=False, cancel_futures=True)

    def report_failure(self, e: BaseException) -> None:
        """A failure found outside a step (a health check found a dead rank while idle):
        recover as from a failed step."""
        if self.error is None and self.recovering is None:
            self._pending_failure = e
            self._start()

    # ---- the step loop ---------------------------------------------------------------------

    def _add(self, client: str, new: NewRequest) -> Optional[tuple[RejectKind, str]]:
        if self.error is not None:
            return RejectKind.ENGINE_FAILED, f"the engine is down: {describe_failure(self.error)}"
        if self.router.holds(self.router.request_id(client, new.seq)):
            # sent again by a client that lost the answer to its first submit (its controller
            # handle failed mid-call): the request is here already, and keeps its place
            return None
        if self.num_waiting >= self.max_queued:
            return RejectKind.QUEUE_FULL, f"{self.num_waiting} requests already waiting (serve.max_queued_requests)"
        rid = self.router.add(client, new.seq)
        try:
            self.core.add_request(rid, new.prompt_token_ids, new.sampling)
        except ValueError as e:
            self.router.remove(rid)
            return RejectKind.INVALID, str(e)
        except Exception:  # a bug: it fails this request, not the others of its call
            log.exception("taking request %s raised", rid)
            self.router.remove(rid)
            return RejectKind.INTERNAL, "the engine could not take this request (an internal error)"
        return None

    def _start(self) -> None:
        if self.error is not None:  # down for good, or stopped (the ranks are going away): no more steps
            return
        self._wake.set()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await self._steps()
            except Exception as e:  # a rank died, a step timed out or failed
                log.exception("engine step loop failed")
                if not await self._recover(e):
                    self.error = e
                    self.router.fail(f"the engine is down: {describe_failure(e)}")
                    if self._release is not None:  # its placement group holds the devices
                        try:
                            await self._release()
                        except Exception:
                            log.exception("releasing the ranks of an engine down for good failed")
                    return

    async def _steps(self) -> None:
        in_flight: collections.deque[StepInFlight] = collections.deque()  # launched, not yet applied
        calls: collections.deque[asyncio.Future] = collections.deque()  # sent to the ranks, not yet answered
        try:
            while True:
                if self._pending_failure is not None:
                    e, self._pending_failure = self._pending_failure, None
                    raise e
                self._abort_silent_clients()
                # Pipelined, each call leaves its step in flight, and the next call goes out
                # before the previous one answers (the ranks run calls in order): the loop is
                # not held to one Ray round trip per step. Two steps' tokens are then pending;
                # a live request whose step reads its history allows one (one call at a time),
                # as does a depth of 1 (pipeline_depth.py: a new request's step is planned one
                # step sooner, and the ranks idle whenever the loop's turnaround outlasts the
                # running step).
                max_calls = min(self.core.max_steps_in_flight, self.depth.steps) if self.pipelined else 1
                keep = 1 if self.pipelined else 0
                if len(calls) >= max_calls:
                    self._publish(in_flight, await calls.popleft(), behind=True)
                    continue
                # With steps in flight this already schedules the next one: its decode chunks
                # take their pending tokens from the ranks' recent sampling.
                planned = self.core.schedule()
                if planned is None:
                    if calls:
                        self._publish(in_flight, await calls.popleft(), behind=True)
                        continue
                    if in_flight:  # nothing new to run: collect the last step
                        late = await self._grammar_masks(self.core.late_grammar(in_flight[-1]))
                        self._publish(in_flight, await self.executor.run_step_async(None, 0, late))
                        continue
                    if self.background is not None and self.background.busy:
                        await self.background.on_step(after_step=False)
                        continue
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                if planned.grammar_rows is not None:
                    self.core.attach_grammar(planned, await self._grammar_masks(planned.grammar_rows))
                # the newest step in flight may wait for grammar masks: they go with this call
                late = await self._grammar_masks(self.core.late_grammar(in_flight[-1])) if in_flight else None
                in_flight.append(planned)
                # Background work may call the ranks meanwhile: what they queue on the device
                # lands behind the steps in flight (one step stream).
                calls.append(asyncio.ensure_future(self.executor.run_step_async(planned.inputs, keep, late)))
                if self.background is not None:
                    await self.background.on_step()
        finally:
            for call in calls:  # a failure ends the loop: the calls still out are moot
                if not call.cancel() and not call.cancelled():
                    call.exception()  # it ended already: its error, if any, is this failure's echo

    async def _grammar_masks(self, rows: Optional[list[Optional[GrammarRows]]]) -> Optional[list]:
        """``fill_masks`` of these rows in the mask thread: xgrammar releases the GIL, so the event
        loop keeps answering clients and health checks however long a grammar takes. A step whose
        masks outlast GRAMMAR_STEP_BUDGET_S has the requests that made it slow failed, so that
        they do not slow every step after it."""
        if rows is None:
            return None
        vocab = self.core.grammars.mask_vocab_size
        start = time.monotonic()
        loop = asyncio.get_running_loop()
        masks = await loop.run_in_executor(self._mask_thread, fill_masks, rows, vocab)
        if time.monotonic() - start > GRAMMAR_STEP_BUDGET_S:
            matchers = [m for replica in rows if replica for _, m in replica]
            for matcher, seconds in await loop.run_in_executor(self._mask_thread, slow_matchers, matchers, vocab):
                rid = self.core.request_of(matcher)
                if rid is not None:
                    self.core.abort(rid)
                    why = f"its grammar took {seconds * 1e3:.0f} ms to find the tokens allowed at one step"
                    limit = f"at most {GRAMMAR_FILL_BUDGET_S * 1e3:.0f} ms"
                    self.router.fail_request(rid, f"structured output stopped: {why} ({limit}); simplify it")
        return masks

    async def _recover(self, e: BaseException) -> bool:
        """Fail the requests that had started, recreate the ranks, keep the rest queued.
        False when there is no restart or the budget is spent."""
        reason = describe_failure(e)
        if self._restart is None:
            return False
        self.recovering = reason
        self._pending_failure = None  # found by a health check, of the group this replaces
        try:
            for rid in self.core.drop_started():
                self.router.fail_request(rid, f"the engine failed while this request ran ({reason}); retry it")
            while self._restart_budget.take():
                try:
                    num_blocks = await self._restart()
                except Exception:
                    log.exception("restarting the ranks failed")
                    self._restart_budget.settle(succeeded=False)
                    continue
                self._restart_budget.settle(succeeded=True)
                for rid in self.core.replace_cache(num_blocks):
                    self.router.fail_request(rid, "the restarted engine's KV cache is too small for this request")
                self.num_restarts += 1
                log.warning("engine recovered from: %s (restart %d)", reason, self.num_restarts)
                return True
            log.error(
                "engine stays down: restart budget spent (engine.max_restarts within engine.restart_window_s, "
                "or failed in a row)"
            )
            return False
        finally:
            self.recovering = None

    def _publish(
        self,
        in_flight: "collections.deque[StepInFlight]",
        completed: Sequence[Sequence[StepOutput]],
        behind: bool = False,
    ) -> None:
        """Apply the steps the executor completed (the oldest in flight) and deliver their tokens.
        ``behind``: the call that completed them launched a step behind them, so the ranks'
        wait for them is the turnaround's slack (pipeline_depth.py)."""
        for results in completed:
            if behind and self.pipelined:
                self.depth.observe(min((r.device_wait_s for r in results if r is not None), default=0.0))
            self.router.deliver(self.core.apply(in_flight.popleft(), results))

    def _abort_silent_clients(self) -> None:
        now = time.monotonic()
        if now < self._next_silence_check:
            return
        self._next_silence_check = now + _SILENCE_CHECK_S
        for client in self.router.silent_clients(self.client_timeout_s):
            rids = self.router.drop_client(client)
            log.warning(
                "client %s has not polled for %.0f s: aborting its %d requests",
                client,
                self.client_timeout_s,
                len(rids),
            )
            for rid in rids:
                self.core.abort(rid)
