"""EPLB planner: properties over many random shapes and loads.

Balancedness, rank loads and moved slots are recomputed here with plain loops over
lists (tokens of a logical expert split evenly over its replicas; balancedness =
sum_layers mean / sum_layers max of rank load), never with the planner's helpers.
"""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch

from raymoe.cluster.eplb_metrics import balancedness, rank_loads
from raymoe.cluster.eplb_planner import POLICIES, plan_expert_slots, plan_with_policy
from raymoe.cluster.expert_slots import default_expert_slots, replica_tables

# ---- independent reference --------------------------------------------------------------


def ref_rank_loads(load: list[list[float]], p2l: list[list[int]], ep: int) -> list[list[float]]:
    out = []
    for row_load, row in zip(load, p2l):
        replicas = Counter(row)
        per_rank = len(row) // ep
        out.append([sum(row_load[e] / replicas[e] for e in row[r * per_rank : (r + 1) * per_rank]) for r in range(ep)])
    return out


def ref_balancedness(load: list[list[float]], p2l: list[list[int]], ep: int) -> float:
    loads = ref_rank_loads(load, p2l, ep)
    total_max = sum(max(r) for r in loads)
    return 1.0 if total_max == 0 else sum(sum(r) / ep for r in loads) / total_max


def ref_moved(old: list[list[int]], new: list[list[int]]) -> list[int]:
    return [sum(a != b for a, b in zip(ro, rn)) for ro, rn in zip(old, new)]


# ---- random cases -----------------------------------------------------------------------


def zipf_row(rng: random.Random, experts: int, exponent: float, tokens: int) -> list[float]:
    weights = [1.0 / (i + 1) ** exponent for i in range(experts)]
    rng.shuffle(weights)
    picks = rng.choices(range(experts), weights=weights, k=tokens)
    counts = Counter(picks)
    return [float(counts[e]) for e in range(experts)]


def random_load(rng: random.Random, layers: int, experts: int) -> list[list[float]]:
    rows = []
    for _ in range(layers):
        kind = rng.choice(["zipf", "uniform", "hot", "zero", "random"])
        if kind == "zipf":
            rows.append(zipf_row(rng, experts, rng.choice([0.6, 1.0, 1.5]), 40 * experts))
        elif kind == "uniform":
            rows.append([100.0] * experts)
        elif kind == "hot":
            row = [float(rng.randint(0, 5)) for _ in range(experts)]
            row[rng.randrange(experts)] = 1e6
            rows.append(row)
        elif kind == "zero":
            rows.append([0.0] * experts)
        else:
            rows.append([float(rng.randint(0, 1000)) for _ in range(experts)])
    return rows


def random_expert_slots(rng: random.Random, layers: int, experts: int, physical: int) -> torch.Tensor:
    rows = []
    for _ in range(layers):
        row = list(range(experts)) + [rng.randrange(experts) for _ in range(physical - experts)]
        rng.shuffle(row)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int64)


def random_case(seed: int):
    rng = random.Random(seed)
    layers = rng.randint(1, 4)
    nodes = rng.choice([1, 1, 2, 4])
    ep = nodes * rng.choice([1, 2, 3, 4])
    experts = nodes * rng.choice([2, 3, 4, 6, 8])
    slots = [p for p in range(experts, 3 * experts + 1) if p % ep == 0]
    physical = rng.choice(slots)
    load = random_load(rng, layers, experts)
    if rng.random() < 0.5:
        current = default_expert_slots(layers, experts, physical)
    else:
        current = random_expert_slots(rng, layers, experts, physical)
    return load, current, ep, nodes


SEEDS = range(120)


