"""FP8 block-scaled GEMMs on one Hopper GPU (sm90): which kernel should run raymoe's FP8
projections (actors/models/fp8.py: float8_e4m3fn weights with one float32 scale per 128 x 128
block, activations quantised per row and 128 columns)?

At Qwen3-30B-A3B's projection shapes (tp=1; gate_up and down are one expert's) and a range of
rows M it times y = x W^T, x bf16 [M, K], W [N, K], with these candidates:

    bf16           F.linear on the dequantised weight in bf16 (the baseline)
    linear         raymoe's linear() as the model calls it: the FP8 matrix-vector kernel at one row
                   (actors/models/skinny_linear_triton.py), the Triton FP8 GEMM past it, cuBLAS
                   past fp8_cublas_min_rows (linear.py)
    triton         raymoe's Triton FP8 GEMM (actors/models/fp8_linear_triton.py) at every M,
                   quantising x inside (or in a pass of its own at prefill sizes)
    cublas         raymoe's cuBLAS path (actors/models/fp8_scaled_mm.py) at every M: x quantised
                   by the Triton quantiser, then cuBLAS's blockwise scaled_mm (1 x 128 activation
                   scales, 128 x 128 weight scales)
    torch          that scaled_mm alone, on x quantised beforehand (by torch)
    fi_sm90+quant  FlashInfer's fp8_blockscale_gemm_sm90 on bf16 x (its quantiser, then its GEMM)
    fi_sm90        the same GEMM alone, on x quantised beforehand
    fi_groupwise   FlashInfer's gemm_fp8_nt_groupwise (CUTLASS; SM100 and later only), x
                   quantised beforehand

Times are device times: CUDA events around each call, the median over --iters calls after a
warm-up. Before each call the L2 cache is flushed (a model streams every layer's weights from
HBM) and the GPU sleeps long enough for the host to queue the call, so host overhead stays out,
as under the CUDA graphs decode runs in. Each result is checked once per shape and M: an FP8
candidate against x quantised by quantize_groups times the dequantised weight, bf16 against x
times its bf16 weight; a relative error above 2e-2 is flagged (!) and left out of the fastest.
A candidate that is unavailable or raises prints why and is left out; the bench goes on.

--sweep instead times raymoe's Triton GEMM over a grid of its configs (blocks, pipeline,
quantising x first, K split over programs) at each M, summed over the shapes, against the
cuBLAS path's sum; --best-json writes each M's fastest config as a JSON line.

    python benchmarks/fp8_gemm_bench.py
    python benchmarks/fp8_gemm_bench.py --shapes qkv,2048x768 --rows 1,64 --iters 50 --out fp8.md
    python benchmarks/fp8_gemm_bench.py --sweep --shapes qkv,o_proj --rows 32,64 --iters 20
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import itertools
import json
import statistics
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from raymoe.actors.models.fp8 import FP8, FP8_MAX, dequantize_blocks, quantize_blocks, quantize_groups
from raymoe.actors.models.linear import linear

BLOCK = (128, 128)  # the weights' scale blocks
GROUP = 128  # the activations' scale groups: one scale per row and GROUP columns
SHAPES = {"qkv": (5120, 2048), "o_proj": (2048, 4096), "gate_up": (1536, 2048), "down": (2048, 768)}
ROWS = "1,16,64,256,4096"
BASELINE = "bf16"
MAX_REL_ERR = 2e-2
WARMUP = 10
SLEEP_CYCLES = 1_000_000  # ~0.5 ms at H200 clocks: longer than the host takes to queue any candidate
FLUSH_BYTES = 256 * 2**20  # well over the 50 MB L2 of an H100/H200


@dataclass(frozen=True)
class Weight:
    """One projection's FP8 weight, in every form the candidates take."""

    q: torch.Tensor  # [N, K] float8_e4m3fn
    scale: torch.Tensor  # [N/128, K/128] float32, w = q * scale
    # the scales as cuBLAS's 128 x 128 recipe reads them: [K/128 rounded up to 4, N/128], each
    # column's K blocks contiguous and padded to 16 bytes
    cublas_scale: torch.Tensor
    bf16: torch.Tensor  # the dequantised weight in bf16
    dequantized: torch.Tensor  # the dequantised weight in float32


