"""Driver side: connect to (or start) Ray and start a controller actor."""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import ray

from raymoe.actors.controller import Controller
from raymoe.cluster.config import Config
from raymoe.cluster.layout import RankLayout

log = logging.getLogger(__name__)

# The controller is an asyncio actor that waits on its ranks from worker threads
# (asyncio.to_thread), never on its event loop; Ray's "blocking ray.get inside async
# actor" warning cannot tell the two apart.
CONTROLLER_RUNTIME_ENV = {"env_vars": {"RAY_WARN_BLOCKING_GET_INSIDE_ASYNC": "0"}}


def ensure_ray(config: Config, address: Optional[str] = None) -> None:
    """Connect to ``address`` (or RAY_ADDRESS), or start a local Ray.

    A local Ray started here for a CPU layout offers at least one logical CPU per
    rank, so a 4-rank CPU layout runs on a machine with fewer cores (slowly, but it runs).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    # "local": a fresh Ray of our own, even if `ray start` left one running here
    kwargs: dict[str, Any] = {"address": "local", "include_dashboard": False}
    if config.parallel.device == "cpu":
        world = RankLayout.from_config(config.parallel).world_size
        kwargs["num_cpus"] = max(os.cpu_count() or 1, world)
    ray.init(**kwargs)


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
