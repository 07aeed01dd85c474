"""An ideal accelerator for CPU ranks: each step takes the time a cost model gives it and
computes nothing, so the host path (ingress, controller, Ray, the rank's own host work) can be
measured at GPU step times on a machine without a GPU.

A step costs ``decode_ms`` plus its prefill tokens (all but one per sequence) at
``prefill_tok_s``, and a step with prefill tokens (an eager step on a GPU) at least
``eager_ms`` (optional, default 0: a host-bound eager step's floor); it starts when launched
or when the step before it ends, whichever is later, and its outputs can be collected once
it ends. Its logits are those of a zero hidden
state (the model's LM head on zeros), so the sampled tokens are meaningless: use it with
``ignore_eos`` workloads and compare timings only.

    RAYMOE_SIM_DEVICE=decode_ms=5.5,prefill_tok_s=212000 PYTHONPATH=benchmarks/runner_patches \\
        python benchmarks/prefix_cache_bench.py --config tiny ...

``sitecustomize.py`` here patches ``ModelRunner`` in every process that imports it (Ray's
workers inherit PYTHONPATH and the variable on a local cluster).
"""

from __future__ import annotations

import collections
import os
import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StepCost:
    decode_ms: float
    prefill_tok_s: float
    eager_ms: float = 0.0

    def seconds(self, query_lens: Any) -> float:
        prefill = int(query_lens.sum()) - int((query_lens > 0).sum())
        device = self.decode_ms / 1e3 + prefill / self.prefill_tok_s
        return max(device, self.eager_ms / 1e3) if prefill else device


def cost_from_env(value: str) -> StepCost:
    fields = {name: float(v) for name, v in (item.split("=", 1) for item in value.split(",") if item)}
    return StepCost(**fields)


def install(runner_module: Any) -> None:
    """Patch ``runner_module.ModelRunner``: no forward pass, simulated step times."""
    import torch

    cost = cost_from_env(os.environ["RAYMOE_SIM_DEVICE"])
    runner = runner_module.ModelRunner
    launch, collect = runner.launch, runner.collect

    def forward_eager(self, layout, dp_token_counts, prompt_rows=None):
        rows = int(layout.sample_rows.shape[0]) + (0 if prompt_rows is None else int(prompt_rows.shape[0]))
        return self.model.compute_logits(torch.zeros(rows, self.spec.hidden_size, dtype=self.dtype))

    def sim_launch(self, step):
        ends = self.__dict__.setdefault("_sim_ends", collections.deque())
        start = max(time.perf_counter(), ends[-1] if ends else 0.0)
        ends.append(start + cost.seconds(step.query_lens))
        launch(self, step)

    def sim_collect(self, keep):
        ends = self.__dict__.setdefault("_sim_ends", collections.deque())
        done = [ends.popleft() for _ in range(len(self._in_flight) - keep)]
        waited = 0.0
        if done:  # the steps end in order: wait for the last one collected
            waited = max(0.0, done[-1] - time.perf_counter())
            time.sleep(waited)
        outputs = collect(self, keep)
        for out in outputs:  # the wait a device's event would have measured
            if out is not None:
                out.device_wait_s = waited
        return outputs

    runner.forward_eager = forward_eager
    runner.launch = sim_launch
    runner.collect = sim_collect
