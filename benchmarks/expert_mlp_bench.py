"""Routed-expert MLP on one GPU: torch._grouped_mm vs the Triton kernels vs FlashInfer's
cutlass_fused_moe, at Qwen3-30B-A3B's expert shape (128 experts, hidden 2048,
intermediate 768, top-8, bf16; ``--dtype fp8``: the weights in FP8 with 128 x 128 block scales,
the Triton FP8 kernels against torch on the dequantised weights, whose time includes
dequantising every slot on each call: a reference, not a candidate; and cutlass_fused_moe
with its DeepSeek-style block scales, sm90 only, which quantises the activations itself).

Each case times, replayed in a CUDA graph, one MoE layer from the router's logits to
the combined output (top-k, sort by expert, the two projections with SiLU-and-mul,
the weighted sum; the dispatch and the MLP on the backend named, the dispatch falling
back to torch past its size limit) and the expert MLP alone. It reports bandwidth
over the bytes of the experts actually touched, and each output's error against the
torch reference. Backend ``auto`` is what the model runs: no backend named, each piece
picks by size (FP8 experts: the Triton kernels, or from FP8_WIDEN_ROWS_PER_SLOT rows a slot the
weights widened to bf16 for torch._grouped_mm). --sweep also times a grid of Triton block sizes
(--best-json writes the fastest per batch as JSON lines).

    python3 benchmarks/expert_mlp_bench.py --batches 1,16,64,256,4096 --sweep
    python3 benchmarks/expert_mlp_bench.py --dtype fp8 --backends torch,triton --batches 1,64,4096 --sweep
    python3 benchmarks/expert_mlp_bench.py --dtype fp8 --backends torch,triton,cutlass --batches 64,4096,16384
    python3 benchmarks/expert_mlp_bench.py --dtype fp8 --backends triton,auto --batches 8192,16384,32768
    python3 benchmarks/expert_mlp_bench.py --dtype fp8 --backends triton,triton-by-slot --batches 2048,8192 --skew 0.2
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch

from raymoe.actors.models.expert_mlp import expert_mlp, triton_config
from raymoe.actors.models.fp8 import quantize_blocks
from raymoe.actors.models.moe_combine import combine
from raymoe.actors.models.moe_dispatch import TRITON_MAX_CHOICES, dispatch

FP8_BLOCK = (128, 128)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,16,64,256,4096", help="tokens per step, comma-separated")
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=768)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument(
        "--backends",
        default="torch,triton,cutlass",
        help="of torch, triton, triton-by-slot (the Triton kernels with a program row per slot at every size), "
        "auto, cutlass",
    )
    p.add_argument(
        "--skew",
        type=float,
        default=0.0,
        help="uneven routing: each expert's logits get skew x a normal draw of its own (0: even on average)",
    )
    p.add_argument("--sweep", action="store_true", help="also time a grid of Triton block sizes")
    p.add_argument("--dtype", choices=["bf16", "fp8"], default="bf16", help="the expert weights' format")
    p.add_argument("--out", help="also write the table here (markdown)")
    p.add_argument("--best-json", help="with --sweep: write {batch, config} of each batch's fastest here")
    return p.parse_args()


def graph_time(fn, reps: int = 20) -> float:
    """Seconds per call of fn, replayed in a CUDA graph (eager if it cannot be captured)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    run = fn
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
    except Exception as e:  # noqa: BLE001 -- report it and time eagerly
        print(f"  (not capturable, timed eagerly: {type(e).__name__}: {str(e)[:80]})")
        torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    return statistics.median(times)


