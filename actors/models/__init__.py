"""Model architectures, one per file, built already sharded over their groups."""
