"""Driver side: connect to (or start) Ray and start a controller actor."""

from __future__ import annotations

import logging
import os
import socket
import urllib.parse
from typing import Any, Optional

import ray

from raymoe.actors.controller import Controller
from raymoe.actors.models.builtin import resolve_model_path
from raymoe.cluster.config import BUILTIN_PREFIX, Config
from raymoe.cluster.layout import RankLayout
from raymoe.cluster.placement import describe_shortfall, placement_fits, plan_placement

log = logging.getLogger(__name__)

# The controller is an asyncio actor that waits on its ranks from worker threads
# (asyncio.to_thread), never on its event loop; Ray's "blocking ray.get inside async
# actor" warning cannot tell the two apart.
CONTROLLER_RUNTIME_ENV = {"env_vars": {"RAY_WARN_BLOCKING_GET_INSIDE_ASYNC": "0"}}
ADDRESS_TIMEOUT_S = 10.0  # how long a Ray address may take to accept a connection


def ensure_ray(config: Config, address: Optional[str] = None) -> None:
    """Connect to ``address`` (or RAY_ADDRESS), or start a local Ray.

    A local Ray started here for a CPU layout offers at least one logical CPU per
    rank, so a 4-rank CPU layout runs on a machine with fewer cores (slowly, but it runs).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address, ADDRESS_TIMEOUT_S)
        try:
            ray.init(address=address)
        except ConnectionError as e:  # something answers there, but no Ray (after Ray's retries, ~20 s)
            raise ValueError(_no_ray(address, str(e))) from None
        return
    # "local": a fresh Ray of our own, even if `ray start` left one running here. Its ranks run
    # on this machine, so what they would fail on later is checked here first.
    if not config.model.path.startswith(BUILTIN_PREFIX):
        resolve_model_path(config.model.path)
    layout = RankLayout.from_config(config.parallel)
    kwargs: dict[str, Any] = {"address": "local", "include_dashboard": False}
    if config.parallel.device == "cpu":
        kwargs["num_cpus"] = max(os.cpu_count() or 1, layout.world_size)
    ray.init(**kwargs)
    plan = plan_placement(layout, config.parallel.device)
    nodes = [{"ip": n["NodeManagerAddress"], "resources": n.get("Resources", {})} for n in ray.nodes() if n["Alive"]]
    if not placement_fits(plan, nodes):  # nothing will join a Ray started here
        ray.shutdown()
        shortfall = describe_shortfall(plan, nodes, can_grow=False)
        raise ValueError(
            f"parallel: the Ray started here cannot hold this layout: {shortfall} "
            "Or pass --address (or set RAY_ADDRESS) to join a cluster that can."
        )


def check_reachable(address: str, timeout_s: float) -> None:
    """ValueError naming ``address`` (host:port, or ray://host:port) when nothing there accepts a
    TCP connection within ``timeout_s``: ray.init would retry it for many minutes. An address
    without a port ("auto") is left to Ray."""
    try:
        parts = urllib.parse.urlsplit(address if "://" in address else "//" + address)
        host, port = parts.hostname, parts.port
    except ValueError:  # not an address: Ray says so itself
        return
    if host is None or port is None:
        return
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        raise ValueError(_no_ray(address, e.strerror or str(e))) from None


def _no_ray(address: str, why: str) -> str:
    return (
        f"--address {address} (or $RAY_ADDRESS): no Ray there ({why}); pass a Ray head node's "
        "address (HOST:6379), or leave it out to start a local Ray"
    )


def start_controller(
    config: Config, address: Optional[str] = None, placement_group_name: str = "", name: Optional[str] = None
) -> Any:
    """Start a controller actor (called ``name``, if given) and bring its rank group up;
    returns the actor handle. ``placement_group_name``: see ``Controller``."""
    ensure_ray(config, address)
    options = {"num_cpus": 0, "runtime_env": CONTROLLER_RUNTIME_ENV, "name": name}
    controller = ray.remote(Controller).options(**options).remote(config, placement_group_name)
    try:
        info = ray.get(controller.start.remote())
    except BaseException:
        ray.kill(controller)
        raise
    log.info("cluster up in %.1f s: %s", info["startup_s"], info["layout"])
    return controller
