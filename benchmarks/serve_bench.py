"""Serving benchmark: ``raymoe bench`` against a URL, against a server started here, or
the whole suite on one server in one run.

    python benchmarks/serve_bench.py --url http://127.0.0.1:8000 --num-requests 256 --concurrency 32
    python benchmarks/serve_bench.py --config tiny --num-requests 64 --concurrency 8 --input-len 64 --output-len 32
    python benchmarks/serve_bench.py --suite --config qwen3-30b-a3b-dummy --layers 16 \\
        --input-len 512 --output-len 256 --concurrencies 1,64,256

With ``--url`` this is exactly ``raymoe bench`` (same arguments). Without it, it first
serves ``--config`` (default: the built-in tiny model on CPU) on a free local port
through the real Ray Serve endpoint, benchmarks it, and shuts it down.

``--suite`` measures, on that one server and in one run:

* the engine step: a decode step of the served model at each concurrency's batch
  (context = input + output / 2), timed on the ranks as the engine runs it (pipelined
  on GPUs), and the prefill of one step's worth of prompts (``max_num_batched_tokens``);
* offline ``LLM.generate`` of the workload (``--concurrency``'s largest value many
  prompts at once), attached to the served engine;
* the endpoint at each concurrency (``--num-requests``: default twice the concurrency,
  at least 8), streamed, ``ignore_eos``;

and prints them side by side with the ratios between them. ``--layers`` serves a
copy of the model's config with that many layers (for ``model.load_format: dummy``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import pathlib
import random
import shutil
import socket
import statistics
import sys
import tempfile
import time
from typing import Any, Iterator, Optional

from raymoe.deploy.bench import add_bench_args, bench_main, format_summary, run_bench


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_args(p)
    p.add_argument("--config", help="serve this config (file or shipped name) when no --url is given")
    p.add_argument("--suite", action="store_true", help="engine step, offline LLM.generate and the endpoint, one run")
    p.add_argument("--concurrencies", default="1,64,256", help="--suite: endpoint concurrencies")
    p.add_argument("--layers", type=int, help="serve the model with this many layers (dummy weights)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=YAML",
        help="config override, e.g. --set engine.max_num_seqs=256 (repeatable)",
    )
    argv = sys.argv[1:]
    args = p.parse_args(argv)
    if "--url" in argv or any(a.startswith("--url=") for a in argv):
        return bench_main(args)

    import ray

    from raymoe.deploy.serve_app import start_serving, stop_serving

    config, tmp = _config(args)
    if config.serve.api_key and not args.api_key:
        args.api_key = config.serve.api_key
    args.url = replica_urls(start_serving(config), config)
    try:
        return run_suite(args, config) if args.suite else bench_main(args)
    finally:
        stop_serving()
        ray.shutdown()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def replica_urls(url: str, config: Any) -> str:
    """The served URL(s), comma-separated: with direct ingress replica i answers on port + i,
    and the requests are spread over them."""
    if not config.serve.direct_ingress:
        return url
    base = url.rsplit(":", 1)[0]
    return ",".join(f"{base}:{config.serve.port + i}" for i in range(config.serve.num_replicas))


def _config(args: argparse.Namespace) -> tuple[Any, Optional[str]]:
    import yaml

    from raymoe.actors.models.builtin import resolve_model_path
    from raymoe.cluster.config import resolve_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides: dict[str, Any] = {"serve.host": "127.0.0.1", "serve.port": port}
    for item in args.set:
        field, _, value = item.partition("=")
        overrides[field] = yaml.safe_load(value)
    config = resolve_config(args.config).replace(overrides)
    if args.layers is None:
        return config, None
    tmp = tempfile.mkdtemp(prefix="raymoe-layers-")
    src = resolve_model_path(config.model.path)
    for f in src.iterdir():
        if f.name != "config.json" and not f.name.endswith(".safetensors"):
            shutil.copy(f, tmp)
    hf = json.loads((src / "config.json").read_text())
    hf["num_hidden_layers"] = args.layers
    pathlib.Path(tmp, "config.json").write_text(json.dumps(hf))
    return config.replace({"model.path": tmp, "model.load_format": "dummy"}), tmp


@contextlib.contextmanager
def served_controller(config: str, layers: Optional[int], overrides: list[str]) -> Iterator[tuple[str, Any, Any]]:
    """Serve ``config`` (with ``--set``-style ``overrides``; ``layers``: see --layers) here
    through the real endpoint; yields (its URLs, see replica_urls; the Config; the controller handle), then
    stops Serve and Ray (other benchmarks' set-up)."""
    import ray
    from ray import serve

    from raymoe.deploy.serve_app import APP_NAME, start_serving, stop_serving

    cfg, tmp = _config(argparse.Namespace(config=config, layers=layers, set=overrides))
    url = replica_urls(start_serving(cfg), cfg)
    try:
        (controller,) = serve.get_deployment_handle("EngineHost", APP_NAME).controller.remote().result()
        yield url, cfg, controller
    finally:
        stop_serving()
        ray.shutdown()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def offline_decode_step_s(
    llm: Any, params: list[Any], *, input_len: int, output_len: int, vocab_size: int, rng: random.Random
) -> float:
    """Seconds per decode step of ``len(params)`` rows (offline ``LLM.generate``, one row per
    ``SamplingParams``): ``output_len`` new tokens and 1 from fresh prompts each time (the
    prefix cache never helps), best of two each, the difference over the extra steps."""

    def run(tokens: int) -> float:
        prompts = [[rng.randrange(vocab_size) for _ in range(input_len)] for _ in params]
        sampling = [dataclasses.replace(p, max_tokens=tokens) for p in params]
        t0 = time.perf_counter()
        out = llm.generate(prompts, sampling)
        assert all(len(o.token_ids) == tokens for o in out), "a row ended early"
        return time.perf_counter() - t0

    run(2)  # warm-up (first calls, grammar compiles)
    long = min(run(output_len) for _ in range(2))
    short = min(run(1) for _ in range(2))
    return (long - short) / (output_len - 1)


# ---- the suite --------------------------------------------------------------------------------


def run_suite(args: argparse.Namespace, config: Any) -> int:
    import ray
    from ray import serve

    from raymoe.deploy.llm import LLM
    from raymoe.deploy.serve_app import APP_NAME

    concurrencies = [int(c) for c in args.concurrencies.split(",")]
    (controller,) = serve.get_deployment_handle("EngineHost", APP_NAME).controller.remote().result()
    info = ray.get(controller.get_model_info.remote())
    engine = engine_times(controller, config, info, args, concurrencies)
    print(f"engine: {json.dumps(engine)}", flush=True)

    # offline before and after the endpoint runs: machine noise over the run hits both alike
    llm = LLM(controller=controller)
    try:
        with phase("offline"):
            offline = [offline_generate(llm, max(concurrencies), args)]
        print(f"offline: {json.dumps(offline[0])}", flush=True)
        endpoint = {}
        for c in concurrencies:
            run = argparse.Namespace(**vars(args))
            run.concurrency = c
            run.num_requests = args.num_requests if "--num-requests" in sys.argv else max(8, 2 * c)
            with phase(f"concurrency {c}"):
                endpoint[c] = asyncio.run(run_bench(run))
            print(format_summary(endpoint[c]), flush=True)
        with phase("offline again"):
            offline.append(offline_generate(llm, max(concurrencies), args))
        print(f"offline again: {json.dumps(offline[1])}", flush=True)
    finally:
        llm.shutdown()
    stats = ray.get(controller.stats.remote())
    print(format_suite(args, config, engine, offline, endpoint, stats))
    return 0 if all(s["failed"] == 0 for s in endpoint.values()) else 1


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Print when a part of the suite ran (wall-clock seconds), for step_trace.py --phases."""
    t0 = time.time()
    yield
    print(f"phase: {name} {t0:.3f} {time.time():.3f}", flush=True)


def engine_times(
    controller: Any, config: Any, info: Any, args: argparse.Namespace, batches: list[int]
) -> dict[str, Any]:
    """Decode step per batch and the prefill of one step's token budget, on the served ranks."""
    import ray
    import ray.cloudpickle

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    import engine_bench  # noqa: E402

    ray.cloudpickle.register_pickle_by_value(engine_bench)
    run = lambda fn, *a: ray.get(controller.run_on_ranks.remote(fn, *a))  # noqa: E731
    dp, bs = config.parallel.dp, info.block_size
    context = args.input_len + args.output_len // 2
    out: dict[str, Any] = {"context": context}
    pipelined = (
        config.parallel.device == "cuda" if config.engine.pipelined_steps is None else config.engine.pipelined_steps
    )
    for b in batches:
        b = min(b, config.engine.max_num_seqs)
        need = b * -(-(context + 1) // bs)
        if need > info.kv_blocks_per_replica:
            raise SystemExit(
                f"the engine's decode step at batch {b} and context {context} needs {need} KV blocks, the "
                f"server has {info.kv_blocks_per_replica}: raise engine.num_kv_blocks (--set engine.num_kv_blocks=N)"
            )
        steps = [engine_bench.decode_step(b, context, bs, d, (b,) * dp) for d in range(dp)]
        res = run(engine_bench._per_replica(engine_bench.time_step), steps, 10, pipelined)[0]
        out[f"decode_{b}_s"] = res["pipelined_s"] if pipelined else res["median_s"]
    seqs = max(1, config.engine.max_num_batched_tokens // args.input_len)
    counts = (seqs * args.input_len,) * dp
    prefill = engine_bench.Prefill(seqs, args.input_len)
    steps = [engine_bench.prefill_step(prefill, bs, counts, info.vocab_size) for _ in range(dp)]
    res = run(engine_bench._per_replica(engine_bench.time_step), steps, 5, False)[0]
    out["prefill_tok_s"] = seqs * args.input_len * dp / res["median_s"]
    return out


def offline_generate(llm: Any, num_prompts: int, args: argparse.Namespace) -> dict[str, Any]:
    from raymoe.actors.engine.request import SamplingParams

    rng = random.Random(args.seed + 1)
    prompts = [[rng.randrange(args.vocab_size) for _ in range(args.input_len)] for _ in range(num_prompts)]
    sampling = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], sampling)  # warm-up
    t0 = time.perf_counter()
    out = llm.generate(prompts, sampling)
    duration = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in out)
    return {"prompts": num_prompts, "output_tokens": tokens, "duration_s": duration, "output_tok_s": tokens / duration}


