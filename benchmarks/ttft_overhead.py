"""TTFT over the OpenAI endpoint minus TTFT of the in-process engine, at concurrency 1.

    python benchmarks/ttft_overhead.py [--config tiny] [--reps 50] [--prompt-len 16]

Same prompt (token ids) on every path; every repetition measures the in-process
engine (EngineCore + LocalExecutor in this process, one torch thread like a CPU
rank actor) right next to the path under test, so machine noise hits both alike.

Paths, each one more hop than the last:
  engine     add_request + first step in this process
  ray        an engine client in this driver (submit, poll: driver -> controller -> rank actor)
  http       POST /v1/completions, stream=true, max_tokens=1 (aiohttp, keep-alive), to the
             FastAPI ingress (its own server: serve.direct_ingress; or through Serve's proxy:
             --no-direct-ingress); "server" is the ingress's own TTFT (request arrival to
             first token, mean from its /metrics histogram)
  floor      a trivial Serve ingress, set up the same way, that streams one event at once:
             what Serve costs by itself, with no engine behind it
Prints a table: median and mean TTFT per path and the overhead over the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
import uuid

import aiohttp
import ray
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from ray import serve

from raymoe.actors.engine.local import build_local_engine
from raymoe.actors.engine.request import SamplingParams
from raymoe.cluster.config import resolve_config
from raymoe.deploy.engine_client import EngineClient
from raymoe.deploy.launch import start_controller
from raymoe.deploy.ray_engine import RayEngine
from raymoe.deploy.serve_app import free_port, serve_start, start_serving, stop_serving

GREEDY_ONE = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


def engine_ttft(core, ids: list[int]) -> float:
    rid = uuid.uuid4().hex
    t0 = time.perf_counter()
    core.add_request(rid, ids, GREEDY_ONE)
    while True:
        if any(o.request_id == rid for o in core.step()):
            return time.perf_counter() - t0


async def http_ttft(session: aiohttp.ClientSession, url: str, ids: list[int]) -> float:
    body = {"prompt": ids, "max_tokens": 1, "temperature": 0, "ignore_eos": True, "stream": True}
    t0 = time.perf_counter()
    first = None
    async with session.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if first is None and line.startswith(b"data: {"):
                first = time.perf_counter() - t0
    return first


def floor_app():
    """A Serve ingress that answers every POST with one SSE event right away."""
    app = FastAPI()

    async def events():
        yield b'data: {"choices":[]}\n\n'
        yield b"data: [DONE]\n\n"

    async def completions(request: Request) -> StreamingResponse:
        await request.body()
        return StreamingResponse(events(), media_type="text/event-stream")

    app.add_api_route("/v1/completions", completions, methods=["POST"])
    return serve.deployment(serve.ingress(app)(), ray_actor_options={"num_cpus": 0}).bind()


async def ray_ttft(client: EngineClient, ids: list[int]) -> float:
    t0 = time.perf_counter()
    first = None
    async for _ in client.stream(ids, GREEDY_ONE):
        if first is None:
            first = time.perf_counter() - t0
    return first


def server_ttft_mean(metrics_text: str) -> tuple[float, float]:
    vals = {}
    for line in metrics_text.splitlines():
        if line.startswith("raymoe_time_to_first_token_seconds_"):
            name, value = line.split()
            vals[name] = float(value)
    return vals["raymoe_time_to_first_token_seconds_sum"], vals["raymoe_time_to_first_token_seconds_count"]


async def measure_http(core, url: str, ids: list[int], reps: int) -> tuple[list[float], list[float], float]:
    eng, http = [], []
    async with aiohttp.ClientSession() as session:
        for _ in range(3):  # warm-up
            await http_ttft(session, url, ids)
        async with session.get(url + "/metrics") as r:
            s0, c0 = server_ttft_mean(await r.text())
        for _ in range(reps):
            eng.append(engine_ttft(core, ids))
            http.append(await http_ttft(session, url, ids))
        async with session.get(url + "/metrics") as r:
            s1, c1 = server_ttft_mean(await r.text())
    return eng, http, (s1 - s0) / (c1 - c0)


async def measure_floor(url: str, ids: list[int], reps: int) -> list[float]:
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            await http_ttft(session, url, ids)
        return [await http_ttft(session, url, ids) for _ in range(reps)]


async def measure_ray(core, controller, ids: list[int], reps: int) -> tuple[list[float], list[float]]:
    info, tokenizer = await controller.get_model_info.remote(), await controller.get_tokenizer.remote()
    client = EngineClient(RayEngine(controller), tokenizer, info)
    eng, via = [], []
    for _ in range(3):
        await ray_ttft(client, ids)
    for _ in range(reps):
        eng.append(engine_ttft(core, ids))
        via.append(await ray_ttft(client, ids))
    await client.close()
    return eng, via


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="config file or shipped name (default: built-in tiny model)")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument(
        "--no-direct-ingress", action="store_true", help="through Serve's proxy (serve.direct_ingress: false)"
    )
    args = p.parse_args()
    config = resolve_config(args.config)
    config = config.replace(
        {
            "serve.port": free_port("127.0.0.1"),
            "serve.api_key": None,
            "serve.direct_ingress": not args.no_direct_ingress,
        }
    )
    local = build_local_engine(config, num_threads=1)
    core, vocab = local.core, local.tokenizer.vocab_size
    ids = [random.Random(0).randrange(3, vocab) for _ in range(args.prompt_len)]
    for _ in range(3):
        engine_ttft(core, ids)

    url = start_serving(config)
    try:
        eng_h, http, server_mean = asyncio.run(measure_http(core, url, ids, args.reps))
    finally:
        stop_serving()
    # the floor: the same Serve setup with a trivial ingress alone
    serve_start(config.serve.host, config.serve.port, config.serve.direct_ingress)
    try:
        serve.run(floor_app(), name="floor", route_prefix="/")
        floor = asyncio.run(measure_floor(url, ids, args.reps))
    finally:
        serve.shutdown()
    controller = start_controller(config)
    try:
        ray.get(controller.load_model.remote())
        eng_r, via_ray = asyncio.run(measure_ray(core, controller, ids, args.reps))
    finally:
        ray.get(controller.shutdown.remote())
        ray.kill(controller)
    ray.shutdown()

    ms = lambda xs: (statistics.median(xs) * 1e3, statistics.fmean(xs) * 1e3)  # noqa: E731
    rows = [
        ("engine (in-process)", ms(eng_h + eng_r), None),
        ("ray: driver->controller->rank", ms(via_ray), ms(eng_r)),
        ("http: endpoint, streaming", ms(http), ms(eng_h)),
    ]
    rows.append(("floor: trivial Serve route", ms(floor), (0.0, 0.0)))
    mode = "direct ingress" if config.serve.direct_ingress else "through Serve's proxy"
    print(
        f"\nTTFT at concurrency 1, prompt {args.prompt_len} tokens, {args.reps} repetitions per path "
        f"({config.model.path}; HTTP {mode})"
    )
    print(f"| {'path':<32} | median ms | mean ms | overhead vs engine, median ms |")
    print(f"|{'-' * 34}|----------:|--------:|------------------------------:|")
    for name, (med, mean), base in rows:
        over = "" if base is None else f"{med - base[0]:.2f}"
        print(f"| {name:<32} | {med:9.2f} | {mean:7.2f} | {over:>29} |")
    print(
        f"| {'server-side (ingress) TTFT':<32} | {'':9} | {server_mean * 1e3:7.2f} | "
        f"{'mean ' + format(server_mean * 1e3 - ms(eng_h)[1], '.2f'):>29} |"
    )


if __name__ == "__main__":
    main()
