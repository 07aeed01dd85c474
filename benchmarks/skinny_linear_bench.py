"""Few-row dense projections on one GPU: the Triton matrix-vector kernel
(actors/models/skinny_linear_triton.py) against F.linear (cuBLAS), at the
Qwen3-30B-A3B projections of one and two tensor-parallel ranks, replayed in CUDA
graphs. Reports microseconds and the share of the copy bandwidth the weight read
reaches. --sweep also times a grid of Triton block sizes per shape, at one row, and names
the config with the least time summed over the shapes (--best-json writes it as JSON).

--dtype fp8 runs the projections' FP8 form (128 x 128 block scales, fp8.py; the router and
LM head stay bf16 in the model, so they are left out): cuBLAS on the weights dequantised to
bf16 against the FP8 matrix-vector kernel, whose bytes are the FP8 weight and its scales.

    python3 benchmarks/skinny_linear_bench.py --rows 1,2,4 --sweep
    python3 benchmarks/skinny_linear_bench.py --dtype fp8 --rows 1 --sweep
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections import defaultdict

import torch
from expert_mlp_bench import copy_bandwidth, graph_time

from raymoe.actors.models.fp8 import DEFAULT_BLOCK, quantize_blocks
from raymoe.actors.models.linear import SKINNY_CONFIG, SKINNY_FP8_CONFIG, linear

# (name, N, K): qkv / o_proj / router of tp=1, qkv / o_proj of tp=2, the LM head of tp=1 and tp=2
SHAPES = [
    ("qkv tp1", 5120, 2048),
    ("o_proj tp1", 2048, 4096),
    ("router", 128, 2048),
    ("qkv tp2", 2560, 2048),
    ("o_proj tp2", 2048, 2048),
    ("lm_head tp1", 151936, 2048),
    ("lm_head tp2", 75968, 2048),
]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,2,4")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--dtype", choices=["bf16", "fp8"], default="bf16", help="the weights' format")
    p.add_argument("--out", help="also write the table here (markdown)")
    p.add_argument("--best-json", help="with --sweep: write the config fastest over all shapes here")
    return p.parse_args()


def _sweep(fp8: bool):
    # FP8: a byte a weight, so also narrower and longer tiles
    bns, bks = ((4, 8, 16, 32), (256, 512, 1024, 2048)) if fp8 else ((8, 16, 32), (256, 512, 1024))
    for bn, bk, warps, stages in itertools.product(bns, bks, (4, 8), (1, 2)):
        yield dict(BN=bn, BK=bk, num_warps=warps, num_stages=stages)


def _fmt(c: dict) -> str:
    return "BN{BN} BK{BK} w{num_warps} s{num_stages}".format(**c)


def main() -> None:
    args = parse()
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    print(f"{torch.cuda.get_device_name(dev)}: copy {bw / 1e12:.2f} TB/s", flush=True)
    lines = [
        "| shape | N x K | rows | cuBLAS us | Triton us | cuBLAS % bw | Triton % bw | error | best sweep |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    fp8 = args.dtype == "fp8"
    totals: dict[str, float] = defaultdict(float)  # config -> time summed over the shapes it ran
    runs: dict[str, int] = defaultdict(int)
    shapes = [s for s in SHAPES if not (fp8 and s[0].split()[0] in ("router", "lm_head"))]
    for (name, n, k), m in itertools.product(shapes, [int(r) for r in args.rows.split(",")]):
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k**0.5
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        quantized = {}
        if fp8:
            w8, scale = quantize_blocks(w, DEFAULT_BLOCK)
            quantized = dict(scale=scale, block=DEFAULT_BLOCK)
            w = w8
        want = linear(x, w, backend="torch", **quantized).float()
        err = ((linear(x, w, backend="triton", **quantized).float() - want).norm() / want.norm()).item()
        t_cublas = graph_time(lambda: linear(x, w, backend="torch", **quantized))
        t_triton = graph_time(lambda: linear(x, w, backend="triton", **quantized))
        best = ""
        if args.sweep and m == 1:  # one row: the batch-1 decode step
            timed = []
            for c in _sweep(fp8):
                if k % c["BK"] == 0 and not (fp8 and (DEFAULT_BLOCK[0] % c["BN"] or c["BK"] % DEFAULT_BLOCK[1])):
                    try:
                        run = lambda c=c: linear(x, w, backend="triton", config=c, **quantized)  # noqa: E731
                        timed.append((graph_time(run), c))
                    except Exception:  # noqa: BLE001 -- a config that does not launch
                        torch.cuda.synchronize()
                        continue
                    totals[json.dumps(c)] += timed[-1][0]
                    runs[json.dumps(c)] += 1
            t, c = min(timed, key=lambda tc: tc[0])
            best = f"{t * 1e6:.1f} us {_fmt(c)}"
        scale_bytes = quantized["scale"].numel() * 4 if fp8 else 0
        byte = n * k * w.element_size() + scale_bytes
        lines.append(
            f"| {name} | {n} x {k} | {m} | {t_cublas * 1e6:.1f} | {t_triton * 1e6:.1f} | "
            f"{byte / t_cublas / bw * 100:.0f} | {byte / t_triton / bw * 100:.0f} | {err:.1e} | {best} |"
        )
        print(lines[-1], flush=True)
    default = SKINNY_FP8_CONFIG if fp8 else SKINNY_CONFIG
    table = f"{args.dtype} weights, default config {_fmt(default)}\n\n" + "\n".join(lines)
    if totals:
        # configs that ran on every shape, by their summed time
        everywhere = sorted((t, c) for c, t in totals.items() if runs[c] == max(runs.values()))
        table += "\n\nBest over all shapes (one row, us summed): " + ", ".join(
            f"{_fmt(json.loads(c))} {t * 1e6:.1f}" for t, c in everywhere[:5]
        )
        default_total = totals.get(json.dumps(default))
        if default_total is not None:
            table += f"; the default {default_total * 1e6:.1f}"
        if args.best_json:
            with open(args.best_json, "w") as f:
                f.write(everywhere[0][1] + "\n")
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
