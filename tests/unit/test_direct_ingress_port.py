"""A restarted ingress replica waits until Serve can bind a direct-ingress port: a port whose
server died with a connection open stays unbindable without SO_REUSEADDR (as Serve binds)
while the connection is in TIME_WAIT, and Serve takes a port it fails to bind out of use."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from raymoe.deploy import serve_app

HOST = "127.0.0.1"


def _listener(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((HOST, port))
    s.listen()
    return s


def _direct_ingress(monkeypatch, low: int, high: int) -> None:
    monkeypatch.setenv("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1")
    monkeypatch.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", str(low))
    monkeypatch.setenv("RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", str(high))


def test_a_port_whose_server_closed_a_connection_first_cannot_be_bound_as_serve_binds():
    port = serve_app.free_port(HOST)
    server = _listener(port)
    client = socket.create_connection((HOST, port))
    accepted, _ = server.accept()
    server.close()
    accepted.close()  # the server side closes first, as a killed process's sockets do
    client.recv(1)  # its FIN arrived
    client.close()
    time.sleep(0.1)
    assert not serve_app.port_is_free(HOST, port)  # TIME_WAIT: up to 60 s
    _listener(port).close()  # with SO_REUSEADDR (uvicorn's own bind) it would be free


def test_waits_until_a_port_of_the_range_comes_free(monkeypatch):
    port = serve_app.free_port(HOST)
    _direct_ingress(monkeypatch, port, port + 1)
    held = _listener(port)
    threading.Timer(1.0, held.close).start()
    t0 = time.monotonic()
    asyncio.run(serve_app.wait_for_a_direct_ingress_port(HOST, timeout_s=30))
    assert 1.0 <= time.monotonic() - t0 < 10
    assert serve_app.port_is_free(HOST, port)


def test_gives_up_after_the_timeout_and_waits_for_nothing_without_direct_ingress(monkeypatch, caplog):
    port = serve_app.free_port(HOST)
    held = _listener(port)
    try:
        monkeypatch.delenv("RAY_SERVE_ENABLE_DIRECT_INGRESS", raising=False)
        t0 = time.monotonic()
        asyncio.run(serve_app.wait_for_a_direct_ingress_port(HOST, timeout_s=30))
        assert time.monotonic() - t0 < 0.5
        _direct_ingress(monkeypatch, port, port + 1)
        t0 = time.monotonic()
        asyncio.run(serve_app.wait_for_a_direct_ingress_port(HOST, timeout_s=1.0))
        assert 1.0 <= time.monotonic() - t0 < 10
        assert "came free" in caplog.text
    finally:
        held.close()


@pytest.mark.parametrize("busy", [0, 1])
def test_one_free_port_of_several_is_enough(monkeypatch, busy):
    low = serve_app.free_port(HOST)
    ports = [low, low + 1]
    if not all(serve_app.port_is_free(HOST, p) for p in ports):
        pytest.skip("the port after a free one is taken on this machine")
    _direct_ingress(monkeypatch, low, low + 2)
    held = _listener(ports[busy])
    try:
        t0 = time.monotonic()
        asyncio.run(serve_app.wait_for_a_direct_ingress_port(HOST, timeout_s=30))
        assert time.monotonic() - t0 < 0.5
    finally:
        held.close()