@pytest.mark.parametrize("seed", SEEDS)
def test_plan_is_valid_and_never_worse(seed):
    load, current, ep, nodes = random_case(seed)
    experts, physical = len(load[0]), current.shape[1]
    plan = plan_expert_slots(torch.tensor(load), current, ep, nodes=nodes, bytes_per_expert=7)
    new = plan.physical_to_logical
    assert new.dtype == torch.int64 and tuple(new.shape) == tuple(current.shape)
    _, counts = replica_tables(new, experts)  # raises if an expert lost its last replica
    assert bool((counts >= 1).all()) and int(counts.sum()) == new.numel()
    assert new.view(len(load), ep, physical // ep).shape[2] * ep == physical  # equal slots per rank

    cur_rows, new_rows = current.tolist(), new.tolist()
    before, after = ref_balancedness(load, cur_rows, ep), ref_balancedness(load, new_rows, ep)
    assert after >= before - 1e-12
    assert plan.balancedness_before == pytest.approx(before, rel=1e-9)
    assert plan.balancedness_after == pytest.approx(after, rel=1e-9)
    moved = ref_moved(cur_rows, new_rows)
    assert plan.moved_slots_per_layer.tolist() == moved
    assert plan.moved_slots == sum(moved) and plan.bytes_moved == 7 * sum(moved)
    assert torch.allclose(plan.rank_load_after, torch.tensor(ref_rank_loads(load, new_rows, ep), dtype=torch.float64))
    assert torch.allclose(plan.rank_load_before, torch.tensor(ref_rank_loads(load, cur_rows, ep), dtype=torch.float64))
    for layer, (old_row, new_row) in enumerate(zip(cur_rows, new_rows)):
        if old_row == new_row:
            continue
        # a layer only changes when its max rank load strictly drops
        old_max = max(ref_rank_loads([load[layer]], [old_row], ep)[0])
        assert max(ref_rank_loads([load[layer]], [new_row], ep)[0]) < old_max
        _assert_stayers_keep_slots(old_row, new_row, ep)
        if nodes > 1:
            _assert_replicas_within_nodes(new_row, nodes)
        if not _has_duplicates(old_row, ep) and physical // ep <= experts // nodes:
            assert not _has_duplicates(new_row, ep), "two replicas of one expert on a rank although avoidable"


def _assert_stayers_keep_slots(old_row: list[int], new_row: list[int], ep: int) -> None:
    """An expert on a rank before and after keeps its slot (as many times as it can)."""
    per_rank = len(old_row) // ep
    for r in range(ep):
        old, new = old_row[r * per_rank : (r + 1) * per_rank], new_row[r * per_rank : (r + 1) * per_rank]
        kept = Counter(a for a, b in zip(old, new) if a == b)
        both = Counter(old) & Counter(new)
        assert kept == both, f"rank {r}: {old} -> {new}"


def _assert_replicas_within_nodes(row: list[int], nodes: int) -> None:
    per_node = len(row) // nodes
    node_of: dict[int, int] = {}
    for slot, e in enumerate(row):
        assert node_of.setdefault(e, slot // per_node) == slot // per_node, f"expert {e} spans nodes"


def _has_duplicates(row: list[int], ep: int) -> bool:
    per_rank = len(row) // ep
    return any(len(set(row[r * per_rank : (r + 1) * per_rank])) < per_rank for r in range(ep))


@pytest.mark.parametrize("seed", range(40))
def test_planning_again_on_own_output_moves_nothing(seed):
    load, current, ep, nodes = random_case(seed)
    first = plan_expert_slots(torch.tensor(load), current, ep, nodes=nodes, bytes_per_expert=1)
    second = plan_expert_slots(torch.tensor(load), first.physical_to_logical, ep, nodes=nodes, bytes_per_expert=1)
    assert second.moved_slots == 0 and second.bytes_moved == 0
    assert torch.equal(second.physical_to_logical, first.physical_to_logical)


@pytest.mark.parametrize("experts, ep, redundant", [(8, 4, 0), (16, 8, 16), (12, 3, 12), (6, 6, 6), (10, 5, 0)])
def test_already_optimal_expert_slots_move_nothing(experts, ep, redundant):
    # uniform load, each expert with the same number of replicas, equal slots per rank:
    # every rank carries exactly the mean
    physical = experts + redundant
    layers = 3
    rows = []
    for layer in range(layers):
        row = [(i * 7 + layer) % experts for i in range(physical)]
        rows.append(row)
    current = torch.tensor(rows)
    assert all(set(Counter(r).values()) == {physical // experts} for r in rows)
    load = [[50.0] * experts for _ in range(layers)]
    assert ref_balancedness(load, rows, ep) == pytest.approx(1.0)
    plan = plan_expert_slots(torch.tensor(load), current, ep, bytes_per_expert=100)
    assert plan.bytes_moved == 0 and torch.equal(plan.physical_to_logical, current)


@pytest.mark.parametrize("ep, nodes", [(1, 1), (2, 1), (4, 2)])
def test_zero_load_and_single_rank_keep_current(ep, nodes):
    rng = random.Random(ep)
    current = random_expert_slots(rng, 3, 8, 16)
    zero = plan_expert_slots(torch.zeros(3, 8), current, ep, nodes=nodes, bytes_per_expert=1)
    assert torch.equal(zero.physical_to_logical, current) and zero.balancedness_after == 1.0
    if ep == 1:  # one rank carries all load whatever the expert slots
        skewed = torch.tensor(random_load(rng, 3, 8))
        one = plan_expert_slots(skewed, current, ep, bytes_per_expert=1)
        assert one.moved_slots == 0


@pytest.mark.parametrize(
    "experts, ep, redundant, nodes, exponent",
    [(64, 8, 8, 1, 1.0), (64, 8, 16, 2, 1.2), (32, 16, 16, 1, 0.8), (128, 32, 32, 4, 1.0), (16, 4, 4, 1, 1.5)],
)
def test_skewed_load_improves_balancedness(experts, ep, redundant, nodes, exponent):
    rng = random.Random(experts + ep)
    layers = 4
    load = [zipf_row(rng, experts, exponent, 200 * experts) for _ in range(layers)]
    physical = experts + redundant
    current = default_expert_slots(layers, experts, physical)
    plan = plan_expert_slots(torch.tensor(load), current, ep, nodes=nodes, bytes_per_expert=1)
    before = ref_balancedness(load, current.tolist(), ep)
    after = ref_balancedness(load, plan.physical_to_logical.tolist(), ep)
    # a layer's mean rank load is total/ep: rank loads can never all drop below the mean,
    # and here the hottest expert alone exceeds it on the default expert slots
    assert before < 0.6
    assert after >= before + 0.3 and after >= 0.85


def test_tolerance_trades_balance_for_fewer_moves():
    rng = random.Random(5)
    load = torch.tensor([zipf_row(rng, 32, 1.0, 5000) for _ in range(4)])
    current = default_expert_slots(4, 32, 40)
    exact = plan_expert_slots(load, current, 8, bytes_per_expert=1)
    lax = plan_expert_slots(load, current, 8, bytes_per_expert=1, tolerance=100.0)
    # with a huge tolerance the current expert slots are good enough: nothing moves
    assert lax.moved_slots == 0 and torch.equal(lax.physical_to_logical, current)
    assert exact.moved_slots > 0 and exact.balancedness_after > lax.balancedness_after


@pytest.mark.parametrize(
    "load, p2l, ep, nodes, kw, field",
    [
        (torch.ones(8), torch.zeros(2, 8, dtype=torch.int64), 2, 1, {}, "logical_load"),
        (torch.ones(2, 4), torch.arange(8).view(1, 8) % 4, 2, 1, {}, "physical_to_logical"),
        (torch.ones(1, 4), torch.arange(6).view(1, 6) % 4, 4, 1, {}, "physical_to_logical"),
        (torch.ones(1, 4), torch.arange(8).view(1, 8) % 4, 4, 3, {}, "nodes"),
        (torch.ones(1, 6), torch.arange(8).view(1, 8) % 6, 4, 4, {}, "nodes"),
        (-torch.ones(1, 4), torch.arange(4).view(1, 4), 2, 1, {}, "logical_load"),
        (torch.ones(1, 4), torch.tensor([[0, 1, 2, 2]]), 2, 1, {}, "physical_to_logical"),
        (torch.ones(1, 4), torch.tensor([[0, 1, 2, 4]]), 2, 1, {}, "physical_to_logical"),
        (torch.ones(1, 4), torch.arange(4).view(1, 4).float(), 2, 1, {}, "physical_to_logical"),
        (torch.ones(1, 4), torch.arange(4).view(1, 4), 2, 1, {"tolerance": -0.1}, "tolerance"),
        (torch.ones(1, 4), torch.arange(4).view(1, 4), 2, 1, {"bytes_per_expert": -1}, "bytes_per_expert"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_field(load, p2l, ep, nodes, kw, field):
    kw = {"bytes_per_expert": 1, **kw}
    with pytest.raises(ValueError, match=field):
        plan_expert_slots(load, p2l, ep, nodes=nodes, **kw)


# ---- policy and move tolerance at scale: 58 layers x 256 experts over 32 ranks / 4 nodes ----

SCALE = {"layers": 58, "experts": 256, "ep": 32, "nodes": 4, "physical": 288}


def zipf_weights(rng: np.random.Generator, layers: int, experts: int) -> np.ndarray:
    """[layers, experts] expert popularity: Zipf with a per-layer exponent and hot set."""
    ranks = np.arange(1, experts + 1)
    rows = [rng.permutation(1.0 / ranks ** rng.uniform(0.6, 1.4)) for _ in range(layers)]
    w = np.array(rows)
    return w / w.sum(1, keepdims=True)


def sample_window(rng: np.random.Generator, weights: np.ndarray, tokens: int) -> torch.Tensor:
    return torch.tensor(np.stack([rng.multinomial(tokens, p) for p in weights]), dtype=torch.float64)


@pytest.mark.parametrize("seed", range(3))
def test_auto_policy_is_never_worse_than_global(seed):
    rng = np.random.default_rng(seed)
    s = SCALE
    load = sample_window(rng, zipf_weights(rng, s["layers"], s["experts"]), 200_000)
    current = default_expert_slots(s["layers"], s["experts"], s["physical"])
    kw = {"nodes": s["nodes"], "bytes_per_expert": 1}
    auto = plan_with_policy(load, current, s["ep"], policy="auto", **kw)
    glob = plan_with_policy(load, current, s["ep"], policy="global", **kw)
    hier = plan_with_policy(load, current, s["ep"], policy="hierarchical", **kw)
    assert (glob.mode, hier.mode) == ("global", "hierarchical")
    assert auto.balancedness_after >= max(glob.balancedness_after, hier.balancedness_after)
    # layer by layer never worse than global; hierarchical where it beats global
    glob_max, auto_max = glob.rank_load_after.max(1).values, auto.rank_load_after.max(1).values
    assert bool((auto_max <= glob_max * (1 + 1e-12)).all())
    assert auto.mode == {0: "global", s["layers"]: "hierarchical"}.get(auto.hierarchical_layers, "mixed")


def test_auto_policy_ties_go_to_global_and_one_node_plans_globally():
    load, current = torch.full((2, 8), 100.0), default_expert_slots(2, 8, 8)
    assert plan_with_policy(load, current, 4, policy="auto", nodes=2, bytes_per_expert=1).mode == "global"
    assert plan_with_policy(load, current, 4, policy="hierarchical", nodes=1, bytes_per_expert=1).mode == "global"
    with pytest.raises(ValueError, match="policy"):
        plan_with_policy(load, current, 4, policy="nodes", nodes=2, bytes_per_expert=1)


@pytest.mark.parametrize("seed", range(6))
def test_group_limited_routing_packs_whole_groups_onto_nodes(seed):
    """With expert groups (DeepSeek-V3: 8 groups, a token's experts in 4 of them) every
    replica of a group's experts sits on its group's node, so a token reaches at most
    topk_group nodes; auto plans that way; planning again moves nothing; a count of groups
    that does not split over the nodes falls back to the other modes."""
    rng = np.random.default_rng(seed)
    layers, experts, groups, nodes, ep, physical = 3, 32, 8, 2, 8, 48
    load = sample_window(rng, zipf_weights(rng, layers, experts), 50_000)
    current = default_expert_slots(layers, experts, physical)
    kw = {"nodes": nodes, "bytes_per_expert": 1, "expert_groups": groups}
    for policy in ("auto", "hierarchical"):
        plan = plan_with_policy(load, current, ep, policy=policy, **kw)
        assert plan.mode == "hierarchical" and plan.balancedness_after >= plan.balancedness_before
        slots_per_node = physical // nodes
        for row in plan.physical_to_logical.tolist():
            node_of_group = {}
            for slot, expert in enumerate(row):
                group, node = expert // (experts // groups), slot // slots_per_node
                assert node_of_group.setdefault(group, node) == node, f"group {group} spans nodes"
        again = plan_with_policy(load, plan.physical_to_logical, ep, policy=policy, **kw)
        assert again.moved_slots == 0
    assert plan_with_policy(load, current, ep, policy="global", **kw).mode == "global"
    # 8 groups over 3 nodes: no whole-group packing, auto pools both modes as without groups
    odd = {**kw, "nodes": 3, "expert_groups": groups}
    load3, current3 = load[:, :30], default_expert_slots(layers, 30, 48)
    assert plan_with_policy(load3, current3, 6, policy="auto", **odd).balancedness_after >= (
        plan_with_policy(load3, current3, 6, policy="global", **odd).balancedness_after
    )
    with pytest.raises(ValueError, match="expert_groups"):
        plan_with_policy(load[:, :30], current.clamp(max=29), ep, policy="hierarchical", **{**kw, "nodes": 2})


@pytest.mark.parametrize("seed", range(2))
def test_min_improvement_keeps_steady_state_replans_small(seed):
    rng = np.random.default_rng(seed)
    s = SCALE
    weights = zipf_weights(rng, s["layers"], s["experts"])
    tokens = 4_000_000  # per layer and window: ~1000 steps of a few thousand routed tokens
    first = plan_expert_slots(
        sample_window(rng, weights, tokens),
        default_expert_slots(s["layers"], s["experts"], s["physical"]),
        s["ep"],
        bytes_per_expert=1,
    )
    window, next_window = sample_window(rng, weights, tokens), sample_window(rng, weights, tokens)
    exact = plan_expert_slots(window, first.physical_to_logical, s["ep"], bytes_per_expert=1)
    lax = plan_expert_slots(window, first.physical_to_logical, s["ep"], bytes_per_expert=1, min_improvement=0.005)
    slots = s["layers"] * s["physical"]
    assert exact.moved_slots > 0.2 * slots and exact.skipped_slots == 0  # tolerance 0 chases sampling noise
    assert lax.moved_slots <= 0.05 * slots
    assert lax.moved_slots + lax.skipped_slots == exact.moved_slots

    def next_balancedness(plan):
        return balancedness(rank_loads(next_window, plan.physical_to_logical, s["ep"]))

    assert next_balancedness(lax) >= next_balancedness(exact) - 0.005


@pytest.mark.parametrize("seed", range(2))
def test_min_improvement_ignores_sampling_noise_with_few_slots_per_rank(seed):
    # 256 experts over 64 ranks (8 per node), 5 slots per rank: a plan from scratch fits the
    # sampling noise of its window, so its gain over the slots in force often passes
    # min_improvement on the planned window and not on the next one. 16 layers rather than
    # DeepSeek-V3's 58 keep this at a few seconds.
    rng = np.random.default_rng(seed)
    layers, experts, ep, nodes = 16, 256, 64, 8
    weights = zipf_weights(rng, layers, experts)
    windows = [sample_window(rng, weights, 4_000_000) for _ in range(3)]
    start = default_expert_slots(layers, experts, experts + ep)
    slots = layers * (experts + ep)

    def second_rebalance(min_improvement):
        kw = {"policy": "auto", "nodes": nodes, "bytes_per_expert": 1, "min_improvement": min_improvement}
        first = plan_with_policy(windows[0], start, ep, **kw)
        return plan_with_policy(windows[1], first.physical_to_logical, ep, **kw)

    lax, exact = second_rebalance(0.005), second_rebalance(0.0)
    assert lax.moved_slots <= 0.05 * slots < exact.moved_slots
    next_lax, next_exact = (balancedness(rank_loads(windows[2], p.physical_to_logical, ep)) for p in (lax, exact))
    assert next_lax >= next_exact - 0.005


def test_min_improvement_must_be_non_negative():
    with pytest.raises(ValueError, match="min_improvement"):
        plan_expert_slots(torch.ones(1, 4), torch.arange(4).view(1, 4), 2, bytes_per_expert=1, min_improvement=-0.1)


# ---- replanning on the same load is a fixed point: 256 experts over 64 (and 32) ranks, 8 per node ----


def spiky_zipf_weights(rng: np.random.Generator, layers: int, experts: int) -> np.ndarray:
    """[layers, experts] expert popularity: Zipf with a per-layer exponent (0.6-1.6) and
    shuffled hot set, four experts of it made 5-50 times hotter."""
    rows = []
    for _ in range(layers):
        p = rng.permutation(1.0 / np.arange(1, experts + 1) ** rng.uniform(0.6, 1.6))
        p[rng.choice(experts, 4, replace=False)] *= rng.uniform(5, 50, 4)
        rows.append(p / p.sum())
    return np.array(rows)


@pytest.mark.parametrize(
    "seed, ep, kind, tokens",
    [(4, 64, "spiky", 200_000), (5, 64, "spiky", 200_000), (6, 64, "spiky", 200_000), (7, 64, "spiky", 200_000)]
    + [(9, 32, "zipf", 20_000)],
)
def test_replanning_on_the_same_load_moves_nothing_at_scale(seed, ep, kind, tokens):
    # 16 layers rather than DeepSeek-V3's 58 keep this at ~3 s per case; experts, ranks and
    # nodes are the full ones. Seed 7 moved 38 slots on the replan when candidates qualified
    # against the best candidate's max rank load; seed 9 at 32 ranks / 4 nodes moved 270 when
    # auto picked whole plans (hierarchical and global plans close there).
    rng = np.random.default_rng(seed)
    layers, experts, nodes = 16, 256, ep // 8
    physical = experts + (64 if seed % 2 else 128)
    weights = (spiky_zipf_weights if kind == "spiky" else zipf_weights)(rng, layers, experts)
    # the slots in force: a global plan of an earlier window of the same routing
    applied = plan_with_policy(
        sample_window(rng, weights, tokens),
        default_expert_slots(layers, experts, physical),
        ep,
        policy="global",
        nodes=nodes,
        bytes_per_expert=1,
    ).physical_to_logical
    load = sample_window(rng, weights, tokens)
    for policy in POLICIES:
        for min_improvement in (0.0, 0.005):
            kw = {"policy": policy, "nodes": nodes, "bytes_per_expert": 1, "min_improvement": min_improvement}
            plan = plan_with_policy(load, applied, ep, **kw)
            again = plan_with_policy(load, plan.physical_to_logical, ep, **kw)
            assert again.moved_slots == 0, (policy, min_improvement, again.moved_slots_per_layer.tolist())
            assert torch.equal(again.physical_to_logical, plan.physical_to_logical)
