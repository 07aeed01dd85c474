"""EPLB planner: logical expert load -> new expert slots (physical_to_logical).

Pure (numpy/torch + stdlib). Conventions of ``expert_slots``: P physical slots per
layer, EP rank i owns slots [i*P/ep, (i+1)*P/ep); a slot carries load[logical] /
replica_count[logical]. A layer's mean rank load is total/ep whatever the expert slots,
so balancedness = sum mean / sum max rises exactly when some layer's max rank load
falls: every layer is planned on its own.

Per layer:
1. Nodes (nodes > 1, hierarchical like DeepSeek's EPLB): logical experts are packed
   onto nodes, E/nodes each, heaviest first onto the lightest node, then improved by
   swaps; every replica of an expert stays on its expert's node (cheap traffic). With
   ``expert_groups`` (group-limited routing, DeepSeek-V2/V3: a token reaches experts of
   only topk_group of the G equal groups), whole groups are packed, G/nodes per node, so
   a token's experts span at most topk_group nodes. nodes = 1 is the global mode: one
   node holds everything.
2. Replication, per node: each logical expert gets one slot; each spare slot goes in
   turn to the expert with the highest load per replica (at most one per rank while
   any expert has room).
3. Packing, per node: replicas heaviest first, each to the least loaded rank with a
   free slot that lacks that expert; duplicates left over are swapped out where a rank
   can take them; then local search on the most loaded rank m, each step leaving every
   rank it changes below m's old load: swap a replica of m with a lighter one elsewhere;
   else turn a replica on m (of an expert with >= 2) into one of an expert m lacks; else
   turn a replica elsewhere into one more of an expert on m. Replica counts thus adapt
   to the packing (greedy counts alone leave mid-sized replicas that pair badly). No
   step puts two replicas of one expert on a rank.
4. Movement ("fresh" candidate): ranks are interchangeable, and so are nodes, so the
   packed bins are matched to the current ranks greedily by the slots they could share
   (nodes first, then ranks inside a node); inside a rank every expert that stays keeps
   the slot it already has.
5. "Warm" candidate (when the current expert slots keep each expert's replicas on one
   node): the current node of every expert, improved by swaps between nodes; per node
   the fresh plan's replica counts where they fit: surplus replicas leave the most
   loaded ranks, missing ones fill the freed slots on the least loaded ranks, then the
   local search of step 3, stopping as soon as it is as good as the fresh plan (within
   ``tolerance``), after S/4 steps, or once it changes as many slots as the fresh plan
   (it can no longer win then).
6. Choice: among current, warm and fresh, those whose max rank load is within
   (1 + tolerance) of the fresh plan's (plus 1e-9 relative) qualify, and the one moving
   the fewest slots wins, the current expert slots first. The bar comes from the fresh
   plan because its max rank load does not depend on the current slots (steps 1-3 never
   read them): the chosen slots therefore qualify again when they are the current ones,
   so planning again on the same load moves nothing. (A bar from the best candidate
   would not be a fixed point: the warm search from the chosen slots, resetting replica
   counts, now and then lands below the fresh plan by luck, and the layer moves again.)
   Balancedness never drops, and a layer changes only when its max rank load strictly
   falls.
7. Move tolerance: with ``min_improvement`` > 0, a candidate that moves slots also
   qualifies in step 6 when its balancedness (mean / max rank load) is within
   min_improvement of the fresh plan's, and the current slots when theirs is within
   min_improvement + 3 sigma of it, sigma = the fresh plan's balancedness / sqrt(its max
   rank load): the sampling noise of a max rank load of that many routed choices (load
   counts are token counts, Poisson-like, so a rank load L varies by at most sqrt(L)).
   The fresh plan fits the noise of the window it is planned on while the current slots
   were planned on another, so with few slots per rank the fresh plan's gain on the
   planned window is mostly noise that the next window does not repeat; a layer keeps its
   current slots unless moving gains clearly more than noise, and once it moves it takes
   a plan within min_improvement of the fresh one (a hysteresis: it does not settle at
   the edge of the wider bar). Both bars come from the fresh plan, and the current slots'
   bar is the wider one, so step 6's fixed point holds. The plan reports as skipped the
   slots that planning with min_improvement = 0 (no noise term either) would move on top
   (per layer).
8. Mode (``plan_with_policy``): ``global`` plans with nodes = 1, ``hierarchical`` with the
   layout's nodes, ``auto`` (where hierarchical is possible) pools both modes' candidates
   of a layer and applies step 6 with the lower of the two modes' bars (each of step 7's
   two); should global's own choice have a lower max rank load, it takes that. So auto is
   never worse than global (with the same min_improvement), layer by layer, moves more
   than global only in layers where hierarchical packing from scratch beats global
   packing from scratch, and is a fixed point as well (its row
   qualifies in both steps when it is the current one). Picking whole plans by
   balancedness is not: the other mode's plan from the chosen slots keeps their good
   layers and improves the rest. Without group-limited routing, hierarchical packing buys
   no traffic, so ties go to global; with it (expert groups that split evenly over the
   nodes), auto plans hierarchically, as DeepSeek's EPLB does: the groups then keep each
   token's experts on few nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from raymoe.cluster.eplb_candidates import fresh_candidate, warm_candidate
from raymoe.cluster.eplb_metrics import balancedness, moved_slots, rank_loads, replica_counts

_REL_TOL = 1e-9
_NOISE_SIGMAS = 3.0  # step 7: how far beyond sampling noise a gain must go to move a layer
POLICIES = ("auto", "global", "hierarchical")


@dataclass(frozen=True, kw_only=True)
class EplbPlan:
    """One rebalance: the new expert slots and what it buys and costs.

    physical_to_logical [layers, P] int64; rank_load_* [layers, ep] float64 (unit of the
    load); moved_slots_per_layer [layers] int64 = slots whose logical expert changes;
    bytes_moved = moved_slots * bytes_per_expert (each such slot receives one expert);
    skipped_slots = slots that planning with min_improvement = 0 would move on top, summed
    over layers; hierarchical_layers = layers whose slots come from hierarchical packing;
    mode = "global" (none of them), "hierarchical" (all) or "mixed".
    """

    physical_to_logical: torch.Tensor
    balancedness_before: float
    balancedness_after: float
    rank_load_before: torch.Tensor
    rank_load_after: torch.Tensor
    moved_slots_per_layer: torch.Tensor
    moved_slots: int
    bytes_moved: int
    skipped_slots: int
    mode: str
    hierarchical_layers: int


def plan_with_policy(
    logical_load: torch.Tensor,
    physical_to_logical: torch.Tensor,
    ep: int,
    *,
    policy: str,
    nodes: int,
    bytes_per_expert: int,
    min_improvement: float = 0.0,
    expert_groups: int = 1,
) -> EplbPlan:
    """Plan in the mode(s) ``policy`` picks (one of POLICIES); ``nodes`` = the nodes hierarchical
    packing would use (1 = not possible, then every policy plans globally); ``expert_groups`` =
    the routing's expert groups (group-limited routing; 1 = none), packed whole onto nodes
    when they split evenly over them (step 1), which auto then always does (step 8)."""
    if policy not in POLICIES:
        raise ValueError(f"policy: expected one of {POLICIES}, got {policy!r}")
    grouped = expert_groups > 1 and expert_groups % nodes == 0
    if policy == "global" or nodes == 1:
        modes = (1,)
    else:
        modes = (nodes,) if policy == "hierarchical" or grouped else (1, nodes)
    return _plan(
        logical_load,
        physical_to_logical,
        ep,
        modes=modes,
        bytes_per_expert=bytes_per_expert,
        tolerance=0.0,
        min_improvement=min_improvement,
        expert_groups=expert_groups if grouped else 1,
    )


def plan_expert_slots(
    logical_load: torch.Tensor,
    physical_to_logical: torch.Tensor,
    ep: int,
    *,
    nodes: int = 1,
    bytes_per_expert: int,
    tolerance: float = 0.0,
    min_improvement: float = 0.0,
) -> EplbPlan:
    """Plan expert slots for logical_load [layers, E] (tokens per logical expert over a
    window, >= 0) given the current physical_to_logical [layers, P]; ep ranks split evenly
    over ``nodes`` (1 = global). The result keeps P, gives every logical expert >= 1
    replica and never has a lower balancedness than the current expert slots; planning
    again on the same load from the result moves nothing.
    """
    return _plan(
        logical_load,
        physical_to_logical,
        ep,
        modes=(nodes,),
        bytes_per_expert=bytes_per_expert,
        tolerance=tolerance,
        min_improvement=min_improvement,
    )


def _plan(
    logical_load: torch.Tensor,
    physical_to_logical: torch.Tensor,
    ep: int,
    *,
    modes: tuple[int, ...],
    bytes_per_expert: int,
    tolerance: float,
    min_improvement: float,
    expert_groups: int = 1,
) -> EplbPlan:
    """Every layer planned on its own in ``modes`` (the nodes of each; 1 = global), step 8 when
    two; hierarchical packing packs whole ``expert_groups`` (1: single experts)."""
    _validate(
        logical_load, physical_to_logical, ep, nodes=modes[-1], bytes_per_expert=bytes_per_expert, tolerance=tolerance
    )
    if logical_load.shape[1] % expert_groups:
        raise ValueError(f"expert_groups={expert_groups} must divide the {logical_load.shape[1]} logical experts")
    if not min_improvement >= 0:
        raise ValueError(f"min_improvement: must be >= 0 (balancedness gain per layer), got {min_improvement}")
    load = logical_load.detach().to(torch.float64).cpu()
    current = physical_to_logical.detach().to(torch.int64).cpu()
    load_np, cur_np = load.numpy(), current.numpy()
    rows, hierarchical, skipped = [], 0, 0
    for i in range(cur_np.shape[0]):
        kw = {"modes": modes, "tolerance": tolerance, "groups": expert_groups}
        row, from_hierarchical = _plan_layer(load_np[i], cur_np[i], ep, min_improvement=min_improvement, **kw)
        if min_improvement > 0:  # what planning with min_improvement = 0 would move on top
            exact, _ = _plan_layer(load_np[i], cur_np[i], ep, min_improvement=0.0, **kw)
            skipped += max(int((exact != cur_np[i]).sum() - (row != cur_np[i]).sum()), 0)
        rows.append(row)
        hierarchical += from_hierarchical
    new = torch.from_numpy(np.stack(rows)) if rows else current.clone()
    before, after = rank_loads(load, current, ep), rank_loads(load, new, ep)
    moved = moved_slots(current, new)
    if len(modes) == 1:
        mode = "global" if modes[0] == 1 else "hierarchical"
    else:
        mode = "global" if hierarchical == 0 else "hierarchical" if hierarchical == len(rows) else "mixed"
    return EplbPlan(
        physical_to_logical=new,
        balancedness_before=balancedness(before),
        balancedness_after=balancedness(after),
        rank_load_before=before,
        rank_load_after=after,
        moved_slots_per_layer=moved,
        moved_slots=int(moved.sum()),
        bytes_moved=int(moved.sum()) * bytes_per_expert,
        skipped_slots=skipped,
        mode=mode,
        hierarchical_layers=hierarchical,
    )


def _validate(
    load: torch.Tensor, p2l: torch.Tensor, ep: int, *, nodes: int, bytes_per_expert: int, tolerance: float
) -> None:
    if load.dim() != 2 or load.shape[1] < 1:
        raise ValueError(f"logical_load: expected shape [layers, logical experts], got {tuple(load.shape)}")
    if p2l.dim() != 2 or p2l.shape[0] != load.shape[0] or p2l.shape[1] < load.shape[1]:
        raise ValueError(
            f"physical_to_logical: expected [layers={load.shape[0]}, P >= {load.shape[1]}] to match logical_load, "
            f"got {tuple(p2l.shape)}"
        )
    if p2l.dtype.is_floating_point or p2l.dtype.is_complex or p2l.dtype == torch.bool:
        raise ValueError(f"physical_to_logical: expected an integer tensor, got {p2l.dtype}")
    if not bool(torch.isfinite(load.to(torch.float64)).all()) or bool((load < 0).any()):
        raise ValueError("logical_load: token counts must be finite and >= 0")
    if ep < 1 or nodes < 1 or ep % nodes:
        raise ValueError(f"ep={ep}, nodes={nodes}: need ep >= 1 and nodes >= 1 with ep a multiple of nodes")
    num_logical, physical = load.shape[1], p2l.shape[1]
    if physical % ep:
        raise ValueError(f"physical_to_logical: P={physical} slots do not split evenly over ep={ep}")
    if nodes > 1 and num_logical % nodes:
        raise ValueError(f"nodes={nodes}: hierarchical planning needs E={num_logical} a multiple of nodes; use nodes=1")
    if bytes_per_expert < 0:
        raise ValueError(f"bytes_per_expert: must be >= 0, got {bytes_per_expert}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance: must be >= 0 (relative slack in max rank load), got {tolerance}")
    if p2l.numel() and (int(p2l.min()) < 0 or int(p2l.max()) >= num_logical):
        raise ValueError(f"physical_to_logical: logical expert ids must lie in [0, {num_logical})")
    if p2l.numel() and int(replica_counts(p2l.to(torch.int64), num_logical).min()) < 1:
        raise ValueError("physical_to_logical: every logical expert needs at least one replica in every layer")


# ---- one layer --------------------------------------------------------------------------


def _layer_max(load: np.ndarray, row: np.ndarray, ep: int) -> float:
    per_replica = load / np.maximum(np.bincount(row, minlength=load.size), 1)
    return float(per_replica[row].reshape(ep, -1).sum(1).max())


def _max_limit(fresh_max: float, mean: float, *, tolerance: float, slack: float) -> float:
    """Highest max rank load within (1 + tolerance) of the fresh plan's, or with a
    balancedness (mean / max) within ``slack`` of the fresh plan's."""
    limit = fresh_max * (1 + tolerance)
    if slack > 0:
        floor = mean / fresh_max - slack
        limit = max(limit, mean / floor if floor > 0 else np.inf)
    return limit


