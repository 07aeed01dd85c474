"""Device-side expert maps of every MoE layer, updated in place.

Tensors keep their storage across updates, so CUDA graphs captured with them
stay valid after a rebalance switches a layer's map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raymoe.cluster.expert_slots import replica_tables


class ExpertMap:
    def __init__(self, physical_to_logical: torch.Tensor, num_logical: int, device: torch.device) -> None:
        """physical_to_logical: [moe_layers, P] int64 (see raymoe.cluster.expert_slots)."""
        self.num_logical = num_logical
        self.num_physical = physical_to_logical.shape[1]
        l2p, counts = replica_tables(physical_to_logical, num_logical)
        self.physical_to_logical = physical_to_logical.to(device)
        self.logical_to_physical = l2p.to(device)
        self.replica_count = counts.to(device)
        self.physical_to_logical_cpu = physical_to_logical.clone()

    def layer_tables(self, physical_to_logical: torch.Tensor) -> "LayerTables":
        """One layer's tables for new expert slots p2l [P] (CPU), on this map's device (built
        ahead of ``update_layer``, e.g. in the background while steps run)."""
        row = physical_to_logical.view(1, -1).to(torch.int64)
        l2p, counts = replica_tables(row, self.num_logical)
        dev = self.physical_to_logical.device
        return LayerTables(row[0].clone(), row[0].to(dev), l2p[0].to(dev), counts[0].to(dev))

    def update_layer(self, moe_layer: int, tables: "LayerTables") -> None:
        """Switch one layer to ``tables``, in place; on GPU, device copies queued on the
        current stream (the host does not wait for the steps in flight)."""
        self.physical_to_logical[moe_layer].copy_(tables.physical_to_logical, non_blocking=True)
        self.logical_to_physical[moe_layer].copy_(tables.logical_to_physical, non_blocking=True)
        self.replica_count[moe_layer].copy_(tables.replica_count, non_blocking=True)
        self.physical_to_logical_cpu[moe_layer].copy_(tables.physical_to_logical_cpu)


@dataclass(frozen=True)
class LayerTables:
    """One MoE layer's expert-slot tables (see ExpertMap), the device ones on its device."""

    physical_to_logical_cpu: torch.Tensor  # [P]
    physical_to_logical: torch.Tensor  # [P]
    logical_to_physical: torch.Tensor  # [E, max_replicas]
    replica_count: torch.Tensor  # [E]

    def device_tensors(self) -> tuple[torch.Tensor, ...]:
        return self.physical_to_logical, self.logical_to_physical, self.replica_count