def make_weight(n: int, k: int, dev: torch.device) -> Weight:
    q, scale = quantize_blocks(torch.randn(n, k, device=dev) / k**0.5, BLOCK)
    dequantized = dequantize_blocks(q, scale, BLOCK)
    cublas_scale = F.pad(scale, (0, -scale.shape[1] % 4)).t()
    return Weight(q, scale, cublas_scale, dequantized.to(torch.bfloat16), dequantized)


def quantize_rows(x: torch.Tensor, m_align: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] bf16, K a multiple of 128 -> (float8_e4m3fn [M, K], float32 scales [K/128, M
    rounded up to m_align]): quantize_groups' maths, with the scales stored M-major (the layout
    cuBLAS and DeepGEMM read)."""
    m, k = x.shape
    parts = x.view(m, k // GROUP, GROUP).float()
    scale = (parts.abs().amax(dim=-1) / FP8_MAX).clamp(min=1e-12)
    q = (parts / scale[..., None]).to(FP8).view(m, k)
    return q, F.pad(scale.t(), (0, -m % m_align)).contiguous()


_said: set[str] = set()


def say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        print(message, flush=True)


def m_major(x_scale: torch.Tensor) -> torch.Tensor:
    """Contiguous scales [K/128, M] as the [M, K/128] tensor cuBLAS takes, with stride 1 along M
    even where M is 1 (F.scaled_mm checks it; a transpose of a one-column tensor need not have it)."""
    assert x_scale.is_contiguous()
    groups, m = x_scale.shape
    return x_scale.as_strided((m, groups), (1, m))


def scaled_mm_v2(xq: torch.Tensor, x_scale: torch.Tensor, w: Weight) -> torch.Tensor:
    """F.scaled_mm (newer torch), the recipes named."""
    return F.scaled_mm(
        xq,
        w.q.t(),
        m_major(x_scale),
        F.ScalingType.BlockWise1x128,
        w.cublas_scale,
        F.ScalingType.BlockWise128x128,
        output_dtype=torch.bfloat16,
    )


def scaled_mm_v1(xq: torch.Tensor, x_scale: torch.Tensor, w: Weight) -> torch.Tensor:
    """torch._scaled_mm, which infers the recipes from the scales' shapes and strides (the
    weight's [K/128, N/128] with unpadded columns)."""
    return torch._scaled_mm(xq, w.q.t(), scale_a=m_major(x_scale), scale_b=w.scale.t(), out_dtype=torch.bfloat16)


def pick_scaled_mm(xq: torch.Tensor, x_scale: torch.Tensor, w: Weight) -> Callable:
    """The first torch entry point that runs these operands."""
    errors = []
    for scaled_mm in (scaled_mm_v2, scaled_mm_v1):
        try:
            scaled_mm(xq, x_scale, w)
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 -- try the other entry point, then report both
            errors.append(f"{scaled_mm.__name__}: {type(e).__name__}: {one_line(e)}")
            continue
        for error in errors:
            say_once(f"  torch: {error}; {scaled_mm.__name__} instead")
        return scaled_mm
    raise RuntimeError(" | ".join(errors))


def build_bf16(x: torch.Tensor, w: Weight) -> Callable[[], torch.Tensor]:
    return lambda: F.linear(x, w.bf16)


def build_linear(x: torch.Tensor, w: Weight) -> Callable[[], torch.Tensor]:
    return lambda: linear(x, w.q, scale=w.scale, block=BLOCK, backend="triton")


def build_triton(x: torch.Tensor, w: Weight) -> Callable[[], torch.Tensor]:
    from raymoe.actors.models.fp8_linear_triton import fp8_linear

    return lambda: fp8_linear(x, w.q, w.scale, block=BLOCK)


def build_cublas(x: torch.Tensor, w: Weight) -> Callable[[], torch.Tensor]:
    from raymoe.actors.models.fp8_scaled_mm import fp8_scaled_mm

    return lambda: fp8_scaled_mm(x, w.q, w.scale, block=BLOCK, bias=None)


