"""The engine's client calls (submit, abort, poll, leave) as a protocol, and over Ray: the
controller actor's handle, fetched again when the one in hand died and a new one was started."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Optional, Protocol, Sequence

from raymoe.actors.engine.messages import NewRequest, OutputBatch, Rejection

log = logging.getLogger(__name__)

RETRY_S = 0.5  # after a failed poll (the controller is unreachable)
REATTACH_TIMEOUT_S = 120.0


class EngineApi(Protocol):
    """The engine's client calls: ``AsyncEngine`` in process, ``RayEngine`` over Ray."""

    async def submit(self, client: str, requests: Sequence[NewRequest]) -> list[Rejection]: ...

    async def abort(self, client: str, seqs: Sequence[int]) -> None: ...

    async def poll(self, client: str, timeout_s: float) -> OutputBatch: ...

    async def leave(self, client: str) -> None: ...

    async def reconnect(self) -> None: ...


class RayEngine:
    """``EngineApi`` over the controller actor. ``reattach`` (optional) fetches the controller's
    handle again, for when the one in hand died and its owner started a new one."""

    def __init__(self, controller: Any, reattach: Optional[Callable[[], Awaitable[Any]]] = None) -> None:
        self.controller = controller
        self._reattach = reattach
        self._reattaching: Optional[asyncio.Task] = None

    async def reconnect(self) -> None:
        """After a failed call: take the controller's current handle (one fetch at a time)."""
        if self._reattach is None:
            return
        if self._reattaching is None or self._reattaching.done():
            self._reattaching = asyncio.create_task(self._fetch())
        await asyncio.shield(self._reattaching)

    async def _fetch(self) -> None:
        """Until REATTACH_TIMEOUT_S: ask for the controller, keep it once it answers (the host
        hands out the dead one until Serve has replaced the host)."""
        deadline = time.monotonic() + REATTACH_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                controller = await asyncio.wait_for(self._reattach(), deadline - time.monotonic())
                await asyncio.wait_for(controller.get_model_info.remote(), 10.0)
                self.controller = controller
                return
            except Exception as e:  # the engine host is being replaced
                log.info("re-attaching to the engine: %r", e)
                await asyncio.sleep(RETRY_S)
        log.warning("no engine answered within %.0f s", REATTACH_TIMEOUT_S)

    async def submit(self, client: str, requests: Sequence[NewRequest]) -> list[Rejection]:
        return await self.controller.submit.remote(client, list(requests))

    async def abort(self, client: str, seqs: Sequence[int]) -> None:
        await self.controller.abort.remote(client, list(seqs))

    async def poll(self, client: str, timeout_s: float) -> OutputBatch:
        return await self.controller.poll.remote(client, timeout_s)

    async def leave(self, client: str) -> None:
        await self.controller.leave.remote(client)
