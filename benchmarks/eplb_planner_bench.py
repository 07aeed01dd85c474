"""EPLB planner benchmark: raymoe's planner against DeepSeek's published EPLB algorithm.

On the same skewed load matrices ([layers, experts] token counts: per layer a Zipf
distribution over a shuffled hot set, sampled as a multinomial) both plan expert slots
from the default one (slot p holds expert p mod E), then plan again on a second
window whose routing drifted a little (each expert's probability times
exp(N(0, drift)), resampled). Reported, measured the same way for both planners with
raymoe.cluster.eplb_metrics:
  balancedness  sum_layers mean(rank load) / sum_layers max(rank load), rank load = sum
                over a rank's slots of load[expert] / replicas[expert];
  moved         slots whose logical expert changes against the expert slots in force, times
                --bytes-per-expert (default: one DeepSeek-V3 expert in FP8, 3*7168*2048 B);
  time          wall seconds of one plan (58 layers).
DeepSeek's hierarchical mode gets num_groups = experts (each expert its own group: the
most freedom its node packing can have); nodes = 1 runs its global mode.

The reference is not vendored: it is read at run time from the sglang wheel on PyPI
(sglang/srt/eplb/eplb_algorithms/deepseek.py, a copy of deepseek-ai/EPLB's eplb.py),
downloaded with `pip download --no-deps` into .cache/eplb_reference/ (git-ignored);
only the one file is kept. No reference -> the benchmark says why and exits 1.

    python benchmarks/eplb_planner_bench.py
    python benchmarks/eplb_planner_bench.py --eps 32,64 --exponents 1.0 --layers 8

The per-configuration markdown table is the last thing printed.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import inspect
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from raymoe.cluster.eplb_metrics import balancedness, moved_slots, rank_loads
from raymoe.cluster.eplb_planner import plan_expert_slots
from raymoe.cluster.expert_slots import default_expert_slots

REF_REQUIREMENT = "sglang==0.5.23"
REF_MEMBER = "sglang/srt/eplb/eplb_algorithms/deepseek.py"
REF_ALLOWED_IMPORTS = {"__future__", "typing", "torch"}
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "eplb_reference"
DEEPSEEK_V3_EXPERT_BYTES = 3 * 7168 * 2048  # gate, up, down projections in FP8


# ---- the reference ------------------------------------------------------------------------


def load_reference(cache: Path, wheel: Path | None):
    """DeepSeek's EPLB module, read from the sglang wheel (downloaded once into cache)."""
    source_file = cache / "deepseek_eplb.py"
    if not source_file.exists():
        cache.mkdir(parents=True, exist_ok=True)
        downloaded = wheel is None
        if downloaded:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(cache)]
            done = subprocess.run([*cmd, REF_REQUIREMENT], capture_output=True, text=True)
            wheels = sorted(cache.glob("sglang-*.whl"))
            if done.returncode or not wheels:
                raise RuntimeError(
                    f"pip download {REF_REQUIREMENT} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
                )
            wheel = wheels[-1]
        with zipfile.ZipFile(wheel) as archive:
            source = archive.read(REF_MEMBER).decode()
        imported = {n.split(".")[0] for node in ast.walk(ast.parse(source)) for n in _import_names(node)}
        if not imported <= REF_ALLOWED_IMPORTS:
            raise RuntimeError(f"{REF_MEMBER} in {wheel.name} imports {sorted(imported - REF_ALLOWED_IMPORTS)}")
        source_file.write_text(source)
        if downloaded:
            wheel.unlink()
    spec = importlib.util.spec_from_file_location("deepseek_eplb_reference", source_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _import_names(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        return [node.module or ""]
    return []


def deepseek_plan(ref, load: torch.Tensor, physical: int, ep: int, nodes: int) -> torch.Tensor:
    """phy2log [layers, P] from DeepSeek's rebalance_experts (hierarchical when nodes > 1)."""
    kwargs = {}
    if "enable_hierarchical" in inspect.signature(ref.rebalance_experts).parameters:
        kwargs["enable_hierarchical"] = nodes > 1
    phy2log, _, _ = ref.rebalance_experts(load, physical, load.shape[1], nodes, ep, **kwargs)
    return phy2log.to(torch.int64)


# ---- loads --------------------------------------------------------------------------------


def zipf_windows(rng, layers: int, experts: int, exponent: float, tokens: int, drift: float):
    """Two windows of token counts [layers, experts] (float64): the second with drifted routing."""
    first, second = [], []
    for _ in range(layers):
        p = 1.0 / np.arange(1, experts + 1) ** exponent
        p = p[rng.permutation(experts)]
        p /= p.sum()
        q = p * np.exp(rng.normal(0.0, drift, experts))
        first.append(rng.multinomial(tokens, p))
        second.append(rng.multinomial(tokens, q / q.sum()))
    return torch.tensor(np.array(first), dtype=torch.float64), torch.tensor(np.array(second), dtype=torch.float64)


# ---- one configuration --------------------------------------------------------------------


def measure(load: torch.Tensor, before: torch.Tensor, after: torch.Tensor, ep: int) -> tuple[float, int]:
    return balancedness(rank_loads(load, after, ep)), int(moved_slots(before, after).sum())


def run_config(ref, args, ep: int, nodes: int, exponent: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    physical = args.experts + (ep if args.redundant is None else args.redundant)
    w1, w2 = zipf_windows(rng, args.layers, args.experts, exponent, args.tokens, args.drift)
    current = default_expert_slots(args.layers, args.experts, physical)
    row = {"ep": ep, "nodes": nodes, "s": exponent, "P": physical, "slots": args.layers * physical}
    row["cur1"] = balancedness(rank_loads(w1, current, ep))

    t = time.perf_counter()
    ds1 = deepseek_plan(ref, w1, physical, ep, nodes)
    row["ds_time"] = time.perf_counter() - t
    ds2 = deepseek_plan(ref, w2, physical, ep, nodes)
    row["ds1"], row["ds1_moved"] = measure(w1, current, ds1, ep)
    row["ds2"], row["ds2_moved"] = measure(w2, ds1, ds2, ep)
    row["ds2_cur"] = balancedness(rank_loads(w2, ds1, ep))

    bpe = args.bytes_per_expert
    t = time.perf_counter()
    rm1 = plan_expert_slots(w1, current, ep, nodes=nodes, bytes_per_expert=bpe, tolerance=args.tolerance)
    row["rm_time"] = time.perf_counter() - t
    rm2 = plan_expert_slots(
        w2, rm1.physical_to_logical, ep, nodes=nodes, bytes_per_expert=bpe, tolerance=args.tolerance
    )
    lax = plan_expert_slots(
        w2, rm1.physical_to_logical, ep, nodes=nodes, bytes_per_expert=bpe, tolerance=args.lax_tolerance
    )
    row["rm1"], row["rm1_moved"] = measure(w1, current, rm1.physical_to_logical, ep)
    row["rm2"], row["rm2_moved"] = measure(w2, rm1.physical_to_logical, rm2.physical_to_logical, ep)
    row["lax2"], row["lax2_moved"] = measure(w2, rm1.physical_to_logical, lax.physical_to_logical, ep)
    row["rm2_cur"] = balancedness(rank_loads(w2, rm1.physical_to_logical, ep))
    assert rm1.moved_slots == row["rm1_moved"] and abs(rm1.balancedness_after - row["rm1"]) < 1e-9
    return row


# ---- report -------------------------------------------------------------------------------


def gib(slots: int, args) -> str:
    return f"{slots * args.bytes_per_expert / 2**30:.1f}"


def moved(slots: int, total: int, args) -> str:
    return f"{gib(slots, args)} ({100 * slots / total:.0f}%)"


def detail_table(rows: list[dict], args) -> str:
    lax = f"τ={args.lax_tolerance:g}"
    head = (
        "| ep | nodes | zipf s | P | w1 current | w1 DeepSeek | w1 raymoe | w1 moved GiB DeepSeek "
        f"| w1 moved GiB raymoe | w2 start DeepSeek / raymoe | w2 DeepSeek | w2 raymoe | w2 raymoe {lax} "
        "| w2 moved GiB DeepSeek | w2 moved GiB raymoe "
        f"| w2 moved GiB raymoe {lax} | plan s DeepSeek | plan s raymoe |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        n = r["slots"]
        lines.append(
            f"| {r['ep']} | {r['nodes']} | {r['s']:g} | {r['P']} | {r['cur1']:.4f} | {r['ds1']:.4f} | {r['rm1']:.4f} "
            f"| {moved(r['ds1_moved'], n, args)} | {moved(r['rm1_moved'], n, args)} "
            f"| {r['ds2_cur']:.4f} / {r['rm2_cur']:.4f} | {r['ds2']:.4f} | {r['rm2']:.4f} | {r['lax2']:.4f} "
            f"| {moved(r['ds2_moved'], n, args)} | {moved(r['rm2_moved'], n, args)} "
            f"| {moved(r['lax2_moved'], n, args)} "
            f"| {r['ds_time']:.2f} | {r['rm_time']:.2f} |"
        )
    return "\n".join(lines)


def summary(rows: list[dict]) -> tuple[str, bool]:
    bal_ok = sum(r["rm1"] >= r["ds1"] - 1e-12 and r["rm2"] >= r["ds2"] - 1e-12 for r in rows)
    moved_ok = sum(r["rm1_moved"] < r["ds1_moved"] and r["rm2_moved"] < r["ds2_moved"] for r in rows)
    return (
        f"raymoe balancedness >= DeepSeek's in both windows: {bal_ok}/{len(rows)} configurations; "
        f"fewer bytes moved in both windows: {moved_ok}/{len(rows)}"
    ), bal_ok == moved_ok == len(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    floats = lambda text: [float(x) for x in text.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=58)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--eps", type=ints, default=[32, 64, 128, 256], help="EP sizes, comma separated")
    p.add_argument("--redundant", type=int, default=None, help="redundant slots (default: = ep)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="hierarchical runs use nodes = ep / this")
    p.add_argument("--exponents", type=floats, default=[0.6, 1.0, 1.4], help="Zipf exponents")
    p.add_argument("--tokens", type=int, default=1_000_000, help="routed tokens per layer per window")
    p.add_argument("--drift", type=float, default=0.05, help="second window: sigma of log-normal drift")
    p.add_argument("--tolerance", type=float, default=0.0, help="raymoe planner tolerance")
    p.add_argument("--lax-tolerance", type=float, default=0.01, help="extra raymoe column, second window")
    p.add_argument("--bytes-per-expert", type=int, default=DEEPSEEK_V3_EXPERT_BYTES)
    p.add_argument("--reference-wheel", type=Path, default=None, help="local sglang wheel instead of PyPI")
    p.add_argument("--check", action="store_true", help="exit 2 unless raymoe meets the target everywhere")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        ref = load_reference(CACHE, args.reference_wheel)
    except Exception as exc:  # any failure to obtain the reference ends the run
        print(f"cannot load DeepSeek's EPLB reference from {REF_REQUIREMENT}: {exc}", file=sys.stderr)
        return 1
    rows, started = [], time.perf_counter()
    for ep in args.eps:
        for nodes in sorted({1, max(1, ep // args.gpus_per_node)}):
            for i, exponent in enumerate(args.exponents):
                row = run_config(ref, args, ep, nodes, exponent, args.seed + 1000 * ep + 10 * nodes + i)
                rows.append(row)
                print(
                    f"ep={ep} nodes={nodes} s={exponent:g}: balancedness current {row['cur1']:.4f} "
                    f"DeepSeek {row['ds1']:.4f} raymoe {row['rm1']:.4f}; moved slots DeepSeek {row['ds1_moved']} "
                    f"raymoe {row['rm1_moved']}; 2nd window DeepSeek {row['ds2_moved']} raymoe {row['rm2_moved']}",
                    flush=True,
                )
    verdict, met = summary(rows)
    print()
    print(f"command: python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(
        f"{args.layers} layers x {args.experts} experts, {args.tokens} routed tokens per layer per window, "
        f"drift {args.drift:g}, raymoe tolerance {args.tolerance:g}, {args.bytes_per_expert} B per expert; "
        f"torch {torch.__version__}, reference {REF_REQUIREMENT}; total {time.perf_counter() - started:.0f} s"
    )
    print(verdict)
    print()
    print(detail_table(rows, args))
    return 2 if args.check and not met else 0


if __name__ == "__main__":
    sys.exit(main())
