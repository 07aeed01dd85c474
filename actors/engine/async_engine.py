"""AsyncEngine: one step loop serving many concurrent request streams.

Lives in the controller actor's event loop. Requests arrive at any time; the
loop schedules whatever is queued at each step (no batching delay) and pushes each
request's deltas to its stream. On GPUs one step stays in flight on the ranks
while the loop applies the one before and schedules the next (pipelined steps),
so the device does not idle through the loop's own work and the Ray round trips.
A stream that is closed early (client gone) aborts its request, which frees its
KV blocks.
"""
from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any, AsyncIterator, Callable, Optional, Sequence

from raymoe.actors.engine.core import EngineCore, PlannedStep, RequestOutput
from raymoe.actors.engine.request import SamplingParams
from raymoe.actors.engine.step import StepOutput

log = logging.getLogger(__name__)

class QueueFullError(RuntimeError):
    """More requests are waiting than serve.max_queued_requests allows."""


class EngineFailedError(RuntimeError):
    """The step loop died (e.g. a rank actor failed); the engine no longer serves."""


class AsyncEngine:
    def __init__(
        self,
        core: EngineCore,
        execute_async: Callable[..., Any],
        max_queued: int,
        background: Any = None,
        pipelined: bool = True,
    ) -> None:
        """``execute_async(inputs or None, wait)``: RayStepExecutor.run_async's contract.
        ``background``: work advanced once after every step (EPLB): an object with
        ``async on_step()`` and ``busy`` (True: advance it even while no request runs).
        ``pipelined``: keep one step in flight (see ``_run``)."""
        self.core = core
        self.background = background
        self.execute_async = execute_async
        self.max_queued = max_queued
        self.pipelined = pipelined
        self._streams: dict[str, asyncio.Queue] = {}
        self._wake = asyncio.Event()
        self._loop_task: Optional[asyncio.Task] = None
        self.error: Optional[BaseException] = None

    @property
    def num_waiting(self) -> int:
        return sum(s.num_waiting for s in self.core.schedulers)

    async def stream(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Yield this request's outputs until it finishes. ValueError for a request that can
        never run; QueueFullError when the queue is full; EngineFailedError if the loop died."""
        if self.error is not None:
            raise EngineFailedError(f"engine failed: {self.error}")
        if self.num_waiting >= self.max_queued:
            raise QueueFullError(f"{self.num_waiting} requests already waiting (serve.max_queued_requests)")
        queue: asyncio.Queue = asyncio.Queue()
        self.core.add_request(request_id, prompt_token_ids, sampling)
        self._streams[request_id] = queue
        self._start()
        finished = False
        try:
            while not finished:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise EngineFailedError(f"engine failed: {out}") from out
                finished = out.finished
                yield out
        finally:
            # once this request ended, a new one may reuse its id: leave that one alone
            if self._streams.get(request_id) is queue:
                del self._streams[request_id]
                if not finished:  # the consumer went away: free the request's blocks
                    self.core.abort(request_id)

    def abort(self, request_id: str) -> bool:
        out = self.core.abort(request_id)
        queue = self._streams.get(request_id)
        if out is not None and queue is not None:
            queue.put_nowait(out)
        return out is not None

    def wake(self) -> None:
        """Run the loop now (e.g. to advance requested background work)."""
        self._start()

    def _start(self) -> None:
        self._wake.set()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        in_flight: collections.deque[PlannedStep] = collections.deque()
        try:
            while True:
                # With a step in flight this already schedules the next one: its decode
                # chunks take their pending tokens from the ranks' last sampling.
                planned = self.core.schedule()
                if planned is None:
                    if in_flight:  # nothing new to run: wait for the last step
                        self._publish(in_flight, await self.execute_async(None, True))
                        continue
                    if self.background is not None and self.background.busy:
                        await self.background.on_step()
                        continue
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                in_flight.append(planned)
                # Keep this step in flight while the result of the one before comes back and
                # the next is scheduled, so the ranks' device need not wait for this loop or
                # the Ray hops. While a rebalance is under way steps run one at a time; the
                # call that starts one may find a step in flight, and its calls to the ranks
                # queue behind it (one device stream: the moves land after the step's reads).
                wait = not self.pipelined or (self.background is not None and self.background.busy)
                self._publish(in_flight, await self.execute_async(planned.inputs, wait))
                if self.background is not None:
                    await self.background.on_step()
        except Exception as e:  # a rank died or a step failed: fail every stream, stay failed
            log.exception("engine step loop failed")
            self.error = e
            for queue in self._streams.values():
                queue.put_nowait(e)

    def _publish(self, in_flight: "collections.deque[PlannedStep]", completed: Sequence[Sequence[StepOutput]]) -> None:
        """Apply the steps the executor completed (the oldest in flight) and stream their outputs."""
        for results in completed:
            for out in self.core.apply(in_flight.popleft(), results):
                queue = self._streams.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)