def build_torch(x: torch.Tensor, w: Weight) -> Callable[[], torch.Tensor]:
    xq, x_scale = quantize_rows(x, 1)
    scaled_mm = pick_scaled_mm(xq, x_scale, w)
    return lambda: scaled_mm(xq, x_scale, w)


def build_fi_sm90_quant(x: torch.Tensor, w: Weight) -> Callable[[], torch.Tensor]:
    from flashinfer.gemm import fp8_blockscale_gemm_sm90  # optional: GPU hosts only

    say_once("  fi_sm90: FlashInfer builds its sm90 module on first use (JIT, can take minutes)")
    return lambda: fp8_blockscale_gemm_sm90(x, w.q, None, w.scale)


def build_fi_sm90(x: torch.Tensor, w: Weight) -> Callable[[], torch.Tensor]:
    from flashinfer.gemm import fp8_blockscale_gemm_sm90  # optional: GPU hosts only

    # its kernels read the activation scales M-major with M padded to 4 (16-byte TMA rows),
    # whatever the docstring's [M, K/128] suggests
    xq, x_scale = quantize_rows(x, 4)
    return lambda: fp8_blockscale_gemm_sm90(xq, w.q, x_scale, w.scale)


def build_fi_groupwise(x: torch.Tensor, w: Weight) -> Callable[[], torch.Tensor]:
    from flashinfer.gemm import gemm_fp8_nt_groupwise  # optional: GPU hosts only

    xq, x_scale = quantize_rows(x, 1)
    # scale_major_mode "K": both scales row-major (the docstring says column-major for a_scale)
    a_scale = x_scale.t().contiguous()
    return lambda: gemm_fp8_nt_groupwise(xq, w.q, a_scale, w.scale, scale_major_mode="K", out_dtype=torch.bfloat16)


@dataclass(frozen=True)
class Candidate:
    name: str
    build: Callable[[torch.Tensor, Weight], Callable[[], torch.Tensor]]
    from_bf16: bool  # takes bf16 x: any quantisation of x is inside its time


CANDIDATES = [
    Candidate(BASELINE, build_bf16, from_bf16=True),
    Candidate("linear", build_linear, from_bf16=True),
    Candidate("triton", build_triton, from_bf16=True),
    Candidate("cublas", build_cublas, from_bf16=True),
    Candidate("torch", build_torch, from_bf16=False),
    Candidate("fi_sm90+quant", build_fi_sm90_quant, from_bf16=True),
    Candidate("fi_sm90", build_fi_sm90, from_bf16=False),
    Candidate("fi_groupwise", build_fi_groupwise, from_bf16=False),
]


def one_line(e: Exception) -> str:
    """The message on one line; a long one keeps its start and its end (torch's says what it got last)."""
    text = " ".join(str(e).split())
    return text if len(text) <= 400 else f"{text[:150]} ... {text[-250:]}"


def device_us(fn: Callable[[], torch.Tensor], iters: int, flush: torch.Tensor | None) -> float:
    """Median microseconds the GPU spends in one call of fn."""
    for _ in range(WARMUP):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends):
        if flush is not None:
            flush.zero_()
        torch.cuda._sleep(SLEEP_CYCLES)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median([start.elapsed_time(end) for start, end in zip(starts, ends)]) * 1e3


def relative_error(y: torch.Tensor, want: torch.Tensor) -> float:
    return ((y.float() - want).norm() / want.norm()).item()


