"""Expert-load recording: tokens routed to each physical expert, counted on the device.

The MoE layers call ``record`` inside the forward (captured into CUDA graphs
too); nothing here synchronises with the host. Counts accumulate until the
owner reads and resets them.
"""

from __future__ import annotations

import torch


class ExpertLoadRecorder:
    def __init__(self, num_moe_layers: int, num_physical: int, device: torch.device) -> None:
        self.counts = torch.zeros(num_moe_layers, num_physical + 1, dtype=torch.int64, device=device)

    def record(self, moe_layer: int, physical_ids: torch.Tensor) -> None:
        """physical_ids [N, top_k]; -1 marks padding rows (not counted)."""
        ids = physical_ids.reshape(-1)
        slot = torch.where(ids >= 0, ids, self.counts.shape[1] - 1)  # padding -> a trash column
        self.counts[moe_layer].index_add_(0, slot, torch.ones_like(slot))

    def take(self) -> torch.Tensor:
        """Counts so far [moe_layers, P] (a copy), and reset to zero."""
        out = self.counts[:, :-1].clone()
        self.counts.zero_()
        return out