def _bars(fresh_max: float, mean: float, *, tolerance: float, min_improvement: float) -> tuple[float, float]:
    """Steps 6, 7: the highest max rank load at which the current slots qualify, and at which
    a candidate that moves slots does."""
    move = _max_limit(fresh_max, mean, tolerance=tolerance, slack=min_improvement)
    if min_improvement == 0:
        return move, move
    noise = _NOISE_SIGMAS * (mean / fresh_max) / np.sqrt(fresh_max)
    return _max_limit(fresh_max, mean, tolerance=tolerance, slack=min_improvement + noise), move


def _plan_layer(
    load: np.ndarray,
    current: np.ndarray,
    ep: int,
    *,
    modes: tuple[int, ...],
    tolerance: float,
    min_improvement: float,
    groups: int = 1,
) -> tuple[np.ndarray, bool]:
    """physical_to_logical row [P] for one layer (steps 6-8) and whether it comes from
    hierarchical packing."""
    if ep == 1 or not load.any():  # no expert slots change any rank load
        return current, len(modes) == 1 and modes[0] > 1
    kw = {"tolerance": tolerance, "min_improvement": min_improvement, "groups": groups}
    if len(modes) == 1:
        cands, bars = _candidates(load, current, ep, nodes=modes[0], **kw)
        return _cheapest(load, current, ep, cands=cands, bars=bars), modes[0] > 1
    (glob_cands, glob_bars), (hier_cands, hier_bars) = (_candidates(load, current, ep, nodes=n, **kw) for n in modes)
    union = glob_cands + hier_cands[1:]  # hier_cands[0] is current
    lower = (min(glob_bars[0], hier_bars[0]), min(glob_bars[1], hier_bars[1]))
    row = _cheapest(load, current, ep, cands=union, bars=lower)
    glob = _cheapest(load, current, ep, cands=glob_cands, bars=glob_bars)
    if _layer_max(load, glob, ep) < _layer_max(load, row, ep):
        row = glob
    return row, any(row is c for c in hier_cands[1:])


