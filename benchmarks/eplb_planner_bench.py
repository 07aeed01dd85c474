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

--rebalances instead runs the planners the way the controller does, on model shapes
(DeepSeek-V3: 58 layers x 256 experts in 8 expert groups, 32/64/256 GPUs; a
Qwen3-30B-A3B-shaped model: 48 x 128, no expert groups, 8/16 GPUs; 8 GPUs per node,
redundant slots = GPUs) over five windows, each rebalance starting from the slots the
previous one left. Steady load: every window drawn from the same popularity (Zipf, per
layer its own exponent in [0.6, 1.4] and shuffled hot set); drifting: before each window
after the first, 16 of every layer's 32 most popular experts trade popularity with a
random other expert. raymoe plans with plan_with_policy (--policy, default auto, and
--min-improvement, default 0.005: the engine's defaults); DeepSeek in the mode its
rebalance_experts picks itself: hierarchical when num_groups % nodes == 0, else global,
with num_groups = the model's expert groups (n_group = 8 for DeepSeek-V3; 1 for a model
without groups). Reported: the mode auto picks and its balancedness next to DeepSeek's
(first rebalance, steady load), and the bytes each moves on the second and fifth
rebalance, with the copies whose source sits on another node than its destination
(raymoe's move lists from plan_layer_moves with and without ranks_per_node); and, per
rebalance, each plan's balancedness on the window after the one it was planned on (the
window the new slots serve; steady: drawn from the same popularity), for raymoe, for
raymoe's own series with min_improvement 0 (every gain moves) and for DeepSeek. The
steady-state target: rebalances after the first move <= 5 % of slots and lose <= 0.005
next-window balancedness against min_improvement 0.

    python benchmarks/eplb_planner_bench.py --rebalances
    python benchmarks/eplb_planner_bench.py --rebalances --gpus 64,256 --loads steady --windows 3
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib.util
import inspect
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from raymoe.cluster.eplb_metrics import balancedness, moved_slots, rank_loads
from raymoe.cluster.eplb_planner import plan_expert_slots, plan_with_policy
from raymoe.cluster.expert_moves import cross_node_copies, plan_layer_moves
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


def deepseek_plan(ref, load: torch.Tensor, physical: int, ep: int, nodes: int, *, num_groups: int = 0) -> torch.Tensor:
    """phy2log [layers, P] from DeepSeek's rebalance_experts: hierarchical when nodes > 1,
    with num_groups expert groups (0: each expert its own group)."""
    kwargs = {}
    if "enable_hierarchical" in inspect.signature(ref.rebalance_experts).parameters:
        kwargs["enable_hierarchical"] = nodes > 1
    groups = num_groups if nodes > 1 and num_groups else load.shape[1]
    phy2log, _, _ = ref.rebalance_experts(load, physical, groups, nodes, ep, **kwargs)
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


# ---- rebalances on model shapes (--rebalances) --------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int  # MoE layers
    experts: int
    num_groups: int  # expert groups in the model config (1: none)
    expert_bytes: int
    gpus: tuple[int, ...]


MODEL_SHAPES = (
    ModelShape("DeepSeek-V3", 58, 256, 8, DEEPSEEK_V3_EXPERT_BYTES, (32, 64, 256)),
    ModelShape("Qwen3-30B-A3B", 48, 128, 1, 3 * 2048 * 768 * 2, (8, 16)),  # BF16 experts
)


def popularity(rng, layers: int, experts: int) -> np.ndarray:
    """[layers, experts]: Zipf with a per-layer exponent in [0.6, 1.4] over a shuffled hot set."""
    ranks = np.arange(1, experts + 1)
    return np.array([rng.permutation(1.0 / ranks ** rng.uniform(0.6, 1.4)) for _ in range(layers)])


def shift_hot_set(rng, weights: np.ndarray, *, hot: int = 32, shifted: int = 16) -> np.ndarray:
    """Per layer, ``shifted`` of the ``hot`` most popular experts trade popularity with others."""
    out = weights.copy()
    for row in out:
        top = np.argsort(row)[::-1][:hot]
        movers = rng.choice(top, shifted, replace=False)
        others = rng.choice(np.setdiff1d(np.arange(row.size), top), shifted, replace=False)
        row[movers], row[others] = row[others], row[movers].copy()
    return out


