"""Random weights for ``model.load_format: dummy`` (benchmarks, tests)."""

from __future__ import annotations

import torch

from raymoe.actors.models.fp8 import FP8, SCALE_SUFFIX


def init_random_weights(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Benchmark weights: normal(0, std) for matrices, 1 for norms (never zeros: zeros run
    faster); FP8 matrices normal(0, 1) in FP8 times block scales of ``std``."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(SCALE_SUFFIX):
                p.fill_(std)
            elif p.dtype == FP8:
                p.copy_(torch.empty(p.shape, device=p.device).normal_(0.0, 1.0, generator=gen))
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=gen)
