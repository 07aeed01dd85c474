"""Pure planning: config tree, rank layout, placement, EPLB plans. No ray, no torch.distributed."""
