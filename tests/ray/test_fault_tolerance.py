"""A live two-rank server survives its own faults, with no outside action: a rank killed
with -9, a rank frozen with SIGSTOP, the controller killed, the engine host killed with -9. Each time the requests that
were running end within seconds with a clear 503 (no actor ids, pids or addresses),
/health turns 503 and then 200, the requests still queued complete, and a new request
succeeds. The ranks run on this host (the simulated cluster), so the test signals them
directly."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
import urllib.error
import urllib.request
from typing import Any

import aiohttp
import pytest
import ray
from processes import kill_processes
from serving import served

from raymoe.cluster.config import load_config

ray.cloudpickle.register_pickle_by_value(__import__(__name__))

MAX_NUM_SEQS = 4
LONG, SHORT = 1500, 24  # tokens: a stream still running when the fault comes; a queued one
ADMIN = 10_000  # added to /admin/health's codes in the list of codes seen
INTERNALS = re.compile(r"actor_id|pid=|ip=|192\.|127\.|Actor\(|[0-9a-f]{24}")


@pytest.fixture(scope="module")
def server(ray_cluster) -> Any:
    config = load_config().replace(
        {
            "parallel.tp": 2,
            "engine.max_num_seqs": MAX_NUM_SEQS,
            "engine.num_kv_blocks": 2048,
            "engine.step_timeout_s": 3.0,
            "engine.max_restarts": 10,
        }
    )
    with served(config) as url:
        yield url


def _controller() -> Any:
    from ray import serve

    from raymoe.deploy.serve_app import APP_NAME

    return serve.get_deployment_handle("EngineHost", APP_NAME).controller.remote().result()[0]


def _pid(ctx: Any) -> int:
    return os.getpid()


def _health(url: str, route: str = "/health") -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url + route, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except OSError:
        return 0, {}


async def _stream(session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int, log: dict) -> None:
    """One streamed completion; log: chunks seen, how it ended, when."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    log.update(chunks=0, end=None, message="", t_end=None)
    async with session.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            log.update(end=f"http {r.status}", message=(await r.json())["error"]["message"], t_end=time.monotonic())
            return
        async for line in r.content:
            if line.startswith(b"data: {"):
                data = json.loads(line[6:])
                if "error" in data:
                    log.update(end="error", message=data["error"]["message"], t_end=time.monotonic())
                    return
                log["chunks"] += len(data["choices"])
        log.update(end="done", t_end=time.monotonic())


async def _fault(url: str, inflict: Any) -> tuple[list[dict], list[dict], float, list[int]]:
    """MAX_NUM_SEQS long streams running and three queued behind them; ``inflict()`` once every
    long one has streamed; returns (running logs, queued logs, fault time, /health and /admin/health codes seen)."""
    running = [{} for _ in range(MAX_NUM_SEQS)]
    queued = [{} for _ in range(3)]
    codes: list[int] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as session:
        tasks = [asyncio.create_task(_stream(session, url, f"long {i}", LONG, log)) for i, log in enumerate(running)]
        while not all(log.get("chunks", 0) >= 3 for log in running):
            assert not any(log.get("end") for log in running), running
            await asyncio.sleep(0.05)
        tasks += [asyncio.create_task(_stream(session, url, f"short {i}", SHORT, log)) for i, log in enumerate(queued)]
        await asyncio.sleep(0.3)  # the queued ones reach the engine's queue
        t_fault = time.monotonic()
        await asyncio.to_thread(inflict)
        deadline = t_fault + 90
        while time.monotonic() < deadline:
            codes.append((await asyncio.to_thread(_health, url))[0])
            if codes[-1] != 200:  # the admin route's code is /health's
                codes.append((await asyncio.to_thread(_health, url, "/admin/health"))[0] + ADMIN)
            if codes[-1] == 200 and len(codes) > 1:
                break
            await asyncio.sleep(0.25)
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
    return running, queued, t_fault, codes


