"""Ray Serve's environment and ports: its latency settings, direct ingress (each ingress replica
serving HTTP on a port of its own), and whether a port can be bound as Serve binds it."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Optional

log = logging.getLogger(__name__)

DIRECT_PORT_WAIT_S = 120.0  # Linux holds a closed connection's port 60 s (TIME_WAIT)

# Ray Serve latency settings (each thread or loop hop costs a wake-up, which on a busy
# host is a millisecond or more; BENCHMARKS.md, "TTFT over the endpoint"). Serve reads them
# when its processes start, so they travel as the Serve controller's runtime env, which
# its proxies and replicas inherit (serve_start).
# - the proxy sends requests to the replica over gRPC instead of Ray actor calls;
# - the proxy routes on its own event loop instead of handing off to a router thread;
# - the replica runs our (async) handlers on its main loop instead of a second thread.
SERVE_ENV = {
    "RAY_SERVE_PROXY_USE_GRPC": "1",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
}


def serve_env(direct_port: Optional[int], num_replicas: int = 1) -> dict[str, str]:
    """SERVE_ENV, plus Serve's direct ingress from ``direct_port`` when given: each ingress
    replica runs an HTTP server of its own, replica i of n on a port in [direct_port,
    direct_port + n), so a request skips the proxy -> replica hop (BENCHMARKS.md)."""
    env = dict(SERVE_ENV)
    if direct_port is not None:
        env.update(
            {
                "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
                "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(direct_port),
                "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(direct_port + num_replicas),
                # a restarted replica takes the port back once it can be bound (the hold-back
                # protects HAProxy routing, which is not used here; wait_for_direct_ingress_ports),
                # and stopping does not wait 30 s
                "RAY_SERVE_PORT_QUARANTINE_S": "0",
                "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
            }
        )
    return env


def direct_ingress_ports() -> Optional[range]:
    """The HTTP ports Serve hands its direct-ingress replicas, as Serve reads its environment
    (None: direct ingress is off)."""
    from ray.serve._private import constants

    if not constants.RAY_SERVE_ENABLE_DIRECT_INGRESS:
        return None
    return range(constants.RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT, constants.RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT)


def port_state(port: int) -> str:
    """The port as Serve would find it: "free" (a bind without SO_REUSEADDR, as Serve binds,
    succeeds), "listening" (a server holds it), or "closing" (only connections of a closed
    server hold it, in TIME_WAIT: up to 60 s). Probed on the wildcard address, which
    conflicts with every other."""

    def binds(reuse: bool) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, int(reuse))
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                return False
        return True

    return "free" if binds(False) else "closing" if binds(True) else "listening"


async def wait_for_direct_ingress_ports(ports: range, timeout_s: float = DIRECT_PORT_WAIT_S) -> None:
    """Return once Serve can bind the port it hands out next: one of ``ports`` free, none
    closing. An ingress replica that died with connections open leaves its port closing;
    Serve hands out the lowest port it has, and one it fails to bind it takes out of use for
    good (the endpoint would never come back). RuntimeError after ``timeout_s``: Serve then
    restarts this replica (it allocates the port after the constructor), which waits again."""
    deadline = time.monotonic() + timeout_s
    waited = False
    while True:
        states = [port_state(port) for port in ports]
        if "free" in states and "closing" not in states:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"direct ingress: no port of {ports.start}-{ports.stop - 1} came free in {timeout_s:.0f} s"
            )
        if not waited:
            log.warning("direct ingress: waiting for ports %d-%d to come free", ports.start, ports.stop - 1)
            waited = True
        await asyncio.sleep(0.5)


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
