"""AsyncEngine: one step loop serving many concurrent request streams.

Lives in the controller actor's event loop. Requests arrive at any time; the
loop schedules whatever is queued at each step (no batching delay), awaits the
ranks, and pushes each request's deltas to its stream. A stream that is
closed early (client gone) aborts its request, which frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Callable, Optional, Sequence

from raymoe.actors.engine.core import EngineCore, RequestOutput
from raymoe.actors.engine.request import SamplingParams
from raymoe.actors.engine.step import StepInput, StepOutput

log = logging.getLogger(__name__)

AsyncExecutor = Callable[[Sequence[StepInput]], "asyncio.Future[Sequence[StepOutput]]"]


class QueueFullError(RuntimeError):
    """More requests are waiting than serve.max_queued_requests allows."""


class EngineFailedError(RuntimeError):
    """The step loop died (e.g. a rank actor failed); the engine no longer serves."""


class AsyncEngine:
    def __init__(
        self,
        core: EngineCore,
        execute_async: Callable[[Sequence[StepInput]], Any],
        max_queued: int,
        background: Any = None,
    ) -> None:
        """``background``: work advanced once after every step (EPLB): an object with
        ``async on_step()`` and ``busy`` (True: advance it even while no request runs)."""
        self.core = core
        self.background = background
        self.execute_async = execute_async
        self.max_queued = max_queued
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
            self._streams.pop(request_id, None)
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
        try:
            while True:
                planned = self.core.schedule()
                if planned is None:
                    if self.background is not None and self.background.busy:
                        await self.background.on_step()
                        continue
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                results = await self.execute_async(planned.inputs)
                for out in self.core.apply(planned, results):
                    queue = self._streams.get(out.request_id)
                    if queue is not None:
                        queue.put_nowait(out)
                if self.background is not None:
                    await self.background.on_step()
        except Exception as e:  # a rank died or a step failed: fail every stream, stay failed
            log.exception("engine step loop failed")
            self.error = e
            for queue in self._streams.values():
                queue.put_nowait(e)