def references(x: torch.Tensor, w: Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """(what an FP8 candidate should give: x quantised per 1 x 128 group times the dequantised
    weight; what bf16 should give: x times the bf16 weight), in float32."""
    xq, x_scale = quantize_groups(x, GROUP)
    x_dequantized = xq.float() * x_scale.repeat_interleave(GROUP, dim=1)[:, : x.shape[1]]
    return x_dequantized @ w.dequantized.t(), x.float() @ w.bf16.float().t()


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=100, help="timed calls per candidate, shape and M")
    p.add_argument(
        "--shapes", default=",".join(SHAPES), help=f"comma-separated names ({', '.join(SHAPES)}) or NxK entries"
    )
    p.add_argument("--rows", default=ROWS, help="comma-separated M values")
    p.add_argument("--candidates", default=",".join(c.name for c in CANDIDATES), help="comma-separated names")
    p.add_argument("--no-flush", action="store_true", help="leave L2 warm between calls")
    p.add_argument("--out", help="append the tables to this file (markdown)")
    p.add_argument("--sweep", action="store_true", help="time the Triton GEMM's configs instead")
    p.add_argument("--best-json", help="with --sweep: write {rows, config, us, cublas_us} per M here")
    return p.parse_args()


def parse_shapes(spec: str) -> list[tuple[str, int, int]]:
    shapes = []
    for item in spec.split(","):
        if item in SHAPES:
            shapes.append((item, *SHAPES[item]))
        else:
            n, k = item.split("x")
            shapes.append((item, int(n), int(k)))
    return shapes


def pick_candidates(spec: str) -> list[Candidate]:
    names = spec.split(",")
    unknown = set(names) - {c.name for c in CANDIDATES}
    if unknown:
        sys.exit(f"unknown candidates {sorted(unknown)}; known: {[c.name for c in CANDIDATES]}")
    return [c for c in CANDIDATES if c.name in names]


def run_all(args: argparse.Namespace, candidates: list[Candidate], dev: torch.device) -> dict:
    """(shape name, N, K, M) -> {candidate name: (us, relative error)} for what ran."""
    flush = None if args.no_flush else torch.empty(FLUSH_BYTES, dtype=torch.int8, device=dev)
    results = {}
    for name, n, k in parse_shapes(args.shapes):
        w = make_weight(n, k, dev)
        for m in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            want_fp8, want_bf16 = references(x, w)
            row = results[(name, n, k, m)] = {}
            for c in candidates:
                try:
                    fn = c.build(x, w)
                    y = fn()
                    torch.cuda.synchronize()
                    err = relative_error(y, want_bf16 if c.name == BASELINE else want_fp8)
                    us = device_us(fn, args.iters, flush)
                except Exception as e:  # noqa: BLE001 -- report the candidate and go on
                    say_once(f"  {c.name} not run: {type(e).__name__}: {one_line(e)}")
                    continue
                row[c.name] = (us, err)
                flag = " !" if err > MAX_REL_ERR else ""
                print(f"{name} {n}x{k} M={m} {c.name}: {us:.1f} us, error {err:.1e}{flag}", flush=True)
    return results


def fastest(row: dict, names: list[str]) -> str:
    correct = [(row[c][0], c) for c in names if c in row and row[c][1] <= MAX_REL_ERR]
    if not correct:
        return "- | -"
    us, name = min(correct)
    return f"{name} | {us:.1f}"


def tables(results: dict, candidates: list[Candidate]) -> str:
    ran = [c for c in candidates if any(c.name in row for row in results.values())]
    names = [c.name for c in ran]
    times = [
        "| shape | N x K | M | " + " | ".join(f"{c} us" for c in names) + " |",
        "|---|---|---:|" + "---:|" * len(names),
    ]
    errors = ["| shape | M | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    best = [
        "| shape | M | fastest from bf16 x | us | fastest FP8 GEMM alone | us |",
        "|---|---:|---|---:|---|---:|",
    ]
    from_bf16 = [c.name for c in ran if c.from_bf16]
    gemm_alone = [c.name for c in ran if not c.from_bf16]
    for (name, n, k, m), row in results.items():
        base = row.get(BASELINE, (None, None))[0]
        cells, errs = [], []
        for c in names:
            if c not in row:
                cells.append("-")
                errs.append("-")
                continue
            us, err = row[c]
            flag = " !" if err > MAX_REL_ERR else ""
            ratio = f" ({us / base:.2f}x)" if base and c != BASELINE else ""
            cells.append(f"{us:.1f}{ratio}{flag}")
            errs.append(f"{err:.1e}{flag}")
        times.append(f"| {name} | {n} x {k} | {m} | " + " | ".join(cells) + " |")
        errors.append(f"| {name} | {m} | " + " | ".join(errs) + " |")
        best.append(f"| {name} | {m} | {fastest(row, from_bf16)} | {fastest(row, gemm_alone)} |")
    return "\n".join(
        [
            f"Microseconds per call (in brackets: the time over bf16's; ! = relative error over {MAX_REL_ERR:g}):",
            "",
            *times,
            "",
            "Relative error against the reference:",
            "",
            *errors,
            "",
            "Fastest per shape and M (correct results only):",
            "",
            *best,
        ]
    )


