"""Prefix caching on and off, through the real endpoint, one server per setting in one run.

    python benchmarks/prefix_cache_bench.py --config qwen3-30b-a3b-dummy --layers 16
    python benchmarks/prefix_cache_bench.py --config tiny --prefix 448 --suffix 16 --output-len 16 \\
        --decode-input-len 64 --decode-output-len 32

For each of ``engine.prefix_caching: false`` then ``true`` it serves ``--config`` (in its
own process, so the GPU is free between them) and measures:

* shared prefix: ``--num-requests`` streamed completions at ``--concurrency``, each
  prompt ``--prefix`` tokens shared by all then ``--suffix`` unique ones, ``--output-len``
  new tokens. Prefill tokens computed are the engine's prompt tokens started minus those
  whose KV came from the cache (``EngineStats``), over the run; TTFT is the client's.
* nothing shared (the cost of the bookkeeping): offline ``LLM.generate`` of
  ``--decode-batch`` unique prompts, once with ``--decode-output-len`` new tokens and once
  with 1; the decode step is the difference over the extra steps. Each run uses fresh
  prompts, so the cache never helps.

``--layers`` serves a copy of the model's config with that many layers (dummy weights).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import random
import statistics
import subprocess
import sys
import tempfile
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import serve_bench  # noqa: E402

from raymoe.deploy.bench import run_bench  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny")
    p.add_argument("--layers", type=int)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--prefix", type=int, default=4000, help="shared prompt tokens")
    p.add_argument("--suffix", type=int, default=64, help="unique prompt tokens after the prefix")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--decode-batch", type=int, default=64)
    p.add_argument("--decode-input-len", type=int, default=512)
    p.add_argument("--decode-output-len", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=YAML")
    p.add_argument("--caching", choices=["on", "off"], help="run one setting only, in this process")
    p.add_argument("--json", dest="json_out", help="with --caching: write its results here (default: print them)")
    args = p.parse_args()
    if args.caching:
        result = measure(args)
        if args.json_out:
            pathlib.Path(args.json_out).write_text(json.dumps(result))
        else:
            print(json.dumps({k: v for k, v in result.items() if k not in ("errors", "requests")}, indent=1))
        return 0
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for setting in ("off", "on"):
            out = pathlib.Path(tmp, f"{setting}.json")
            cmd = [sys.executable, __file__, *sys.argv[1:], "--caching", setting, "--json", str(out)]
            subprocess.run(cmd, check=True)
            results[setting] = json.loads(out.read_text())
    print(format_table(args, results["off"], results["on"]))
    return 0 if all(r["failed"] == 0 for r in results.values()) else 1


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from raymoe.actors.engine.request import SamplingParams
    from raymoe.deploy.llm import LLM

    caching = f"engine.prefix_caching={'true' if args.caching == 'on' else 'false'}"
    with serve_bench.served_controller(args.config, args.layers, [*args.set, caching]) as (url, config, controller):
        bench = argparse.Namespace(
            url=url,
            model=None,
            api_key=config.serve.api_key,
            num_requests=args.num_requests,
            concurrency=args.concurrency,
            input_len=args.prefix + args.suffix,
            shared_prefix=args.prefix,
            output_len=args.output_len,
            vocab_size=args.vocab_size,
            turns=1,
            warmup=0,
            seed=0,
        )
        # the same workload with another prefix first: first-use kernel compiles (a prefill
        # over a cached prefix is a shape of its own) land here; it shares nothing with the run
        warm = argparse.Namespace(**{**vars(bench), "num_requests": args.concurrency, "seed": 1})
        asyncio.run(run_bench(warm))
        before = ray.get(controller.stats.remote())
        shared = asyncio.run(run_bench(bench))
        after = ray.get(controller.stats.remote())
        query = sum(after.prefix_cache_query_tokens) - sum(before.prefix_cache_query_tokens)
        hit = sum(after.prefix_cache_hit_tokens) - sum(before.prefix_cache_hit_tokens)
        llm = LLM(controller=controller)
        try:
            plain = [SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)] * args.decode_batch
            step = serve_bench.offline_decode_step_s(
                llm,
                plain,
                input_len=args.decode_input_len,
                output_len=args.decode_output_len,
                vocab_size=args.vocab_size,
                rng=random.Random(7),
            )
        finally:
            llm.shutdown()
    return {
        "failed": shared["failed"],
        "errors": shared["errors"],
        "prompt_tokens": query,
        "computed_tokens": query - hit,
        "ttft_ms": shared["ttft_ms"],
        "ttft_by_wave_ms": ttft_by_wave(shared["requests"], args.concurrency),
        "concurrency": args.concurrency,
        "requests": shared["requests"],  # each request's timeline (request_trace.py reads it)
        "start_unix_s": shared["start_unix_s"],
        "tpot_ms": shared["tpot_ms"],
        "duration_s": shared["duration_s"],
        "output_throughput": shared["output_throughput"],
        "decode_step_s": step,
        "decode_tok_s": args.decode_batch / step,
    }


def ttft_by_wave(requests: list[dict], concurrency: int) -> list[float]:
    """Median TTFT (ms) of each run of ``concurrency`` requests in the order they were sent."""
    ttfts = [r["ttft_s"] * 1e3 for r in requests if r["ok"]]
    return [statistics.median(ttfts[i : i + concurrency]) for i in range(0, len(ttfts), concurrency)]


def format_table(args: argparse.Namespace, off: dict[str, Any], on: dict[str, Any]) -> str:
    lines = [
        f"## prefix_cache_bench: {args.config} ({args.layers or 'all'} layers)",
        "",
        f"shared prefix: {args.num_requests} requests at concurrency {args.concurrency}, "
        f"{args.prefix}-token shared prefix + {args.suffix} unique, {args.output_len} new tokens",
        "",
        "| prefix caching | prompt tokens | prefill tokens computed | TTFT median / mean / p99 ms "
        "| TPOT median ms | duration s |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in (("off", off), ("on", on)):
        t = r["ttft_ms"]
        lines.append(
            f"| {name} | {r['prompt_tokens']:,} | {r['computed_tokens']:,} | "
            f"{t['median']:.0f} / {t['mean']:.0f} / {t['p99']:.0f} | {r['tpot_ms']['median']:.2f} | "
            f"{r['duration_s']:.2f} |"
        )
    for name, r in (("off", off), ("on", on)):
        waves = " / ".join(f"{t:.0f}" for t in r["ttft_by_wave_ms"])
        lines.append(f"\nTTFT median of each {args.concurrency} requests in send order, {name}: {waves} ms")
    lines += [
        "",
        f"prefill computed, on / off: {on['computed_tokens'] / max(1, off['computed_tokens']):.3f}; "
        f"TTFT median, off / on: {off['ttft_ms']['median'] / max(1e-9, on['ttft_ms']['median']):.1f}x",
        "",
        f"nothing shared: decode step at batch {args.decode_batch} ({args.decode_input_len} in, "
        f"{args.decode_output_len} out), offline",
        "",
        "| prefix caching | decode step ms | decode tok/s |",
        "|---|---|---|",
    ]
    for name, r in (("off", off), ("on", on)):
        lines.append(f"| {name} | {r['decode_step_s'] * 1e3:.3f} | {r['decode_tok_s']:,.0f} |")
    lines.append(f"\ndecode step, on / off: {on['decode_step_s'] / off['decode_step_s']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