def format_suite(args, config, engine: dict, offline_runs: list[dict], endpoint: dict, stats: Any) -> str:
    offline = {"output_tok_s": statistics.fmean(o["output_tok_s"] for o in offline_runs)}
    lines = [
        f"## serve_bench --suite: {config.model.path} ({args.layers or 'all'} layers), {args.input_len} in / "
        f"{args.output_len} out, ignore_eos",
        "",
        f"offline LLM.generate of {offline_runs[0]['prompts']} prompts, before and after the endpoint runs: "
        + " / ".join(f"{o['output_tok_s']:,.0f}" for o in offline_runs)
        + f" output tok/s (x offline: of the mean, "
        f"{offline['output_tok_s']:,.0f})",
        f"engine prefill: {engine['prefill_tok_s']:,.0f} tok/s; engine steps run: {stats.steps}, polls: {stats.polls}",
        "",
        "| concurrency | endpoint tok/s | x offline | engine step ms | step ceiling tok/s | x ceiling "
        "| TPOT median ms | x step | TTFT median / mean / p99 ms | prefill of c prompts ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c, s in endpoint.items():
        b = min(c, config.engine.max_num_seqs)
        step = engine[f"decode_{b}_s"]
        ceiling = b * config.parallel.dp / step
        prefill_ms = c * args.input_len / engine["prefill_tok_s"] * 1e3
        tput, tpot, ttft = s["output_throughput"], s["tpot_ms"], s["ttft_ms"]
        lines.append(
            f"| {c} | {tput:,.0f} | {tput / offline['output_tok_s']:.2f} | {step * 1e3:.2f} | {ceiling:,.0f} | "
            f"{tput / ceiling:.2f} | {tpot['median']:.2f} | {tpot['median'] / (step * 1e3):.2f} | "
            f"{ttft['median']:.0f} / {ttft['mean']:.0f} / {ttft['p99']:.0f} | {prefill_ms:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
