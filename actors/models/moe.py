"""Expert-parallel MoE layer.

Token dispatch (chosen for simplicity and exactness; the fast path is a later
concern): attention leaves every rank of a DP replica holding that replica's
tokens. The MoE layer

1. all-gathers the tokens of every DP replica over the ``dp`` group (each padded
   to the step's largest replica), so every rank sees every token of the step;
2. routes them (router replicated on every rank) to logical experts, and maps
   each choice to a physical expert slot through the ExpertMap;
3. runs the experts whose slots this rank holds -- its EP share, with its
   ``moe_tp`` slice of each expert's intermediate dimension -- weighting by the
   router probabilities;
4. all-reduces the partial outputs over the world (the world is exactly
   ep x moe_tp shares, each held by one rank) and keeps its own replica's rows.

The layer never looks at which rank holds a logical expert except through the
ExpertMap, so load balancing can move and replicate experts without touching it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.actors.models.batch import ForwardBatch
from raymoe.actors.models.checkpoint import CheckpointReader
from raymoe.actors.models.expert_map import ExpertMap
from raymoe.actors.models.expert_mlp import expert_mlp
from raymoe.actors.models.layers import split_evenly
from raymoe.actors.models.spec import ModelSpec
from raymoe.comm.groups import Groups


@dataclass(frozen=True)
class ExpertNames:
    """Checkpoint tensor names of one MoE layer; ``{layer}`` and ``{expert}`` are filled in."""

    router: str
    gate: str
    up: str
    down: str


class MoE(nn.Module):
    def __init__(
        self,
        spec: ModelSpec,
        layer: int,
        moe_layer: int,
        groups: Groups,
        expert_map: ExpertMap,
        dtype,
        device,
        router_skew: float = 0.0,
    ) -> None:
        super().__init__()
        assert spec.moe is not None
        self.layer, self.moe_layer = layer, moe_layer
        self.top_k, self.norm_topk_prob = spec.moe.top_k, spec.moe.norm_topk_prob
        self.groups, self.expert_map = groups, expert_map
        self.slots = expert_map.num_physical // groups.ep.world_size
        self.slot_start = groups.ep.rank_in_group * self.slots
        self.inter = split_evenly(
            spec.moe.intermediate_size, groups.moe_tp.world_size, "moe_intermediate_size",
            "choose an ep so that world_size / ep (moe_tp) divides it",
        )  # fmt: skip
        self.inter_start = groups.moe_tp.rank_in_group * self.inter
        h = spec.hidden_size
        self.router = nn.Parameter(torch.zeros(spec.moe.num_experts, h, dtype=dtype, device=device), requires_grad=False)
        self.w13 = nn.Parameter(torch.zeros(self.slots, 2 * self.inter, h, dtype=dtype, device=device), requires_grad=False)
        self.w2 = nn.Parameter(torch.zeros(self.slots, h, self.inter, dtype=dtype, device=device), requires_grad=False)
        assert self.slots < 2**15, "slot ids are sorted as int16"
        self.register_buffer("group_ends", torch.arange(1, self.slots + 1, dtype=torch.int16, device=device), persistent=False)
        self.router_bias = zipf_router_bias(spec.moe.num_experts, router_skew, seed=layer, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """x [T, H] (this DP replica's tokens) -> [T, H]."""
        dp = self.groups.dp
        if dp.world_size > 1:
            pad = batch.dp_pad
            assert batch.dp_counts is not None and pad >= x.shape[0]
            x_all = dp.all_gather(F.pad(x, (0, 0, 0, pad - x.shape[0])))
            row = torch.arange(x_all.shape[0], device=x.device)
            valid = (row % pad) < batch.dp_counts[row // pad]
        elif batch.dp_counts is not None and batch.expert_load is not None:
            # a CUDA graph's padding rows: computed like the others, but never recorded
            x_all, valid = x, torch.arange(x.shape[0], device=x.device) < batch.dp_counts[0]
        else:
            x_all, valid = x, None

        weights, logical = self.route(x_all)
        physical = self.expert_map.select(self.moe_layer, logical)
        if valid is not None and dp.world_size > 1:
            physical = torch.where(valid.unsqueeze(1), physical, -1)  # padding rows go nowhere
        if batch.expert_load is not None:
            batch.expert_load.record(self.moe_layer, physical if valid is None else torch.where(valid.unsqueeze(1), physical, -1))
        out = self.groups.world.all_reduce(self.run_local_experts(x_all, physical, weights))
        if dp.world_size > 1:
            start = dp.rank_in_group * batch.dp_pad
            out = out[start : start + x.shape[0]]
        return out

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> (weights [N, k] in x's dtype, logical expert ids [N, k])."""
        logits = F.linear(x, self.router)
        if self.router_bias is not None:  # benchmark-only skew (eplb.router_skew)
            logits = logits + self.router_bias
        if self.norm_topk_prob:
            # softmax is monotonic, and the renormalised top-k probabilities are the softmax of
            # the top-k logits (computed in float32, rounded to x's dtype once); the choices
            # need no order
            top, logical = torch.topk(logits, self.top_k, dim=-1, sorted=False)
            return torch.softmax(top, dim=-1), logical
        weights, logical = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float), self.top_k, dim=-1, sorted=False)
        return weights.to(x.dtype), logical

    def run_local_experts(self, x: torch.Tensor, physical: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Sum over this rank's expert slots of weight * expert(x); rows routed elsewhere get 0.

        x [N, H]; physical, weights [N, k] (physical -1 = padding row). The (token, choice)
        rows are sorted by slot and run through the expert MLP grouped by slot
        (expert_mlp.py), and nothing synchronises with the host, so the step can be
        captured in a CUDA graph.
        """
        n, k = physical.shape
        flat = physical.reshape(-1)
        if self.slots == self.expert_map.num_physical and self.groups.dp.world_size == 1:
            bucket = flat  # every choice is one of our slots and no row is padding
        else:
            local = flat - self.slot_start
            bucket = torch.where((local >= 0) & (local < self.slots), local, self.slots)  # others sort last
        # 16-bit keys: sorting takes half the time it takes on int64 ones
        keys, order = torch.sort(bucket.to(torch.int16), stable=True)
        ends = torch.searchsorted(keys, self.group_ends, out_int32=True)  # group g = sorted rows [ends[g-1], ends[g])
        y = expert_mlp(x, order // k, ends, self.w13, self.w2)
        # combine: out[t] = sum_j weights[t, j] * y[sorted row of (t, j)], a gather and a
        # weighted sum in one kernel (fp32 accumulation, no atomics: deterministic)
        sorted_row = torch.empty_like(order).scatter_(0, order, torch.arange(n * k, device=x.device))
        return F.embedding_bag(sorted_row.view(n, k), y, per_sample_weights=weights.to(y.dtype), mode="sum")

    def load(self, reader: CheckpointReader, names: ExpertNames) -> None:
        self.router.copy_(reader.read(names.router.format(layer=self.layer)))
        s, e = self.inter_start, self.inter_start + self.inter
        placement = self.expert_map.physical_to_logical_cpu[self.moe_layer]
        for slot in range(self.slots):
            expert = int(placement[self.slot_start + slot])
            fill = dict(layer=self.layer, expert=expert)
            gate = reader.read(names.gate.format(**fill), 0, s, e)
            up = reader.read(names.up.format(**fill), 0, s, e)
            self.w13[slot].copy_(torch.cat([gate, up]))
            self.w2[slot].copy_(reader.read(names.down.format(**fill), 1, s, e))


def zipf_router_bias(num_experts: int, skew: float, seed: int, device, dtype) -> torch.Tensor | None:
    """Router-logit bias making expert popularity Zipf-like: the i-th most popular expert
    (a fixed random order per ``seed``) gets probabilities scaled by (i + 1) ** -skew.
    For benchmarks on random weights only: it changes the model's outputs."""
    if skew == 0:
        return None
    order = torch.randperm(num_experts, generator=torch.Generator().manual_seed(seed))
    bias = torch.empty(num_experts)
    bias[order] = -skew * torch.log(torch.arange(1, num_experts + 1, dtype=torch.float))
    return bias.to(device=device, dtype=dtype)
