"""Models built already sharded over their groups: one decoder (decoder.py) that every
supported architecture is, with what distinguishes them in registry.py."""
