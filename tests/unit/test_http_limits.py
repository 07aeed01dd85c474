"""The ingress's bound on a request's head: uvicorn (as Serve's direct ingress starts it, with
``http="auto"``) answers 431 and closes once the request line and headers pass MAX_HEAD_BYTES,
where httptools alone took seconds of the event loop per 64 MB header; other requests are
unchanged."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
import uvicorn

from raymoe.deploy import http_limits

pytest.importorskip("httptools")


async def _app(scope, receive, send):
    """Answers the length of the body it read."""
    if scope["type"] != "http":
        return
    size, more = 0, True
    while more:
        message = await receive()
        size, more = size + len(message.get("body", b"")), message.get("more_body", False)
    body = str(size).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


async def _exchange(port: int, head: bytes, chunks: list[bytes]) -> tuple[bytes, float]:
    """Send ``head`` then ``chunks`` while reading: the first bytes of the answer (read as they
    come: the server may close before it has read everything sent) and how long it took."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.monotonic()
    answer = asyncio.create_task(reader.read(200))
    writer.write(head)
    try:
        for chunk in chunks:
            if answer.done():
                break
            writer.write(chunk)
            await writer.drain()
    except ConnectionError:  # closed by the server once it answered
        pass
    try:
        data = await asyncio.wait_for(answer, 10)
    finally:
        writer.close()
    return data, time.monotonic() - t0


def _bounded_server(monkeypatch) -> tuple[uvicorn.Server, int]:
    """A uvicorn server of ``_app`` as Serve's direct ingress starts it after ``install``, and its port."""
    monkeypatch.setattr(uvicorn.config, "HTTP_PROTOCOLS", dict(uvicorn.config.HTTP_PROTOCOLS))
    http_limits.install()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(_app, host="127.0.0.1", port=port, lifespan="off", log_level="critical")
    return uvicorn.Server(config), port


def test_a_request_head_past_the_bound_is_a_431_and_others_are_served(monkeypatch):
    server, port = _bounded_server(monkeypatch)

    async def main():
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        ok, _ = await _exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Fine: " + b"a" * 8000 + b"\r\n\r\n", [])
        big_head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Big: "
        refused, seconds = await _exchange(port, big_head, [b"a" * 65536] * 256)  # 16 MB of one header
        long_url, _ = await _exchange(port, b"GET /", [b"a" * 4096] * 100)  # a URL arriving in pieces
        after, _ = await _exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", [])
        # a small head and a large body in one write: the server's reads hold head and body together
        body = b"b" * 3_000_000
        post = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        large_body, _ = await _exchange(port, post, [])
        server.should_exit = True
        await task
        return ok, refused, seconds, long_url, after, large_body

    ok, refused, seconds, long_url, after, large_body = asyncio.run(main())
    assert large_body.startswith(b"HTTP/1.1 200") and large_body.endswith(b"3000000"), large_body
    assert server.config.http_protocol_class is http_limits.BoundedHeadProtocol
    assert ok.startswith(b"HTTP/1.1 200") and after.startswith(b"HTTP/1.1 200")
    assert refused.startswith(b"HTTP/1.1 431") and long_url.startswith(b"HTTP/1.1 431")
    assert seconds < 2.0


def test_a_request_head_that_trickles_in_is_a_408(monkeypatch):
    """Headers sent a line at a time, past HEAD_TIMEOUT_S in all, get a 408 and the connection
    closes; a silent connection closes; a head that arrives in time is served, also when the
    same connection's next request comes later than the timeout after the first began."""
    monkeypatch.setattr(http_limits, "HEAD_TIMEOUT_S", 0.6)
    server, port = _bounded_server(monkeypatch)

    async def trickle(lines, pause_s):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        t0 = time.monotonic()
        answer = asyncio.create_task(reader.read(300))
        try:
            for line in lines:
                if answer.done():
                    break
                writer.write(line)
                await writer.drain()
                await asyncio.sleep(pause_s)
        except ConnectionError:
            pass
        data = await asyncio.wait_for(answer, 10)
        writer.close()
        return data, time.monotonic() - t0

    async def two_requests_kept_alive():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answers = []
        for _ in range(2):
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            answers.append(await asyncio.wait_for(reader.read(300), 5))
            await asyncio.sleep(0.4)  # within uvicorn's keep-alive, 0.8 s after the first began
        writer.close()
        return answers

    async def main():
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        slow = await trickle([b"GET / HTTP/1.1\r\n"] + [b"X-Slow: a\r\n"] * 30, 0.1)  # 3 s of headers
        stalled = await trickle([b"GET / HTTP/1.1\r\nHost: x\r\n"], 0)  # part of a head in one read, then nothing
        silent = await trickle([], 0)
        in_time = await trickle([b"GET / HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"], 0.1)
        kept_alive = await two_requests_kept_alive()
        server.should_exit = True
        await task
        return slow, stalled, silent, in_time, kept_alive

    (slow, slow_s), (stalled, stalled_s), (silent, silent_s), (in_time, _), kept_alive = asyncio.run(main())
    assert slow.startswith(b"HTTP/1.1 408") and b"request_timeout" in slow and slow_s < 2.0, slow
    assert stalled.startswith(b"HTTP/1.1 408") and stalled_s < 2.0, stalled
    assert silent == b"" and silent_s < 2.0
    assert in_time.startswith(b"HTTP/1.1 200")
    assert all(a.startswith(b"HTTP/1.1 200") for a in kept_alive), kept_alive
