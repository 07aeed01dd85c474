"""``raymoe bench``: load an OpenAI-compatible endpoint and print what a serving
benchmark prints: throughput, TTFT, TPOT and ITL (mean, median, p99).

Each request streams from /v1/completions with a random prompt of exactly
``--input-len`` token ids and ``--output-len`` tokens (``ignore_eos``, which vLLM and
SGLang accept too), ``--concurrency`` requests in flight at a time. Token counts come
from the server's ``usage``; TTFT is measured to the first streamed chunk, ITL
between chunks (raymoe streams one chunk per token).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import aiohttp


@dataclass(kw_only=True)
class RequestResult:
    ok: bool
    sent: float = 0.0  # time.perf_counter() when the request went out
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    output_ids: list[int] = field(default_factory=list)  # with return_token_ids (multi-turn)
    error: str = ""


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url",
        default="http://127.0.0.1:8000",
        help="server base URL, or several separated by commas (requests take them in turn: "
        "one per ingress replica with direct ingress) (default: %(default)s)",
    )
    p.add_argument("--model", help="model name (default: the first one /v1/models lists)")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at a time")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=64, help="generated tokens per request")
    p.add_argument("--vocab-size", type=int, default=256, help="prompt token ids are drawn from [0, N)")
    p.add_argument(
        "--shared-prefix",
        type=int,
        default=0,
        help="the first N prompt tokens are the same in every request (a system prompt; prefix caching)",
    )
    p.add_argument(
        "--turns",
        type=int,
        default=1,
        help="multi-turn: each of --num-requests conversations sends this many requests in turn, each "
        "re-sending the conversation so far (prompt and output token ids) plus --input-len minus "
        "--shared-prefix new tokens",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed requests first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--json", dest="json_out", help="also write the results to this JSON file")


def bench_main(args: argparse.Namespace) -> int:
    for name in ("num_requests", "concurrency", "input_len", "output_len", "vocab_size", "turns"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1")
    if not 0 <= args.shared_prefix <= args.input_len:
        raise ValueError(f"--shared-prefix: must be in [0, --input-len={args.input_len}]")
    summary = asyncio.run(run_bench(args))
    print(format_summary(summary))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if summary["failed"] == 0 else 1


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    bases = [u.rstrip("/") + "/" for u in args.url.split(",") if u.strip()]
    rng = random.Random(args.seed)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    connector = aiohttp.TCPConnector(limit=args.concurrency + 4)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector) as session:
        model = args.model or await _first_model(session, bases[0])

        shared = [rng.randrange(args.vocab_size) for _ in range(args.shared_prefix)]

        def payload(history: Optional[list[int]] = None) -> dict[str, Any]:
            """A new conversation (``history`` None), or its next turn after ``history``."""
            fresh = [rng.randrange(args.vocab_size) for _ in range(args.input_len - len(shared))]
            body = {
                "model": model,
                "prompt": (shared if history is None else history) + fresh,
                "max_tokens": args.output_len,
                "temperature": 0.0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            if args.turns > 1:  # the next turn re-sends the output's ids (vLLM's extension)
                body["return_token_ids"] = True
            return body

        for i in range(args.warmup * len(bases)):
            await stream_completion(session, bases[i % len(bases)], payload())
        payloads = [payload() for _ in range(args.num_requests)]
        sem = asyncio.Semaphore(args.concurrency)

        async def conversation(i: int, p: dict[str, Any]) -> list[RequestResult]:
            """Its turns one after another (one request, without --turns)."""
            async with sem:
                turns = [await stream_completion(session, bases[i % len(bases)], p)]
                while len(turns) < args.turns and turns[-1].ok:
                    p = payload(p["prompt"] + turns[-1].output_ids)
                    turns.append(await stream_completion(session, bases[i % len(bases)], p))
                return turns

        t0, t0_unix = time.perf_counter(), time.time()
        done = await asyncio.gather(*(conversation(i, p) for i, p in enumerate(payloads)))
        results = [r for turns in done for r in turns]
        duration = time.perf_counter() - t0
    return {**summarize(results, duration, model, args.concurrency, start=t0), "start_unix_s": t0_unix}


async def _first_model(session: aiohttp.ClientSession, base: str) -> str:
    async with session.get(base + "v1/models") as resp:
        body = await resp.json()
        if resp.status != 200:
            raise ValueError(f"--url: GET /v1/models answered {resp.status}: {body}")
        return body["data"][0]["id"]


async def stream_completion(session: aiohttp.ClientSession, base: str, payload: dict[str, Any]) -> RequestResult:
    """One streamed completion from ``base`` (a URL ending in /), timed at the client."""
    t0 = time.perf_counter()
    r = RequestResult(ok=False, sent=t0)
    last: Optional[float] = None
    try:
        async with session.post(base + "v1/completions", json=payload) as resp:
            if resp.status != 200:
                r.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return r
            async for line in resp.content:
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    r.ok = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    r.error = str(chunk["error"])
                    return r
                if chunk.get("usage"):
                    r.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    r.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices"):
                    r.output_ids += chunk["choices"][0].get("token_ids") or []
                    now = time.perf_counter()
                    if last is None:
                        r.ttft = now - t0
                    else:
                        r.itls.append(now - last)
                    last = now
    except aiohttp.ClientError as e:
        r.error = f"{type(e).__name__}: {e}"
        return r
    r.e2e = time.perf_counter() - t0
    return r


def _stats_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0}
    s = sorted(values)
    p99 = s[min(len(s) - 1, max(0, round(0.99 * len(s)) - 1))]
    return {"mean": statistics.fmean(s) * 1e3, "median": statistics.median(s) * 1e3, "p99": p99 * 1e3}


def summarize(
    results: list[RequestResult], duration: float, model: str, concurrency: int, start: float = 0.0
) -> dict[str, Any]:
    """The run's statistics, and each request's timeline (``requests``: seconds from ``start``
    to sending it, TTFT and end-to-end latency, in submission order)."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "model": model,
        "concurrency": concurrency,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_throughput": (in_tokens + out_tokens) / duration,
        "ttft_ms": _stats_ms([r.ttft for r in ok]),
        "tpot_ms": _stats_ms(tpot),
        "itl_ms": _stats_ms([x for r in ok for x in r.itls]),
        "e2e_ms": _stats_ms([r.e2e for r in ok]),
        "requests": [
            {"sent_s": r.sent - start, "ttft_s": r.ttft, "e2e_s": r.e2e, "ok": r.ok}
            for r in sorted(results, key=lambda r: r.sent)
        ],
    }


def format_summary(s: dict[str, Any]) -> str:
    rows = [
        ("model", s["model"]),
        ("concurrency", s["concurrency"]),
        ("requests completed / failed", f"{s['completed']} / {s['failed']}"),
        ("duration (s)", f"{s['duration_s']:.2f}"),
        ("input / output tokens", f"{s['input_tokens']} / {s['output_tokens']}"),
        ("request throughput (req/s)", f"{s['request_throughput']:.2f}"),
        ("output throughput (tok/s)", f"{s['output_throughput']:.1f}"),
        ("total throughput (tok/s)", f"{s['total_throughput']:.1f}"),
    ]
    lines = [f"{k:<30} {v}" for k, v in rows]
    lines.append(f"{'latency (ms)':<30} {'mean':>9} {'median':>9} {'p99':>9}")
    for name in ("ttft", "tpot", "itl", "e2e"):
        st = s[f"{name}_ms"]
        lines.append(f"{name.upper():<30} {st['mean']:>9.2f} {st['median']:>9.2f} {st['p99']:>9.2f}")
    for err in s["errors"]:
        lines.append(f"error: {err}")
    return "\n".join(lines)
