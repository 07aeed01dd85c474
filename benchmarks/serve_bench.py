"""Serving benchmark: ``raymoe bench`` against a URL, or against a server started here.

    python benchmarks/serve_bench.py --url http://127.0.0.1:8000 --num-requests 256 --concurrency 32
    python benchmarks/serve_bench.py --config tiny --num-requests 64 --concurrency 8 --input-len 64 --output-len 32

With ``--url`` this is exactly ``raymoe bench`` (same arguments). Without it, it first
serves ``--config`` (default: the built-in tiny model on CPU) on a free local port
through the real Ray Serve endpoint, benchmarks it, and shuts it down.
Prints throughput, TTFT, TPOT, ITL and end-to-end latency (mean, median, p99).
"""
from __future__ import annotations

import argparse
import socket
import sys

from raymoe.deploy.bench import add_bench_args, bench_main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_args(p)
    p.add_argument("--config", help="serve this config (file or shipped name) when no --url is given")
    argv = sys.argv[1:]
    args = p.parse_args(argv)
    if "--url" in argv or any(a.startswith("--url=") for a in argv):
        return bench_main(args)

    import ray

    from raymoe.deploy.serve_app import resolve_config, start_serving, stop_serving

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = resolve_config(args.config).replace({"serve.host": "127.0.0.1", "serve.port": port})
    if config.serve.api_key and not args.api_key:
        args.api_key = config.serve.api_key
    args.url = start_serving(config)
    try:
        return bench_main(args)
    finally:
        stop_serving()
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
