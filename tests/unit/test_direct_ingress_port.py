"""A restarted ingress replica waits until Serve can bind the direct-ingress port it hands out
next: a port whose server died with a connection open cannot be bound without SO_REUSEADDR
(as Serve binds) while the connection is in TIME_WAIT, and Serve takes a port it fails to
bind out of use for good, handing out the lowest port first."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from raymoe.deploy import serve_ports

HOST = "127.0.0.1"


def _listener(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((HOST, port))
    s.listen()
    return s


def _closing_port() -> int:
    """A port left in TIME_WAIT for the next 60 s: its server closed a connection first, as a
    killed process's sockets are closed."""
    port = serve_ports.free_port(HOST)
    server = _listener(port)
    client = socket.create_connection((HOST, port))
    accepted, _ = server.accept()
    server.close()
    accepted.close()
    client.recv(1)  # the server's FIN arrived
    client.close()
    time.sleep(0.1)
    return port


def _free_pair() -> int:
    for _ in range(20):
        port = serve_ports.free_port(HOST)
        if serve_ports.port_state(port + 1) == "free":
            return port
    pytest.skip("no two free ports in a row on this machine")


def test_port_states_as_serve_would_bind_them():
    closing = _closing_port()
    assert serve_ports.port_state(closing) == "closing"
    assert not serve_ports.port_is_free(HOST, closing)  # Serve's bind, without SO_REUSEADDR, fails
    port = serve_ports.free_port(HOST)
    assert serve_ports.port_state(port) == "free"
    held = _listener(port)
    try:
        assert serve_ports.port_state(port) == "listening"
    finally:
        held.close()


def test_waits_while_every_port_is_held_and_returns_once_one_comes_free():
    port = _free_pair()
    held = [_listener(port), _listener(port + 1)]
    threading.Timer(1.0, held[1].close).start()
    try:
        t0 = time.monotonic()
        asyncio.run(serve_ports.wait_for_direct_ingress_ports(range(port, port + 2), timeout_s=30))
        assert 1.0 <= time.monotonic() - t0 < 10
    finally:
        held[0].close()


def test_a_closing_port_is_waited_for_even_next_to_a_free_one():
    """Serve would hand out the lowest port, the closing one, and then block it for good."""
    closing = _closing_port()
    if serve_ports.port_state(closing + 1) != "free":
        pytest.skip("the port after the closing one is taken on this machine")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="came free"):
        asyncio.run(serve_ports.wait_for_direct_ingress_ports(range(closing, closing + 2), timeout_s=1.0))
    assert time.monotonic() - t0 >= 1.0


def test_one_free_port_among_listening_ones_is_enough():
    port = _free_pair()
    held = _listener(port)
    try:
        t0 = time.monotonic()
        asyncio.run(serve_ports.wait_for_direct_ingress_ports(range(port, port + 2), timeout_s=30))
        assert time.monotonic() - t0 < 0.5
    finally:
        held.close()


def test_the_range_is_serves_own_reading_of_its_environment(monkeypatch):
    from ray.serve._private import constants

    monkeypatch.setattr(constants, "RAY_SERVE_ENABLE_DIRECT_INGRESS", False)
    assert serve_ports.direct_ingress_ports() is None
    monkeypatch.setattr(constants, "RAY_SERVE_ENABLE_DIRECT_INGRESS", True)
    env = serve_ports.serve_env(8000, num_replicas=2)
    monkeypatch.setattr(
        constants, "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", int(env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"])
    )
    monkeypatch.setattr(
        constants, "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", int(env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"])
    )
    assert serve_ports.direct_ingress_ports() == range(8000, 8002)
