"""Pure planning: config tree, rank layout, placement-group bundles, expert slots, EPLB plans.

No ray, no torch.distributed.
"""
