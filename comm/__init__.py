"""torch.distributed: process groups, collectives, cpu-group coordination. No ray."""