def _check(url: str, running: list[dict], queued: list[dict], t_fault: float, codes: list[int], reason: str) -> None:
    for log in running:
        assert log["end"] == "error" and log["t_end"] - t_fault < 5.0, log
        assert reason in log["message"] and not INTERNALS.search(log["message"]), log["message"]
    for log in queued:
        assert log["end"] == "done" and log["chunks"] == SHORT, log
    assert 503 in codes and 503 + ADMIN in codes and codes[-1] == 200, codes
    status, body = _health(url)
    assert status == 200 and set(body) <= {"status", "reason"}  # bare: nothing about processes
    after: dict = {}
    asyncio.run(_with_session(lambda s: _stream(s, url, "after the fault", 8, after)))
    assert after["end"] == "done" and after["chunks"] == 8


async def _with_session(fn: Any) -> None:
    async with aiohttp.ClientSession() as session:
        await fn(session)


def test_a_rank_killed_with_minus_9(server):
    pids = ray.get(_controller().run_on_ranks.remote(_pid))
    running, queued, t_fault, codes = asyncio.run(_fault(server, lambda: os.kill(pids[1], signal.SIGKILL)))
    _check(server, running, queued, t_fault, codes, "a rank process died")
    assert ray.get(_controller().stats.remote()).restarts >= 1


def test_a_frozen_rank_times_out_and_the_group_restarts(server):
    pids = ray.get(_controller().run_on_ranks.remote(_pid))
    try:
        running, queued, t_fault, codes = asyncio.run(_fault(server, lambda: os.kill(pids[0], signal.SIGSTOP)))
    finally:
        try:
            os.kill(pids[0], signal.SIGKILL)  # killed with the old group already, normally
        except ProcessLookupError:
            pass
    # the step timeout (3 s) plus the failure's handling: the streams end within 5 s of it
    _check(server, running, queued, t_fault + 3.0, codes, "engine.step_timeout_s")


def test_the_controller_killed(server):
    """Serve replaces the engine host whose controller died; the ingress re-attaches and sends
    the queued requests (which had returned nothing) to the new controller."""
    controller = _controller()
    running, queued, t_fault, codes = asyncio.run(_fault(server, lambda: ray.kill(controller)))
    _check(server, running, queued, t_fault, codes, "restarting")


def _kill_engine_host() -> None:
    """SIGKILL the EngineHost replica's process (Ray names the process after the replica)."""
    assert kill_processes(b"ray::ServeReplica:raymoe:EngineHost")


def test_the_engine_host_killed_with_minus_9(server):
    """Its controller dies with it, and its cleanup never runs: the ranks' placement group it
    left reserved is freed by the next engine host, which could not place its ranks otherwise
    (on a full cluster)."""
    from ray.util.placement_group import placement_group_table

    running, queued, t_fault, codes = asyncio.run(_fault(server, _kill_engine_host))
    _check(server, running, queued, t_fault, codes, "restarting")
    groups = [g for g in placement_group_table().values() if g["name"].startswith("raymoe-ranks-")]
    assert [g["state"] for g in groups].count("CREATED") == 1, groups


def _busy(ctx: Any, seconds: float) -> None:
    time.sleep(seconds)


def test_a_rank_busy_longer_than_a_health_check_is_not_a_failure(server):
    """A rank runs one call at a time: a long step (a first step's kernel compilation on a
    GPU takes minutes) makes health checks wait. That must not restart anything."""
    controller = _controller()
    before = ray.get(controller.stats.remote()).restarts
    busy = controller.run_on_ranks.remote(_busy, 12.0)  # longer than the ranks' health timeout
    time.sleep(0.5)
    t0 = time.monotonic()
    health = ray.get(controller.health.remote())
    assert health["status"] == "ok" and health["busy_ranks"] >= 1 and time.monotonic() - t0 < 10
    for _ in range(6):  # the engine host's own checks run every 2 s meanwhile
        assert _health(server)[0] == 200
        time.sleep(1.0)
    ray.get(busy)
    assert ray.get(controller.stats.remote()).restarts == before and _controller() == controller
