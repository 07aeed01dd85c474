"""A bound on the size of an HTTP request's head (request line and headers) for the ingress
replicas' own HTTP servers (Serve's direct ingress runs uvicorn with its httptools parser).

httptools sets no limit, and grows a header value it receives in pieces by appending each
piece to it: one request with a header of 64 MB held a replica's event loop for 6.5 s, and
one of 500 MB for over 90 s, until Serve killed the replica. No API key helps: headers are
parsed first. ``BoundedHeadProtocol`` answers 431 and closes the connection once a request's
head passes MAX_HEAD_BYTES, and 408 once a head takes over HEAD_TIMEOUT_S to arrive (a client
trickling its headers held a connection for as long as it liked: 20,000 of them, the replica's
file limit); ``install`` makes it what uvicorn's ``http="auto"`` picks in this process.
(Serve's own proxy, with ``serve.direct_ingress: false``, is not covered.)
"""

from __future__ import annotations

import asyncio
import importlib.util
import json

MAX_HEAD_BYTES = 64 * 1024
HEAD_TIMEOUT_S = 30.0  # from a connection's start, or a request's first byte, to its last header
_PROTOCOL = "raymoe.deploy.http_limits:BoundedHeadProtocol"


def install() -> None:
    """Make uvicorn servers started later in this process take ``BoundedHeadProtocol`` for
    ``http="auto"`` (without httptools uvicorn takes h11, which has a limit of its own)."""
    if importlib.util.find_spec("httptools") is None:
        return
    from uvicorn import config

    config.HTTP_PROTOCOLS["auto"] = _PROTOCOL


def _error_response(status: str, message: str, code: str) -> bytes:
    body = json.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    ).encode()
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


def _too_large_response() -> bytes:
    message = f"the request line and headers exceed {MAX_HEAD_BYTES} bytes"
    return _error_response("431 Request Header Fields Too Large", message, "headers_too_large")


def _too_slow_response() -> bytes:
    message = f"the request line and headers took over {HEAD_TIMEOUT_S:g} s to arrive"
    return _error_response("408 Request Timeout", message, "request_timeout")


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # no httptools: install() leaves uvicorn's choice alone
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

if HttpToolsProtocol is not None:

    class BoundedHeadProtocol(HttpToolsProtocol):  # type: ignore[valid-type,misc]
        """uvicorn's httptools protocol, counting the bytes that arrive while a request's head
        is incomplete. A chunk is parsed before the count is checked: one that completes the
        head is let through however much body it also holds (a read takes up to 256 KiB), and
        at most one chunk past the bound is ever parsed."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._head_bytes: int | None = 0  # None while a body or nothing is expected
            self._head_timer: asyncio.TimerHandle | None = None
            self._in_head = False  # a request has begun and its headers are not all in

        def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
            super().connection_made(transport)
            self._start_head_timer()

        def connection_lost(self, exc) -> None:  # type: ignore[no-untyped-def]
            self._stop_head_timer()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_bytes = 0
            self._in_head = True
            if self._head_timer is None:  # a kept-alive connection's next request
                self._start_head_timer()

        def on_headers_complete(self) -> None:
            self._head_bytes = None
            self._in_head = False
            self._stop_head_timer()
            super().on_headers_complete()

        def _start_head_timer(self) -> None:
            self._head_timer = asyncio.get_running_loop().call_later(HEAD_TIMEOUT_S, self._head_too_slow)

        def _stop_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_too_slow(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                if self._in_head:  # a request began: say why it ends
                    self.transport.write(_too_slow_response())
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self.transport.is_closing():
                return
            if self._head_bytes is not None:
                self._head_bytes += len(data)
            super().data_received(data)
            if self._head_bytes is not None and self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
                self.transport.write(_too_large_response())
                self.transport.close()