def copy_bandwidth(dev) -> float:
    """Bytes read + written per second by an eager device copy (as engine_bench measures
    it; a copy captured in a graph runs on the copy engines, far slower)."""
    src = torch.empty(2**30, dtype=torch.bfloat16, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * src.numel() * 2 * 5 / (start.elapsed_time(end) / 1e3)


def main() -> None:
    args = parse()
    dev = torch.device("cuda")
    E, H, F, k = args.experts, args.hidden, args.inter, args.top_k
    gen = torch.Generator(device=dev).manual_seed(0)
    w13 = torch.randn(E, 2 * F, H, device=dev, dtype=torch.bfloat16, generator=gen) / H**0.5
    w2 = torch.randn(E, H, F, device=dev, dtype=torch.bfloat16, generator=gen) / F**0.5
    expert_weights = dict(w13=w13, w2=w2)
    cutlass_weights = (_up_gate(w13, F), w2, dict(quant_scales=[]))  # fc1, fc2, options
    if args.dtype == "fp8":
        (q13, s13), (q2, s2) = quantize_blocks(w13, FP8_BLOCK), quantize_blocks(w2, FP8_BLOCK)
        expert_weights = dict(w13=q13, w2=q2, w13_scale=s13, w2_scale=s2, fp8_block=FP8_BLOCK)
        up_gate_scales = _up_gate(s13, F // FP8_BLOCK[0])  # F is a whole number of blocks here
        options = dict(quant_scales=[up_gate_scales, s2], use_deepseek_fp8_block_scale=True)
        cutlass_weights = (_up_gate(q13, F), q2, options)
    weight_bytes = 1 if args.dtype == "fp8" else 2
    l2p = torch.arange(E, device=dev).view(E, 1)  # one replica per expert
    counts = torch.ones(E, dtype=torch.int64, device=dev)
    bw = copy_bandwidth(dev)
    print(f"{torch.cuda.get_device_name(dev)}: copy {bw / 1e12:.2f} TB/s")
    backends = args.backends.split(",")
    cutlass = _cutlass() if "cutlass" in backends else None
    rows_out = []
    for n in [int(b) for b in args.batches.split(",")]:
        x = torch.randn(n, H, device=dev, dtype=torch.bfloat16, generator=gen)
        popularity = args.skew * torch.randn(E, device=dev, generator=gen)
        logits = (torch.randn(n, E, device=dev, generator=gen) + popularity).to(torch.bfloat16)
        routing = dict(norm_topk_prob=True, logical_to_physical=l2p, replica_count=counts, num_physical=E)
        routing.update(slot_start=0, slots=E)
        ref_dispatch = dispatch(logits, k, **routing, backend="torch")
        ids, weights, rows, ends = ref_dispatch.physical, ref_dispatch.weights, ref_dispatch.rows, ref_dispatch.ends
        groups = ref_dispatch.groups
        touched = ids.unique().numel() * 3 * H * F * weight_bytes
        per_slot = torch.diff(ends, prepend=ends.new_zeros(1)).float()
        print(f"batch {n}: rows a slot max / mean {per_slot.max().item() / per_slot.mean().item():.2f}", flush=True)

        def layer(backend, config=None):
            fits = n * k <= TRITON_MAX_CHOICES
            d = dispatch(logits, k, **routing, backend=backend if fits else "torch")
            y = expert_mlp(x, d.rows, d.ends, **expert_weights, groups=d.groups, backend=backend, config=config)
            return combine(y, d.sorted_row, d.weights, d.ends, backend=backend)

        ref = layer("torch").float()
        cases = {}
        for name in [b for b in backends if b != "cutlass"]:
            mlp, backend = dict(expert_weights, groups=groups), None if name == "auto" else name
            if name == "triton-by-slot":
                c = dict(triton_config(n * k, E, fp8=args.dtype == "fp8"), TILED=False)
                cases[name] = (
                    lambda c=c: layer("triton", c),
                    lambda c=c: expert_mlp(x, rows, ends, **mlp, backend="triton", config=c),
                )
                continue
            cases[name] = (lambda b=backend: layer(b), lambda b=backend: expert_mlp(x, rows, ends, **mlp, backend=b))
        if cutlass is not None:
            out = torch.empty(n, H, device=dev, dtype=torch.bfloat16)
            ids32, wf = ids.to(torch.int32), weights.float()
            fc1, fc2, options = cutlass_weights
            call = lambda: cutlass(x, ids32, wf, fc1, fc2, torch.bfloat16, output=out, **options)  # noqa: E731
            cases["cutlass"] = (call, None)
        for name, (full, mlp_only) in cases.items():
            try:
                got = full()
            except Exception as e:  # noqa: BLE001 -- a candidate that refuses these shapes or this GPU
                print(f"{name} at {n} tokens failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                torch.cuda.synchronize()
                continue
            got = (got[0] if isinstance(got, (list, tuple)) else got).float()
            err = ((got - ref).norm() / ref.norm()).item()
            t = graph_time(full)
            t_mlp = graph_time(mlp_only) if mlp_only is not None else None
            rows_out.append((n, name, t, t_mlp, touched, bw, err, ""))
        if n * k <= 4096:  # the dispatch alone, each backend (the Triton kernel takes up to 4096 choices)
            for backend in ("torch", "triton"):
                t = graph_time(lambda b=backend: dispatch(logits, k, **routing, backend=b))
                rows_out.append((n, f"dispatch {backend}", t, None, None, bw, None, ""))
        if args.sweep and "triton" in backends:
            sweep = dict(expert_weights, groups=groups, backend="triton")
            grid = _sweep(n, E, fp8=args.dtype == "fp8")
            timed = [(_try_time(lambda c=c: expert_mlp(x, rows, ends, **sweep, config=c)), c) for c in grid]
            for t, c in sorted(timed, key=lambda tc: tc[0])[:8]:
                print(f"  sweep batch {n}: {t * 1e6:.1f} us {_fmt(c)}", flush=True)
            t, best = min(timed, key=lambda tc: tc[0])
            rows_out.append((n, "triton best", None, t, touched, bw, None, _fmt(best)))
            if args.best_json:
                with open(args.best_json, "a") as f:
                    f.write(json.dumps(dict(batch=n, us=t * 1e6, config=best)) + "\n")
        print(f"batch {n} done", flush=True)
    table = _table(rows_out, args)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


def _try_time(fn) -> float:
    """graph_time, or infinity for a config that does not launch (e.g. too much shared memory)."""
    try:
        return graph_time(fn)
    except Exception:  # noqa: BLE001
        torch.cuda.synchronize()
        return float("inf")


def _sweep(n: int, experts: int, fp8: bool):
    per_slot = n * 8 / experts
    bms = [16, 32, 64] + ([128] if per_slot > 64 else [])
    if fp8 and per_slot <= 8:  # decode: a slot's rows fit in one or two 16-row blocks
        bms = [16] if per_slot <= 1 else [16, 32]
    # FP8: the weights' block_k is the K step; a byte a weight, so also narrower tiles and
    # deeper pipelines
    bks, bns, stage_counts = ((128,), (16, 32, 64, 128), (2, 3, 4, 5)) if fp8 else ((64, 128), (32, 64, 128), (3, 4))
    for bm, bn, bk, stages in itertools.product(bms, bns, bks, stage_counts):
        for warps in (4, 8) if bm * bn >= 64 * 64 else (4,):
            yield dict(BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages)


def _fmt(c: dict) -> str:
    return "BM{BM} BN{BN} BK{BK} w{num_warps} s{num_stages}".format(**c)


def _table(rows, args) -> str:
    lines = [
        f"experts {args.experts}, hidden {args.hidden}, intermediate {args.inter}, top-{args.top_k}, {args.dtype}; "
        "'layer' = dispatch (top-k, softmax, sort by expert) + expert MLP + weighted combine "
        "(cutlass_fused_moe: from the top-k choices on), 'MLP' = the two projections alone",
        "",
        "| tokens | backend | layer us | MLP us | experts MB | MLP % of copy bw | rel. error vs torch | config |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, name, t, t_mlp, touched, bw, err, note in rows:
        t_s = f"{t * 1e6:.1f}" if t is not None else ""
        m_s = f"{t_mlp * 1e6:.1f}" if t_mlp is not None else ""
        eff = f"{touched / (t_mlp if t_mlp is not None else t) / bw * 100:.0f}" if touched else ""
        e_s = f"{err:.1e}" if err is not None else ""
        if name == "triton" and not note:
            note = _fmt(triton_config(n * args.top_k, args.experts, fp8=args.dtype == "fp8"))
        mb = f"{touched / 1e6:.0f}" if touched else ""
        lines.append(f"| {n} | {name} | {t_s} | {m_s} | {mb} | {eff} | {e_s} | {note} |")
    return "\n".join(lines)


def _up_gate(w13: torch.Tensor, half: int) -> torch.Tensor:
    """raymoe's [gate; up] rows (or their scales' block rows) as cutlass_fused_moe wants them, [up; gate]."""
    return torch.cat([w13[:, half:], w13[:, :half]], dim=1).contiguous()


def _cutlass():
    t0 = time.time()
    try:
        from flashinfer.fused_moe import cutlass_fused_moe

        print(f"flashinfer cutlass_fused_moe imported in {time.time() - t0:.0f}s", flush=True)
        return cutlass_fused_moe
    except Exception as e:  # noqa: BLE001 -- the table says it was not measured
        print(f"cutlass_fused_moe unavailable: {type(e).__name__}: {e}")
        return None


if __name__ == "__main__":
    main()