def header(args: argparse.Namespace) -> str:
    try:
        flashinfer = importlib.metadata.version("flashinfer-python")
    except importlib.metadata.PackageNotFoundError:
        flashinfer = "not installed"
    return (
        f"`python benchmarks/fp8_gemm_bench.py {' '.join(sys.argv[1:])}`: {torch.cuda.get_device_name()}, "
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), FlashInfer {flashinfer}, "
        f"{datetime.date.today()}, {args.iters} calls each, L2 {'warm' if args.no_flush else 'flushed'}"
    )


def sweep_configs(m: int):
    bm = max(16, min(64, 1 << (m - 1).bit_length()))
    for bn, stages, pre, split in itertools.product((16, 32, 64, 128), (3, 4), (False, True), (1, 2, 4, 8)):
        yield dict(BM=bm, BN=bn, num_warps=4, num_stages=stages, PRE_QUANTIZE=pre, SPLIT_K=split)


def sweep(args: argparse.Namespace, dev: torch.device) -> None:
    """Each M's Triton configs by their time summed over the shapes, against cuBLAS's sum."""
    from raymoe.actors.models.fp8_linear_triton import fp8_linear, pick_config

    flush = None if args.no_flush else torch.empty(FLUSH_BYTES, dtype=torch.int8, device=dev)
    weights = [(name, make_weight(n, k, dev)) for name, n, k in parse_shapes(args.shapes)]
    for m in [int(r) for r in args.rows.split(",")]:
        xs = [torch.randn(m, w.q.shape[1], device=dev, dtype=torch.bfloat16) for _, w in weights]
        cublas = sum(device_us(build_cublas(x, w), args.iters, flush) for x, (_, w) in zip(xs, weights))
        timed = []
        for config in sweep_configs(m):
            try:
                total = 0.0
                for x, (_, w) in zip(xs, weights):
                    fn = lambda x=x, w=w: fp8_linear(x, w.q, w.scale, block=BLOCK, config=config)  # noqa: E731
                    if relative_error(fn(), references(x, w)[0]) > MAX_REL_ERR:
                        raise ValueError("wrong result")
                    total += device_us(fn, args.iters, flush)
            except Exception as e:  # noqa: BLE001 -- a config that does not launch
                say_once(f"  config not run: {type(e).__name__}: {one_line(e)}")
                torch.cuda.synchronize()
                continue
            timed.append((total, config))
        timed.sort(key=lambda tc: tc[0])
        now = next((t for t, c in timed if c == dict(pick_config(m))), None)
        print(f"M={m}: cuBLAS {cublas:.1f} us summed over {args.shapes}; the current config {now}", flush=True)
        for t, c in timed[:6]:
            print(f"  {t:.1f} us {c}", flush=True)
        if args.best_json and timed:
            with open(args.best_json, "a") as f:
                f.write(json.dumps(dict(rows=m, us=timed[0][0], config=timed[0][1], cublas_us=cublas)) + "\n")


def main() -> None:
    args = parse()
    if not torch.cuda.is_available():
        sys.exit("fp8_gemm_bench.py needs a CUDA GPU; torch sees none")
    if args.sweep:
        sweep(args, torch.device("cuda"))
        return
    candidates = pick_candidates(args.candidates)
    print(header(args), flush=True)
    report = header(args) + "\n\n" + tables(run_all(args, candidates, torch.device("cuda")), candidates)
    print("\n" + report)
    if args.out:
        with open(args.out, "a") as f:
            f.write(report + "\n\n")


if __name__ == "__main__":
    main()