def sample(rng, weights: np.ndarray, tokens: int) -> torch.Tensor:
    return torch.tensor(np.stack([rng.multinomial(tokens, w / w.sum()) for w in weights]), dtype=torch.float64)


def deepseek_nodes(num_groups: int, nodes: int) -> int:
    """The nodes DeepSeek's rebalance_experts packs over: all of them (hierarchical) when
    num_groups % nodes == 0, else 1 (global; one node is the same packing either way)."""
    return nodes if num_groups % nodes == 0 else 1


def cross_node(old: torch.Tensor, new: torch.Tensor, ep: int, ranks_per_node: int, *, node_aware: bool) -> int:
    """Copies from another node in the move lists turning old [layers, P] into new."""
    per_rank, total = old.shape[1] // ep, 0
    for before, after in zip(old.tolist(), new.tolist()):
        if before != after:
            moves = plan_layer_moves(before, after, ep, ranks_per_node=ranks_per_node if node_aware else None)
            total += cross_node_copies(moves, slots_per_rank=per_rank, ranks_per_node=ranks_per_node)
    return total


def rebalance_series(ref, args, shape: ModelShape, gpus: int, *, drifting: bool, seed: int) -> list[dict]:
    """One row per rebalance (windows 1..args.windows), each planned from the slots in force."""
    nodes = max(1, gpus // args.gpus_per_node)
    physical = shape.experts + gpus
    ds_nodes = deepseek_nodes(shape.num_groups, nodes)
    rng = np.random.default_rng(seed)
    weights = popularity(rng, shape.layers, shape.experts)
    loads = []
    for window in range(1, args.windows + 2):  # the last window only serves the last plan
        if drifting and window > 1:
            weights = shift_hot_set(rng, weights)
        loads.append(sample(rng, weights, args.window_tokens))
    raymoe = functools.partial(
        plan_with_policy,
        policy=args.policy,
        nodes=nodes if shape.experts % nodes == 0 else 1,
        bytes_per_expert=shape.expert_bytes,
    )
    rm_slots = exact_slots = ds_slots = default_expert_slots(shape.layers, shape.experts, physical)
    rows = []
    for window, (load, next_load) in enumerate(zip(loads, loads[1:]), start=1):
        t = time.perf_counter()
        plan = raymoe(load, rm_slots, gpus, min_improvement=args.min_improvement)
        rm_time, t = time.perf_counter() - t, time.perf_counter()
        ds = deepseek_plan(ref, load, physical, gpus, ds_nodes, num_groups=shape.num_groups)
        row = {"window": window, "rm_time": rm_time, "ds_time": time.perf_counter() - t}
        row.update(mode=plan.mode, hier_layers=plan.hierarchical_layers, rm_bal=plan.balancedness_after)
        row.update(rm_moved=plan.moved_slots, ds_bal=balancedness(rank_loads(load, ds, gpus)))
        row.update(ds_moved=int(moved_slots(ds_slots, ds).sum()), total_slots=shape.layers * physical)
        exact = raymoe(load, exact_slots, gpus)  # a series of its own: every gain counts
        row.update(exact_mode=exact.mode, exact_hier_layers=exact.hierarchical_layers)
        row.update(exact_bal=exact.balancedness_after, exact_moved=exact.moved_slots)
        rm_next, exact_next, ds_next = (
            balancedness(rank_loads(next_load, slots, gpus))
            for slots in (plan.physical_to_logical, exact.physical_to_logical, ds)
        )
        row.update(rm_next=rm_next, exact_next=exact_next, ds_next=ds_next)
        if window == 1 and ds_nodes > 1:  # DeepSeek's other mode: global
            row["ds_global_bal"] = balancedness(rank_loads(load, deepseek_plan(ref, load, physical, gpus, 1), gpus))
        if window in args.report_at and nodes > 1:
            new = plan.physical_to_logical
            row["rm_cross"] = cross_node(rm_slots, new, gpus, args.gpus_per_node, node_aware=True)
            row["rm_cross_blind"] = cross_node(rm_slots, new, gpus, args.gpus_per_node, node_aware=False)
            row["ds_cross"] = cross_node(ds_slots, ds, gpus, args.gpus_per_node, node_aware=True)
        rows.append(row)
        rm_slots, exact_slots, ds_slots = plan.physical_to_logical, exact.physical_to_logical, ds
    return rows


def mode_table(results: list[tuple[ModelShape, int, str, list[dict]]], args) -> str:
    head = (
        f"| model | GPUs | nodes | raymoe {args.policy}: mode | raymoe balancedness | with min_improvement 0 "
        "| DeepSeek: mode | DeepSeek balancedness | DeepSeek global |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for shape, gpus, load, rows in results:
        if load != "steady":
            continue
        r, nodes = rows[0], max(1, gpus // args.gpus_per_node)
        if nodes == 1:
            ds_mode = "global (1 node)"
        else:
            divides = shape.num_groups % nodes == 0
            ds_mode = (
                f"{'hierarchical' if divides else 'global'} ({shape.num_groups} % {nodes} {'=' if divides else '!='} 0)"
            )
        other = f"{r['ds_global_bal']:.4f}" if "ds_global_bal" in r else "="
        lines.append(
            f"| {shape.name} | {gpus} | {nodes} | {_mode(r['mode'], r['hier_layers'], shape)} | {r['rm_bal']:.4f} "
            f"| {r['exact_bal']:.4f}, {_mode(r['exact_mode'], r['exact_hier_layers'], shape)} | {ds_mode} "
            f"| {r['ds_bal']:.4f} | {other} |"
        )
    return "\n".join(lines)


def _mode(mode: str, hierarchical_layers: int, shape: ModelShape) -> str:
    return f"mixed ({hierarchical_layers}/{shape.layers} hierarchical)" if mode == "mixed" else mode


def moves_table(results: list[tuple[ModelShape, int, str, list[dict]]], args) -> str:
    head = (
        "| model | GPUs | load | rebalance | raymoe moved GiB (slots) | DeepSeek moved GiB (slots) "
        "| raymoe balancedness | DeepSeek balancedness | cross-node copies raymoe node-aware / blind | DeepSeek |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for shape, gpus, load, rows in results:
        for r in rows:
            if r["window"] not in args.report_at:
                continue
            moved = [
                f"{n * shape.expert_bytes / 2**30:.1f} ({100 * n / r['total_slots']:.1f}%)"
                for n in (r["rm_moved"], r["ds_moved"])
            ]
            cross = (f"{r['rm_cross']} / {r['rm_cross_blind']}", str(r["ds_cross"])) if "rm_cross" in r else ("-", "-")
            lines.append(
                f"| {shape.name} | {gpus} | {load} | {r['window']} | {moved[0]} | {moved[1]} "
                f"| {r['rm_bal']:.4f} | {r['ds_bal']:.4f} | {cross[0]} | {cross[1]} |"
            )
    return "\n".join(lines)


def next_window_table(results: list[tuple[ModelShape, int, str, list[dict]]], args) -> str:
    """Slots moved and the balancedness each plan gets on the window after the one it was
    planned on, for raymoe's series with --min-improvement and with 0, and DeepSeek's."""
    head = (
        f"| model | GPUs | load | rebalance | raymoe moved slots: min_improvement {args.min_improvement:g} / 0 "
        f"| next-window balancedness: raymoe {args.min_improvement:g} / 0 / DeepSeek | raymoe {args.min_improvement:g} "
        "minus 0 |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for shape, gpus, load, rows in results:
        for r in rows:
            if r["window"] not in args.report_at:
                continue
            total = r["total_slots"]
            lines.append(
                f"| {shape.name} | {gpus} | {load} | {r['window']} | {100 * r['rm_moved'] / total:.1f}% / "
                f"{100 * r['exact_moved'] / total:.1f}% | {r['rm_next']:.4f} / {r['exact_next']:.4f} / "
                f"{r['ds_next']:.4f} | {r['rm_next'] - r['exact_next']:+.4f} |"
            )
    return "\n".join(lines)


def steady_verdict(results: list[tuple[ModelShape, int, str, list[dict]]]) -> list[str]:
    """Per steady series, over the rebalances after the first: the most slots moved and the
    largest next-window balancedness shortfall against min_improvement 0."""
    lines = []
    for shape, gpus, load, rows in results:
        later = rows[1:]
        if load != "steady" or not later:
            continue
        most = max(r["rm_moved"] / r["total_slots"] for r in later)
        short = max(r["exact_next"] - r["rm_next"] for r in later)
        lines.append(
            f"{shape.name} {gpus} GPUs steady, rebalances 2-{rows[-1]['window']}: moved at most {100 * most:.1f}% of "
            f"slots, next-window balancedness at most {short:.4f} below min_improvement 0's"
        )
    return lines


def run_rebalances(ref, args) -> int:
    results, started = [], time.perf_counter()
    for shape in MODEL_SHAPES:
        for gpus in shape.gpus:
            if args.gpus and gpus not in args.gpus:
                continue
            for load in args.loads:
                seed = args.seed + gpus + shape.experts  # the same popularity for both loads
                rows = rebalance_series(ref, args, shape, gpus, drifting=load == "drifting", seed=seed)
                results.append((shape, gpus, load, rows))
                for r in rows:
                    print(
                        f"{shape.name} {gpus} GPUs {load} rebalance {r['window']}: raymoe {r['mode']} "
                        f"bal {r['rm_bal']:.4f} moved {r['rm_moved']} ({r['rm_time']:.1f} s); DeepSeek bal "
                        f"{r['ds_bal']:.4f} moved {r['ds_moved']} ({r['ds_time']:.1f} s); next window raymoe "
                        f"{r['rm_next']:.4f}, min_improvement 0 {r['exact_next']:.4f} (moved {r['exact_moved']})",
                        flush=True,
                    )
    print()
    print(f"command: python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}")
    print(
        f"{args.window_tokens} routed tokens per layer per window, raymoe policy {args.policy}, min_improvement "
        f"{args.min_improvement:g}, {args.gpus_per_node} GPUs per node, redundant slots = GPUs; torch "
        f"{torch.__version__}, reference {REF_REQUIREMENT}; total {time.perf_counter() - started:.0f} s"
    )
    print()
    print(mode_table(results, args))
    print()
    print(moves_table(results, args))
    print()
    print(next_window_table(results, args))
    print()
    print("\n".join(steady_verdict(results)))
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    floats = lambda text: [float(x) for x in text.split(",")]  # noqa: E731
    strs = lambda text: text.split(",")  # noqa: E731
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
    p.add_argument("--rebalances", action="store_true", help="rebalance series on model shapes (see above)")
    p.add_argument("--policy", default="auto", help="--rebalances: raymoe's eplb.policy")
    p.add_argument("--min-improvement", type=float, default=0.005, help="--rebalances: raymoe's eplb.min_improvement")
    p.add_argument("--windows", type=int, default=5, help="--rebalances: rebalances per series")
    p.add_argument("--window-tokens", type=int, default=4_000_000, help="--rebalances: tokens per layer per window")
    p.add_argument("--report-at", type=ints, default=[2, 5], help="--rebalances: rebalances reported")
    p.add_argument("--gpus", type=ints, default=[], help="--rebalances: only these GPU counts (default: all)")
    p.add_argument("--loads", type=strs, default=["steady", "drifting"], help="--rebalances: steady, drifting")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        ref = load_reference(CACHE, args.reference_wheel)
    except Exception as exc:  # any failure to obtain the reference ends the run
        print(f"cannot load DeepSeek's EPLB reference from {REF_REQUIREMENT}: {exc}", file=sys.stderr)
        return 1
    if args.rebalances:
        return run_rebalances(ref, args)
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
