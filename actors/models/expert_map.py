"""Device-side expert maps of every MoE layer, updated in place.

Tensors keep their storage across updates, so CUDA graphs captured with them
stay valid after a rebalance switches a layer's map.
"""

from __future__ import annotations

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

    def update_layer(self, moe_layer: int, physical_to_logical: torch.Tensor) -> None:
        """Switch one layer to new expert slots p2l [P] (a CPU tensor), in place. On GPU the
        copies queue on the current stream from pinned memory: the host does not wait for
        the steps in flight."""
        row = physical_to_logical.view(1, -1).to(torch.int64)
        l2p, counts = replica_tables(row, self.num_logical)
        updates = ((self.physical_to_logical, row), (self.logical_to_physical, l2p), (self.replica_count, counts))
        for table, new in updates:
            source = new[0].pin_memory() if table.is_cuda else new[0]
            table[moe_layer].copy_(source, non_blocking=True)
        self.physical_to_logical_cpu[moe_layer].copy_(row[0])
