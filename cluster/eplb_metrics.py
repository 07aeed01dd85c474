"""EPLB metrics on expert slots: replica counts, per-rank load, balancedness, moved slots.

Expert slots are physical_to_logical [layers, P] (int64): physical slot p of a layer
holds that logical expert; EP rank i owns slots [i*P/ep, (i+1)*P/ep). A logical
expert's tokens split evenly over its replicas (the MoE layer picks replicas
round-robin by token), so a slot carries load[logical] / replica_count[logical].
Pure torch, vectorised over layers.
"""

from __future__ import annotations

import torch


def replica_counts(physical_to_logical: torch.Tensor, num_logical: int) -> torch.Tensor:
    """Replicas of each logical expert per layer: [layers, E] int64 (0 where an expert has none)."""
    layers = physical_to_logical.shape[0]
    counts = torch.zeros((layers, num_logical), dtype=torch.int64)
    return counts.scatter_add_(1, physical_to_logical, torch.ones_like(physical_to_logical))


def rank_loads(logical_load: torch.Tensor, physical_to_logical: torch.Tensor, ep: int) -> torch.Tensor:
    """Load of every EP rank per layer: [layers, ep] float64, in the unit of ``logical_load``.

    logical_load [layers, E] (tokens routed to each logical expert); a rank's load is the
    sum over its slots of load[logical] / replica_count[logical].
    """
    layers, physical = physical_to_logical.shape
    counts = replica_counts(physical_to_logical, logical_load.shape[1]).clamp(min=1)
    per_replica = logical_load.to(torch.float64) / counts
    slot_load = per_replica.gather(1, physical_to_logical)
    return slot_load.view(layers, ep, physical // ep).sum(-1)


def balancedness(rank_load: torch.Tensor) -> float:
    """sum_layers mean_over_ranks / sum_layers max_over_ranks of rank_load [layers, ep]; 1.0 = perfect.

    All-zero load counts as perfectly balanced (1.0).
    """
    total_max = rank_load.max(dim=1).values.sum().item()
    if total_max <= 0:
        return 1.0
    return rank_load.mean(dim=1).sum().item() / total_max


def moved_slots(old_physical_to_logical: torch.Tensor, new_physical_to_logical: torch.Tensor) -> torch.Tensor:
    """Slots per layer whose logical expert changes: [layers] int64 (each receives one expert's weights)."""
    return (old_physical_to_logical != new_physical_to_logical).sum(dim=1)
