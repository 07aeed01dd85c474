"""Expert slots as values: which logical expert each physical expert slot holds.

Physical slots are numbered 0..P-1 and split evenly over the EP group: EP rank i
owns slots [i*P/ep, (i+1)*P/ep). P = logical experts + redundant replicas.
Pure functions on torch integer tensors; the EPLB planner builds on these.
"""

from __future__ import annotations

import torch


def num_physical_experts(num_logical: int, num_redundant: int, ep: int) -> int:
    """P = num_logical + num_redundant; must split evenly over the EP group."""
    physical = num_logical + num_redundant
    if physical % ep:
        raise ValueError(
            f"eplb.num_redundant_experts: {num_logical} experts + {num_redundant} redundant = {physical} "
            f"physical slots do not split evenly over ep={ep}; choose num_redundant_experts so that "
            f"experts + redundant is a multiple of {ep}"
        )
    return physical


def default_expert_slots(num_layers: int, num_logical: int, num_physical: int) -> torch.Tensor:
    """Initial physical->logical map [layers, P] (int64): slot p holds logical p mod E.

    With no redundant slots this is the identity; redundant slots replicate the
    first experts until the planner has load statistics to do better.
    """
    assert num_physical >= num_logical >= 1
    row = torch.arange(num_physical, dtype=torch.int64) % num_logical
    return row.repeat(num_layers, 1)


def replica_tables(physical_to_logical: torch.Tensor, num_logical: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From p2l [layers, P] build logical->physical [layers, E, max_replicas] (-1 padded,
    replicas in ascending slot order) and replica counts [layers, E].

    ``max_replicas`` = P - E + 1, the most any expert can have when all others have one.
    Raises ValueError if a logical expert has no replica.
    """
    layers, physical = physical_to_logical.shape
    max_replicas = physical - num_logical + 1
    l2p = torch.full((layers, num_logical, max_replicas), -1, dtype=torch.int64)
    counts = torch.zeros((layers, num_logical), dtype=torch.int64)
    for layer in range(layers):
        for slot, logical in enumerate(physical_to_logical[layer].tolist()):
            l2p[layer, logical, counts[layer, logical]] = slot
            counts[layer, logical] += 1
    missing = (counts == 0).nonzero().tolist()
    if missing:
        raise ValueError(f"expert slots leave (layer, logical expert) without a replica: {missing[:5]}")
    return l2p, counts
