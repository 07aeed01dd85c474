"""Driver side: connect to (or start) Ray and start a controller actor."""

from __future__ import annotations

import logging
import os
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
