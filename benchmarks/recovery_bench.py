"""How long the endpoint is down after a fault, and what its clients see.

    python benchmarks/recovery_bench.py [--config tiny] [--set parallel.tp=2]
    source .devbundle/install.sh && python3 benchmarks/recovery_bench.py --config qwen3-30b-a3b-dummy --layers 16

Serves ``--config`` here (its ranks must run on this host: the script signals them), then
for each fault -- a rank killed with -9, the controller killed, the engine host replica
killed with -9 (twice), the ingress replica killed with -9 -- with streams running:
the time until every running stream has ended with an error, until /health answers 200
again, and until a new request completes; and whether the streams queued behind the
running ones completed. Also the cold start (serve until healthy). Prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import aiohttp


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="config file or shipped name (default: the built-in tiny model)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=YAML", help="config override (repeatable)")
    p.add_argument("--layers", type=int, help="serve the model with this many layers (dummy weights)")
    p.add_argument("--running", type=int, default=8, help="streams running when the fault comes")
    p.add_argument(
        "--queued", type=int, default=4, help="streams queued behind them (max_num_seqs is set to --running)"
    )
    args = p.parse_args()

    import ray
    from ray import serve
    from serve_bench import _config  # the same --config / --set / --layers handling

    from raymoe.deploy.serve_app import APP_NAME, start_serving, stop_serving

    args.set = [f"engine.max_num_seqs={args.running}"] + args.set
    config, tmp = _config(args)
    t0 = time.monotonic()
    url = start_serving(config)
    rows = [("cold start: serve until healthy", time.monotonic() - t0, "", "")]
    try:
        asyncio.run(_request(url, "warm up", 8))

        def controller() -> Any:
            return serve.get_deployment_handle("EngineHost", APP_NAME).controller.remote().result()[0]

        def kill_rank() -> None:
            os.kill(ray.get(controller().run_on_ranks.remote(_pid))[0], signal.SIGKILL)

        max_tokens = min(4000, ray.get(controller().get_model_info.remote()).max_model_len - 64)

        for name, fault in (
            ("a rank killed with -9", kill_rank),
            ("the controller killed", lambda: ray.kill(controller())),
            ("the engine host killed with -9", lambda: _kill_replica(b"EngineHost")),
            ("the engine host killed with -9 again", lambda: _kill_replica(b"EngineHost")),
            ("the ingress replica killed with -9", lambda: _kill_replica(b"OpenAIIngress")),
        ):
            rows.append((name, *asyncio.run(_fault(url, fault, args.running, args.queued, max_tokens))))
    finally:
        stop_serving()
        ray.shutdown()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"\n## recovery_bench: {config.model.path} ({args.layers or 'all'} layers), {config.parallel.device}, "
        f"world {_world(config)}"
    )
    print(
        "| fault | streams ended with an error after s | /health 200 again after s | a new request done after s "
        "| queued streams completed |"
    )
    print("|---|---|---|---|---|")
    for name, *values in rows:
        if name.startswith("cold"):
            print(f"| {name} | | {values[0]:.1f} | | |")
        else:
            ended, healthy, served, queued = values
            health = f"{healthy:.1f}" if healthy else "never down"
            print(f"| {name} | {ended:.2f} | {health} | {served:.1f} | {queued} |")
    return 0


def _kill_replica(deployment: bytes) -> None:
    """SIGKILL the deployment's replica processes here (Ray names a replica's process after it)."""
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::ServeReplica:raymoe:" + deployment):
                    os.kill(int(pid), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def _pid(ctx: Any) -> int:
    return os.getpid()


def _world(config: Any) -> int:
    from raymoe.cluster.layout import RankLayout

    return RankLayout.from_config(config.parallel).world_size


def _health(url: str) -> int:
    try:
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


async def _request(url: str, prompt: str, max_tokens: int, started: Any = None) -> str:
    """Stream one completion; 'done', or how it ended. ``started`` is set at the first chunk."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
            async with session.post(url + "/v1/completions", json=body) as r:
                if r.status != 200:
                    return f"http {r.status}"
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        if b'"error"' in line and "error" in json.loads(line[6:]):
                            return "error"
                        if started is not None:
                            started.set()
    except aiohttp.ClientError:  # the server went away (its replica killed)
        return "connection lost"
    return "done"


async def _healthy_again(url: str, t0: float, down_within_s: float = 30.0) -> float:
    """Seconds from ``t0`` until /health answers 200 after answering anything else (0.0: it
    never answered otherwise within ``down_within_s``)."""
    seen_down = False
    while True:
        code = await asyncio.to_thread(_health, url)
        seen_down |= code != 200
        if code == 200 and (seen_down or time.monotonic() - t0 > down_within_s):
            return time.monotonic() - t0 if seen_down else 0.0
        await asyncio.sleep(0.2)


async def _served_again(url: str, t0: float) -> float:
    """Seconds from ``t0`` until a new request, sent again until one is, completes."""
    while await _request(url, "after", 8) != "done":
        await asyncio.sleep(0.5)
    return time.monotonic() - t0


async def _fault(url: str, fault: Any, running: int, queued: int, max_tokens: int) -> tuple[float, float, float, str]:
    starts = [asyncio.Event() for _ in range(running)]
    streams = [asyncio.create_task(_request(url, f"long {i}", max_tokens, e)) for i, e in enumerate(starts)]
    while not all(e.is_set() for e in starts):
        if any(s.done() for s in streams):
            raise RuntimeError(f"a stream ended before the fault: {[s.result() for s in streams if s.done()]}")
        await asyncio.sleep(0.05)
    waiting = [asyncio.create_task(_request(url, f"queued {i}", 16)) for i in range(queued)]
    await asyncio.sleep(0.5)
    t0 = time.monotonic()
    await asyncio.to_thread(fault)
    health = asyncio.create_task(_healthy_again(url, t0))  # both probed from the fault on
    served = asyncio.create_task(_served_again(url, t0))
    ended_at = []
    for s in streams:
        await s
        ended_at.append(time.monotonic() - t0)
    outcomes = await asyncio.gather(*waiting)
    return max(ended_at), await health, await served, f"{sum(o == 'done' for o in outcomes)} of {queued}"


if __name__ == "__main__":
    sys.exit(main())
