"""Communication benchmark through the product path: a controller, its rank actors, and
``Controller.run_on_ranks`` running the functions below on every rank.

Measures
  1. barrier latency over the cpu (gloo) group against the device group, idle and
     (on cuda) with ~60 ms of matmuls queued on each GPU;
  2. all_reduce / all_gather / reduce_scatter latency (median over iterations, slowest
     rank) and bus bandwidth with the nccl-tests formulas, ``bytes`` being the full
     buffer (all-gather output, reduce-scatter input):
       all_reduce    busbw = bytes / t * 2 (n - 1) / n
       all_gather    busbw = bytes / t * (n - 1) / n
       reduce_scatter busbw = bytes / t * (n - 1) / n
  3. the data-parallel attention path's one-step collectives on the world group (rows of
     2048 bf16 values), through symmetric memory where they fit (up to 2 MiB), else the
     collectives they replace: ``gather_over`` (an all-gather) and
     ``reduce_rows_add_rms_norm`` (a reduce-scatter, then the residual add and RMSNorm;
     its NCCL row is the same with the one-step path turned off), each call with the pass
     end it needs (``finish_pass``).

    python benchmarks/comm_bench.py --device cuda --tp 2
    python benchmarks/comm_bench.py --device cpu --tp 4 --sizes 16KiB,1MiB --iters 10 --out comm.md

The markdown table is the last thing printed (and written to --out).
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
import time
from typing import Callable

import torch
import torch.distributed as dist

QUEUED_MS = 60.0
OPS = ("all_reduce", "all_gather", "reduce_scatter")
ONE_STEP_OPS = ("gather_over", "reduce_rows_add_rms_norm")
ROW_WIDTH = 2048
UNITS = {"": 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


# ---- sizes --------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*(B|KiB|MiB|GiB)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"--sizes: {text!r} is not a size like 16KiB, 4MiB or 1024")
    return int(m.group(1)) * UNITS[m.group(2) or ""]


def default_sizes(device: str) -> list[int]:
    """16 KiB upwards by x4, up to 512 MiB on cuda (512 MiB itself included) or 64 MiB on cpu."""
    cap = 512 * 2**20 if device == "cuda" else 64 * 2**20
    sizes = [16 * 2**10 * 4**k for k in range(12) if 16 * 2**10 * 4**k <= cap]
    return sizes if sizes[-1] == cap else sizes + [cap]


def human(nbytes: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        if nbytes >= UNITS[unit] and nbytes % UNITS[unit] == 0:
            return f"{nbytes // UNITS[unit]} {unit}"
    return f"{nbytes} B"


# ---- run on every rank ----------------------------------------------------------------------


def _rank_info(ctx) -> dict:
    name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"
    return {"device": str(ctx.device), "name": name, "torch": torch.__version__}


def _sync(ctx) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)


def _device_barrier(ctx) -> None:
    """A barrier on the device group (NCCL on cuda): what the cpu group avoids."""
    g = ctx.groups.tp
    if g.world_size == 1:
        return
    if ctx.device.type == "cuda":
        dist.barrier(group=g.device_group, device_ids=[ctx.device.index])
    else:
        dist.barrier(group=g.device_group)


def _matmuls_for(ctx, ms: float) -> Callable[[], None]:
    """A function that queues about ``ms`` milliseconds of bf16 matmuls on this GPU."""
    a = torch.randn(4096, 4096, device=ctx.device, dtype=torch.bfloat16)
    out = torch.empty_like(a)
    for _ in range(3):
        torch.matmul(a, a, out=out)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        torch.matmul(a, a, out=out)
    end.record()
    end.synchronize()
    count = max(1, math.ceil(ms / (start.elapsed_time(end) / 10)))

    def queue() -> None:
        for _ in range(count):
            torch.matmul(a, a, out=out)

    return queue


def _barrier_latency(ctx, iters: int, queued_ms: float) -> dict:
    """Median seconds of a cpu-group and a device-group barrier, idle and (cuda) behind queued work."""
    g = ctx.groups.tp
    kinds = {"cpu group (gloo)": g.barrier, "device group": lambda: _device_barrier(ctx)}
    out: dict = {}
    for label, barrier in kinds.items():
        for _ in range(3):
            barrier()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            barrier()
            times.append(time.perf_counter() - t0)
        out[(label, "idle")] = statistics.median(times)
    if ctx.device.type == "cuda":
        queue = _matmuls_for(ctx, queued_ms)
        for label, barrier in kinds.items():
            times = []
            for _ in range(max(3, iters // 10)):
                g.barrier()
                queue()
                t0 = time.perf_counter()
                barrier()
                times.append(time.perf_counter() - t0)
                _sync(ctx)
            out[(label, f"{queued_ms:.0f} ms of matmuls queued")] = statistics.median(times)
    return out


def _collective_latency(ctx, op: str, nbytes: int, iters: int, warmup: int) -> float:
    """Median seconds of one ``op`` on the tp group with a ``nbytes`` full buffer."""
    g = ctx.groups.tp
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    numel = nbytes // torch.tensor([], dtype=dtype).element_size()
    numel -= numel % g.world_size
    per_rank = numel // g.world_size
    x = torch.ones(per_rank if op == "all_gather" else numel, dtype=dtype, device=ctx.device)
    run = {"all_reduce": g.all_reduce, "all_gather": g.all_gather, "reduce_scatter": g.reduce_scatter}[op]
    return _median_seconds(ctx, g, lambda: run(x), iters, warmup)


def _one_step_latency(ctx, op: str, nbytes: int, iters: int, warmup: int, allowed: bool) -> tuple[float, bool]:
    """(median seconds, whether symmetric memory took it) of one ``op`` of ONE_STEP_OPS on the
    world group, ``nbytes`` being the full buffer; ``allowed`` False: the path without it."""
    from raymoe.actors.models.ops import add_rms_norm

    g = ctx.groups.world
    symmetric, n = g.symmetric, g.world_size
    if not allowed:
        g.symmetric = None
    try:
        dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
        rows = max(1, nbytes // (dtype.itemsize * ROW_WIDTH * n))  # per rank
        ones = dict(dtype=dtype, device=ctx.device)
        if op == "gather_over":
            x = torch.ones(rows, ROW_WIDTH, **ones)
            call = lambda: g.gather_over(g, x)  # noqa: E731
        else:
            x, residual = torch.ones(n * rows, ROW_WIDTH, **ones), torch.ones(rows, ROW_WIDTH, **ones)
            weight = torch.ones(ROW_WIDTH, **ones)
            norm = dict(reduce_rows=g.reduce_scatter, add_rms_norm=add_rms_norm)
            call = lambda: g.reduce_rows_add_rms_norm(x, g.rank_in_group * rows, residual, weight, 1e-6, **norm)  # noqa: E731
        took = g.symmetric is not None and g.symmetric.one_step(x.numel(), x.dtype)

        def run() -> None:
            call()
            g.finish_pass()

        return _median_seconds(ctx, g, run, iters, warmup), took
    finally:
        g.symmetric = symmetric


def _median_seconds(ctx, g, run: Callable[[], object], iters: int, warmup: int) -> float:
    for _ in range(warmup):
        run()
    _sync(ctx)
    g.barrier()
    if ctx.device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            run()
            end.record()
        torch.cuda.synchronize(ctx.device)
        times = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---- driver -------------------------------------------------------------------------------------


def bus_bandwidth(op: str, nbytes: int, seconds: float, n: int) -> float:
    """nccl-tests bus bandwidth in bytes/s; 0 for a world of one."""
    if n == 1 or seconds <= 0:
        return 0.0
    factor = 2 * (n - 1) / n if op == "all_reduce" else (n - 1) / n
    return nbytes / seconds * factor


def iters_for(device: str, nbytes: int, iters: int) -> int:
    """Fewer iterations for big buffers on cpu (gloo moves ~1 GB/s); the same on every rank."""
    if device == "cuda" or nbytes <= 4 * 2**20:
        return iters
    return max(3, iters * 4 * 2**20 // nbytes)


def run(args: argparse.Namespace) -> str:
    import ray

    from raymoe.cluster.config import config_from_dict
    from raymoe.deploy.launch import start_controller

    cfg = config_from_dict({"parallel": {"tp": args.tp, "device": args.device, "placement_timeout_s": 120}})
    controller = start_controller(cfg)
    try:
        info = ray.get(controller.run_on_ranks.remote(_rank_info))
        print(f"world {args.tp} on {info[0]['name']} ({args.device}), torch {info[0]['torch']}", flush=True)
        if args.tp == 1:
            print("world size 1: every collective and barrier is a no-op (the group short-circuits)", flush=True)
        barrier = ray.get(controller.run_on_ranks.remote(_barrier_latency, args.iters, QUEUED_MS))
        rows = []
        for op in OPS:
            for nbytes in args.sizes:
                iters = iters_for(args.device, nbytes, args.iters)
                t = max(ray.get(controller.run_on_ranks.remote(_collective_latency, op, nbytes, iters, args.warmup)))
                rows.append((op, nbytes, t, bus_bandwidth(op, nbytes, t, args.tp)))
                print(f"  {op:>14} {human(nbytes):>8}: {t * 1e6:10.1f} us  {rows[-1][3] / 1e9:8.2f} GB/s", flush=True)
        for op in ONE_STEP_OPS:
            for nbytes in args.sizes:
                iters = iters_for(args.device, nbytes, args.iters)
                for allowed in (True, False):
                    got = ray.get(
                        controller.run_on_ranks.remote(_one_step_latency, op, nbytes, iters, args.warmup, allowed)
                    )
                    t, took = max(r[0] for r in got), got[0][1]
                    label = f"{op} ({'symmetric memory' if took else 'without it'})"
                    kind = "all_gather" if op == "gather_over" else "reduce_scatter"
                    rows.append((label, nbytes, t, bus_bandwidth(kind, nbytes, t, args.tp)))
                    print(f"  {label} {human(nbytes):>8}: {t * 1e6:10.1f} us", flush=True)
                    if not took:
                        break  # what ran was the path without it: a second row would repeat it
    finally:
        ray.get(controller.shutdown.remote())
        ray.kill(controller)
    return table(args, info[0]["name"], barrier, rows)


def table(args: argparse.Namespace, device_name: str, barrier: list[dict], rows: list[tuple]) -> str:
    dtype = "bf16" if args.device == "cuda" else "float32"
    lines = [
        f"### Communication, world {args.tp}, {device_name} ({args.device}, {dtype})",
        "",
        "| barrier | condition | median latency (slowest rank) |",
        "|---|---|---:|",
    ]
    for key in barrier[0]:
        lines.append(f"| {key[0]} | {key[1]} | {max(b[key] for b in barrier) * 1e6:.1f} us |")
    if args.device != "cuda":
        lines.append(f"| (skipped) | {QUEUED_MS:.0f} ms of queued GPU work | needs --device cuda |")
    lines += ["", "| op | size | median latency | bus bandwidth |", "|---|---:|---:|---:|"]
    for op, nbytes, t, bw in rows:
        bw_text = f"{bw / 1e9:.2f} GB/s" if args.tp > 1 else "n/a (no-op)"
        lines.append(f"| {op} | {human(nbytes)} | {t * 1e6:.1f} us | {bw_text} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tp", type=int, default=2, help="ranks in the group (the world size)")
    p.add_argument(
        "--sizes",
        type=lambda s: [parse_size(x) for x in s.split(",")],
        default=None,
        help="comma list, e.g. 16KiB,1MiB,64MiB (default: 16KiB..512MiB by x4 on cuda, ..64MiB on cpu)",
    )
    p.add_argument("--iters", type=int, default=20, help="timed iterations per measurement")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", help="also write the markdown table to this file")
    args = p.parse_args(argv)
    if args.tp < 1 or args.iters < 1 or args.warmup < 0:
        p.error("--tp and --iters must be >= 1, --warmup >= 0")
    args.sizes = args.sizes or default_sizes(args.device)
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    text = run(args)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print("\n" + text, end="")


if __name__ == "__main__":
    main(sys.argv[1:])
