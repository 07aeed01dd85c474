"""An ingress request's life around its handler: its body read within bounds of size and
time, and its handler ended when the client leaves."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.requests import ClientDisconnect, Request

from raymoe.deploy.api_error import APIError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 * 2**20
BODY_TIMEOUT_S = 30.0  # 32 MiB at about 1 MB/s


async def read_body(request: Request) -> bytes:
    """The request body, refused with 413 past MAX_BODY_BYTES (before reading it, when the
    client says its length), and with 408 when it takes over BODY_TIMEOUT_S to arrive: a client
    trickling its body would hold one of the replica's request slots (Serve's
    max_ongoing_requests) for as long as it liked, and enough of them every slot."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":  # read as JSON it was "invalid JSON", which sent no one to the cause
        message = f"Content-Encoding {encoding[:40]!r} is not supported: send the body uncompressed"
        raise APIError(415, message, code="unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        message = f"the request body is {declared} bytes; the limit is {MAX_BODY_BYTES}"
        raise APIError(413, message, code="body_too_large")
    try:
        return await asyncio.wait_for(_read_chunks(request), BODY_TIMEOUT_S)
    except asyncio.TimeoutError:
        message = f"the request body did not arrive within {BODY_TIMEOUT_S:g} s"
        raise APIError(408, message, code="request_timeout") from None


async def _read_chunks(request: Request) -> bytes:
    # chunks joined once at the end: appending each to the bytes so far copies them all again,
    # which for a large body in small chunks held the event loop for seconds
    chunks, size = [], 0
    async for chunk in request.stream():
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"the request body exceeds the limit of {MAX_BODY_BYTES} bytes", code="body_too_large")
    return b"".join(chunks)


async def unless_client_leaves(request: Request, work: Any) -> Any:
    """``work``'s result, or ClientDisconnect (``work`` cancelled, its engine requests aborted)
    once the client has gone. Serve cancels the handler of a client that left too, but under a
    burst of such clients some of those cancellations never arrived: their requests ran on and
    filled the queue. A streamed answer is watched by its StreamingResponse once it starts."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        left = gone.done()  # the client has gone (a handler ending by itself keeps its own outcome)
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # the handler's own clean-up runs first
    if left and task.cancelled():
        raise ClientDisconnect()
    return task.result()


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed the connection (its body already read). A connection
    that can no longer be watched (Serve's proxy unreachable) is logged, and left to the handler."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception as e:  # noqa: BLE001 -- not the client leaving
        log.warning("cannot watch the client's connection: %r", e)
        await asyncio.Event().wait()  # never returns: the handler decides
