"""The Ray Serve application: FastAPI ingress replicas (OpenAI API) in front of one engine.

Two deployments. ``EngineHost`` (one replica) starts the controller, which brings up
the rank actors and loads the model, and owns it for its whole life. ``OpenAIIngress``
(``serve.num_replicas`` replicas) gets the controller's handle from it once, then talks
to the controller directly: each replica is one engine client (``EngineClient``) that
tokenises, submits, polls its own requests' outputs once per step and detokenises
them, so the per-token work spreads over the replicas. The same app runs under
``raymoe serve``, ``serve run raymoe.deploy.serve_app:build_app config=...`` and a
KubeRay RayService (``import_path: raymoe.deploy.serve_app:build_app``).

Routes (fastapi_app.py): POST /v1/completions, POST /v1/chat/completions, GET /v1/models[/{id}],
GET or HEAD /health (200 ok, 503 degraded), GET /metrics (Prometheus text), and the expert
load balancer's GET /admin/eplb (status, last plan) and POST /admin/eplb/rebalance.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import uuid
from typing import Any, Optional

import ray
from fastapi import FastAPI
from ray import serve
from ray.util.placement_group import placement_group_table

from raymoe.actors.rank_group import remove_named_placement_group
from raymoe.cluster.config import Config, config_from_dict, resolve_config
from raymoe.deploy import http_limits
from raymoe.deploy.engine_client import EngineClient
from raymoe.deploy.fastapi_app import HEALTH_TIMEOUT_S, build_fastapi_app
from raymoe.deploy.launch import ensure_ray, start_controller
from raymoe.deploy.openai_server import OpenAIServer
from raymoe.deploy.ray_engine import RayEngine
from raymoe.deploy.serve_ports import (
    direct_ingress_ports,
    free_port,
    port_is_free,
    serve_env,
    wait_for_direct_ingress_ports,
)
from raymoe.deploy.serve_wait import wait_until_running

log = logging.getLogger(__name__)

API_KEY_ENV = "RAYMOE_API_KEY"
APP_NAME = "raymoe"
RANKS_GROUP_PREFIX = "raymoe-ranks-"  # an engine host's ranks' placement group, then its tag
HEAD_NODE_RESOURCE = "node:__internal_head__"  # the resource only Ray's head node has
CONTROLLER_PREFIX = "raymoe-controller-"  # its controller actor, then the same tag


# graceful_shutdown_wait_loop_s: an idle replica stops (and frees the GPUs) without a 2 s wait.
# check_health every 2 s: a dead controller is replaced within seconds.
@serve.deployment(
    num_replicas=1,
    ray_actor_options={"num_cpus": 0},
    max_constructor_retry_count=3,
    graceful_shutdown_wait_loop_s=0.25,
    health_check_period_s=2.0,
    health_check_timeout_s=30.0,
)
class EngineHost:
    """Owns the controller (rank actors, model, step loop) for its whole life. The controller
    restarts its own rank group when a rank fails; when the controller itself dies, this
    replica's health check fails and Serve replaces it, which starts a new controller (the
    ingress replicas re-attach to it)."""

    async def __init__(self, config: dict[str, Any]) -> None:
        tag = uuid.uuid4().hex[:12]
        self._placement_group = RANKS_GROUP_PREFIX + tag  # freed here if the controller dies
        freed = await asyncio.to_thread(free_orphaned_rank_groups)
        if freed:
            log.warning("freed the ranks' placement groups of dead controllers: %s", ", ".join(freed))
        self._controller = await asyncio.to_thread(
            start_controller, config_from_dict(config), None, self._placement_group, CONTROLLER_PREFIX + tag
        )
        try:
            info = await self._controller.load_model.remote()
        except BaseException:
            await self.__del__()
            raise
        log.info("engine up: %s (%s), max_model_len %d", info.model, info.architecture, info.max_model_len)

    def controller(self) -> list[Any]:
        """[the controller actor's handle] (in a list: Serve passes it on as is)."""
        return [self._controller]

    async def check_health(self) -> None:
        """Raises when the controller is dead or its event loop hung (a controller that reports
        a failed or recovering engine is alive: it says so on /health). Such a controller is
        killed and its ranks' placement group freed at once, so that the replica Serve starts
        instead can place its own ranks. The controller's own ``health`` also runs, so that
        a rank that died while no step runs is found and replaced."""
        if self._controller is None:  # stopped by an earlier failed check; Serve replaces this replica
            raise RuntimeError("the controller was stopped after it failed a health check")
        try:
            await asyncio.wait_for(self._controller.ping.remote(), HEALTH_TIMEOUT_S)
        except Exception:
            await self._stop_controller(graceful_s=0)
            raise
        self._controller.health.remote()  # not awaited: it finds ranks that died while idle

    async def __del__(self) -> None:
        await self._stop_controller(graceful_s=10)

    async def _stop_controller(self, graceful_s: float) -> None:
        """Shut the controller down (within ``graceful_s``), kill it, free its ranks' placement
        group (a dead controller leaves that reservation behind; Ray keeps it)."""
        controller, self._controller = getattr(self, "_controller", None), None
        if controller is not None:
            if graceful_s > 0:
                try:
                    await asyncio.wait_for(controller.shutdown.remote(), graceful_s)
                except Exception as e:  # already dead or hung: kill it anyway
                    log.warning("controller shutdown: %r", e)
            ray.kill(controller)
        if hasattr(self, "_placement_group"):
            await asyncio.to_thread(remove_named_placement_group, self._placement_group)


def free_orphaned_rank_groups() -> list[str]:
    """Free the ranks' placement groups whose controller is dead, and return their names. An
    engine host killed outright takes its controller with it but not its cleanup, and Ray
    keeps the ranks' reservation: the next engine host could not place its ranks (on a full
    cluster, ever). A group and its controller share a tag; a live controller keeps its group."""
    freed = []
    for group in placement_group_table().values():
        name = group["name"]
        if not name.startswith(RANKS_GROUP_PREFIX) or group["state"] == "REMOVED":
            continue
        try:
            ray.get_actor(CONTROLLER_PREFIX + name[len(RANKS_GROUP_PREFIX) :])
        except ValueError:  # no such actor: it died
            remove_named_placement_group(name)
            freed.append(name)
    return freed


@serve.deployment(ray_actor_options={"num_cpus": 0}, graceful_shutdown_wait_loop_s=0.25)
@serve.ingress()
class OpenAIIngress:
    """One ingress replica: the OpenAI routes over one engine client."""

    async def __init__(self, config: dict[str, Any], engine: Any) -> None:
        http_limits.install()  # before Serve starts this replica's own HTTP server (direct ingress)
        cfg = config_from_dict(config)

        async def current_controller() -> Any:
            return (await engine.controller.remote())[0]

        controller = await current_controller()
        info, tokenizer = await asyncio.gather(controller.get_model_info.remote(), controller.get_tokenizer.remote())
        client = EngineClient(RayEngine(controller, reattach=current_controller), tokenizer, info)
        name = cfg.serve.model_name or cfg.model.path
        self.server = OpenAIServer(
            client,
            name,
            info.model,
            cfg.serve.api_key,
            reasoning_parser=cfg.serve.reasoning_parser,
            tool_parser_name=cfg.serve.tool_parser,
            max_queued_requests=cfg.serve.max_queued_requests,
        )
        log.info("serving %s (%s) as engine client %s", name, info.model, client.client_id)
        ports = direct_ingress_ports()
        if ports is not None:  # Serve binds this replica's port next
            await wait_for_direct_ingress_ports(ports)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_fastapi_app(self.server)

    async def __del__(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            await server.client.close()


def ingress_options(config: Config) -> dict[str, Any]:
    """Deployment options: ``serve.num_replicas`` replicas, each with room for every queued
    and running request plus health/metrics calls (Serve's default of 5 ongoing requests
    would queue concurrent streams). With direct ingress the replicas answer on
    serve.host itself: they run on the head node, where that address is."""
    running = config.engine.max_num_seqs * config.parallel.dp
    options: dict[str, Any] = {
        "num_replicas": config.serve.num_replicas,
        "max_ongoing_requests": config.serve.max_queued_requests + running + 64,
    }
    if config.serve.direct_ingress:
        options["ray_actor_options"] = {"num_cpus": 0, "resources": {HEAD_NODE_RESOURCE: 0.001}}
    return options


def api_key_from_env() -> Optional[str]:
    """$RAYMOE_API_KEY, stripped as a key file's first line is (a secret mounted as a file ends
    in a newline), or None when unset or blank."""
    return os.environ.get(API_KEY_ENV, "").strip() or None


def build_app(args: Optional[dict[str, Any]] = None) -> Any:
    """Application builder (``serve run``, RayService ``import_path``).

    args: ``config`` (a YAML path or the name of a shipped config, e.g. ``tiny``;
    default: the built-in tiny model), ``overrides`` (dotted config fields, e.g.
    ``{"serve.model_name": "qwen3"}``). The API key defaults to $RAYMOE_API_KEY.
    """
    args = dict(args or {})
    config = resolve_config(args.pop("config", None))
    overrides = dict(args.pop("overrides", None) or {})
    if args:
        raise ValueError(f"build_app: unknown argument(s) {sorted(args)}; expected 'config' and 'overrides'")
    if config.serve.api_key is None and api_key_from_env() and "serve.api_key" not in overrides:
        overrides["serve.api_key"] = api_key_from_env()
    if overrides:
        config = config.replace(overrides)
    return app_for(config)


def app_for(config: Config) -> Any:
    """The bound Serve application serving ``config``."""
    data = dataclasses.asdict(config)
    return OpenAIIngress.options(**ingress_options(config)).bind(data, EngineHost.bind(data))


def serve_start(host: str, port: int, direct_ingress: bool, num_replicas: int = 1) -> None:
    """Start Serve with ``serve_env``: the app answers on ``host:port``, through the ingress
    replicas' own servers (``direct_ingress``: ports port .. port + num_replicas - 1;
    Serve's proxy then takes a free port, head node only) or through the proxy. A Serve
    already running keeps its own settings (Serve applies them only at start)."""
    proxy_port = free_port(host) if direct_ingress else port
    serve.start(
        http_options={"host": host, "port": proxy_port},
        proxy_location="HeadOnly",
        controller_options={"runtime_env": {"env_vars": serve_env(port if direct_ingress else None, num_replicas)}},
    )


class AlreadyServingError(ValueError):
    """Another raymoe application runs on this Ray cluster's Serve (another ``raymoe serve``)."""


def claim_port(config: Config) -> Config:
    """``config`` with ``serve.port`` chosen (0: any free port) and checked free, and with it the
    next ones direct ingress uses (Serve would retry the replicas forever on a taken port)."""
    host = config.serve.host
    port = config.serve.port or free_port(host)  # 0: any free port
    ports = range(port, port + (config.serve.num_replicas if config.serve.direct_ingress else 1))
    busy = [p for p in ports if not port_is_free(host, p)]
    if busy:
        raise ValueError(
            f"serve.port: {host}:{busy[0]} is in use; stop what listens there or pick another port "
            f"(with direct ingress, replica i of serve.num_replicas listens on serve.port + i)"
        )
    return config.replace({"serve.port": port})


def start_serving(config: Config, address: Optional[str] = None) -> str:
    """Join (or start) Ray, start Serve answering on ``serve.host:serve.port`` (see
    ``serve_start``; the port as ``claim_port`` takes it) and deploy; returns the base URL once
    the model is loaded and serving."""
    config = claim_port(config)
    host, port = config.serve.host, config.serve.port
    ensure_ray(config, address)
    if APP_NAME in serve.status().applications:  # deploying would replace it
        raise AlreadyServingError(
            f"a raymoe application already runs on this Ray cluster's Serve; stop its raymoe serve "
            f"(or run `serve delete {APP_NAME}`) first"
        )
    serve_start(host, port, config.serve.direct_ingress, config.serve.num_replicas)
    # not waiting in serve.run, which waits through every retry of a replica that raised a user's mistake
    target = serve.RunTarget(app_for(config), name=APP_NAME, route_prefix="/")
    serve.run_many([target], wait_for_applications_running=False)
    try:
        wait_until_running(APP_NAME)
    except ValueError:
        serve.delete(APP_NAME)  # or Serve goes on retrying it
        raise
    nodes = [{"ip": n["NodeManagerAddress"], "resources": n.get("Resources", {})} for n in ray.nodes() if n["Alive"]]
    return f"http://{client_host(host, nodes)}:{port}"


def client_host(host: str, nodes: list[dict[str, Any]]) -> str:
    """The address clients reach an endpoint bound to ``host`` at: ``host`` itself, or for a
    wildcard (0.0.0.0, ::) the head node's IP, where the ingress replicas and Serve's proxy run.
    ``nodes``: alive Ray nodes, each {"ip": str, "resources": {...}}."""
    if host not in ("0.0.0.0", "::"):
        return host
    heads = [n["ip"] for n in nodes if HEAD_NODE_RESOURCE in n["resources"]]
    assert len(heads) == 1, f"Ray reports {len(heads)} alive head nodes"
    return f"[{heads[0]}]" if ":" in heads[0] else heads[0]


def stop_serving() -> None:
    """Shut Serve down (our application with it), or only delete our application when
    others run on the same Serve. Quick enough for ``ray job stop`` (see README)."""
    try:
        if set(serve.status().applications) - {APP_NAME}:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
    except Exception as e:  # Serve already gone (the cluster went away first)
        log.warning("stopping Serve: %r", e)