def _candidates(
    load: np.ndarray,
    current: np.ndarray,
    ep: int,
    *,
    nodes: int,
    tolerance: float,
    min_improvement: float,
    groups: int = 1,
) -> tuple[list[np.ndarray], tuple[float, float]]:
    """Steps 1-5 in one mode: [current, warm (if any), fresh] and the bars of steps 6, 7
    (current's, moving candidates')."""
    groups = groups if nodes > 1 else 1
    fresh = fresh_candidate(load, current, ep, nodes, groups)
    mean = float(load.sum()) / ep
    bars = _bars(_layer_max(load, fresh, ep), mean, tolerance=tolerance, min_improvement=min_improvement)
    hint, budget = np.bincount(fresh, minlength=load.size), int((fresh != current).sum())
    warm = warm_candidate(load, current, ep, nodes=nodes, groups=groups, hint=hint, good_enough=bars[1], budget=budget)
    return [c for c in (current, warm, fresh) if c is not None], bars


def _cheapest(
    load: np.ndarray, current: np.ndarray, ep: int, *, cands: list[np.ndarray], bars: tuple[float, float]
) -> np.ndarray:
    """Step 6: of cands (cands[0] = current), the one changing the fewest slots of current
    among those whose max rank load is <= its bar (plus 1e-9 relative): bars[0] for current,
    bars[1] for the others; the earlier of equals."""
    limits = [bars[0]] + [bars[1]] * (len(cands) - 1)
    moved = [
        int((c != current).sum()) if _layer_max(load, c, ep) <= limit * (1 + _REL_TOL) else current.size + 1
        for c, limit in zip(cands, limits)
    ]
    return cands[int(np.argmin(moved))]
