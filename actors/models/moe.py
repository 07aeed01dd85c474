"""Expert-parallel MoE layer.

Token dispatch (chosen for simplicity and exactness; the fast path is a later
concern): attention leaves every rank of a DP replica holding that replica's
tokens. The MoE layer

1. takes the tokens of every DP replica, gathered over the ``dp`` group by the norm
   before it (each padded to the step's largest replica; in the norm's step, through
   the world's symmetric buffer, where it allows), so every rank sees every token of
   the step;
2. routes them (router replicated on every rank) to logical experts, maps each
   choice to a physical expert slot through the ExpertMap and groups the choices
   by this rank's slots (moe_dispatch.py);
3. runs the experts whose slots this rank holds -- its EP share, with its
   ``moe_tp`` slice of each expert's intermediate dimension (expert_mlp.py) --
   and sums each token's choices weighted by the router probabilities
   (moe_combine.py, done by the next norm: see 4.);
4. leaves the combine and the sum of the partial outputs over the world (the world
   is exactly ep x moe_tp shares, each held by one rank) to the next norm, which
   fuses them with its residual add (ExpertOutputs); with dp > 1 the layer combines
   them itself and the next norm sums only its replica's rows (ReplicaRowsSum): in one
   step from symmetric memory where it allows, else a reduce-scatter over dp, then an
   all-reduce over the replica's attention ranks.

The layer never looks at which rank holds a logical expert except through the
ExpertMap, so load balancing can move and replicate experts without touching it.

Shared experts (Qwen2-MoE, GLM-4.5, DeepSeek) are a dense MLP every token goes through,
split over ``tp`` like the dense MLP and outside the ExpertMap (load balancing moves
routed experts only). Each rank adds its share of their output for its own tokens to its
share of the routed output for the sum over the world to finish (with dp > 1 the share
lands on this replica's rows).

Context parallelism (cp > 1): each cp rank runs its own share of its replica's tokens
(ForwardBatch.split); the layer gathers them over cp before gathering over dp, and hands
each rank back its rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.actors.models import ops
from raymoe.actors.models.batch import ForwardBatch
from raymoe.actors.models.checkpoint import CheckpointReader
from raymoe.actors.models.expert_map import ExpertMap
from raymoe.actors.models.expert_mlp import expert_mlp
from raymoe.actors.models.fp8 import WeightSlice, weight_params
from raymoe.actors.models.layers import BlockOutput, DenseMLP, PartialSum, ReplicaGather, split_evenly
from raymoe.actors.models.linear import linear
from raymoe.actors.models.moe_combine import combine, combine_add_rms_norm
from raymoe.actors.models.moe_dispatch import Dispatch, dispatch
from raymoe.actors.models.registry import ExpertNames
from raymoe.actors.models.spec import ModelSpec
from raymoe.comm.group import GroupCoordinator
from raymoe.comm.groups import Groups

log = logging.getLogger(__name__)


class MoE(nn.Module):
    def __init__(
        self,
        spec: ModelSpec,
        layer: int,
        moe_layer: int,
        groups: Groups,
        *,
        expert_map: ExpertMap,
        dtype,
        device,
        router_skew: float = 0.0,
        fp8_block: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        assert spec.moe is not None
        self.fp8_block = fp8_block
        self.layer, self.moe_layer = layer, moe_layer
        self.top_k, self.norm_topk_prob = spec.moe.top_k, spec.moe.norm_topk_prob
        self.groups, self.expert_map = groups, expert_map
        self.slots = expert_map.num_physical // groups.ep.world_size
        self.slot_start = groups.ep.rank_in_group * self.slots
        self.inter = split_evenly(
            spec.moe.intermediate_size,
            groups.moe_tp.world_size,
            "moe_intermediate_size",
            "choose an ep so that world_size / ep (moe_tp) divides it",
        )
        self.inter_start = groups.moe_tp.rank_in_group * self.inter
        self.whole_inter = spec.moe.intermediate_size
        h = spec.hidden_size
        self.grouped = spec.moe.grouped
        # grouped routing scores in float32, as transformers keeps its router (and bias) in float32
        router_dtype = torch.float32 if self.grouped is not None else dtype
        self.router = nn.Parameter(
            torch.zeros(spec.moe.num_experts, h, dtype=router_dtype, device=device), requires_grad=False
        )
        self.correction_bias = (
            nn.Parameter(torch.zeros(spec.moe.num_experts, device=device), requires_grad=False)
            if self.grouped is not None and self.grouped.scoring == "sigmoid"
            else None
        )
        self.shared = (
            DenseMLP(
                h,
                spec.moe.shared_intermediate_size,
                groups.tp,
                dtype=dtype,
                device=device,
                fp8_block=fp8_block,
                field="the shared experts' width (shared_expert_intermediate_size, or n_shared_experts x "
                "moe_intermediate_size)",
            )
            if spec.moe.shared_intermediate_size
            else None
        )
        self.shared_gate = (
            nn.Parameter(torch.zeros(1, h, dtype=dtype, device=device), requires_grad=False)
            if spec.moe.shared_gate
            else None
        )
        # the shared experts' share is summed with the routed ones over the world
        fmt = dict(dtype=dtype, device=device, fp8_block=fp8_block)
        self.w13, self.w13_scale = weight_params((self.slots, 2 * self.inter, h), **fmt)
        self.w2, self.w2_scale = weight_params((self.slots, h, self.inter), **fmt)
        assert self.slots < 2**15, "slot ids are sorted as int16"
        self.router_bias = zipf_router_bias(spec.moe.num_experts, router_skew, seed=layer, device=device, dtype=dtype)

    def input_gather(self, batch: ForwardBatch) -> ReplicaGather | None:
        """With data-parallel attention (and no context parallelism), how the layer takes its
        input: every replica's rows gathered, which the norm before it does in the same step;
        None: this replica's rows."""
        if self.groups.dp.world_size == 1 or batch.split is not None:
            return None
        return ReplicaGather(self.groups.world, self.groups.dp, batch.dp_pad)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> BlockOutput | torch.Tensor:
        """x [T, H] (this DP replica's tokens, or every replica's as ``input_gather`` says) ->
        this rank's expert outputs for the next norm to combine and sum (ExpertOutputs); with
        dp > 1 combined, for the next norm to sum this replica's rows (ReplicaRowsSum); with
        cp > 1 the whole [T, H]."""
        dp = self.groups.dp
        if batch.split is not None:
            return self._forward_split(x, batch)
        if dp.world_size > 1:
            pad, tokens = batch.dp_pad, batch.input_ids.shape[0]
            start = dp.rank_in_group * pad
            assert batch.dp_counts is not None and pad >= tokens and x.shape[0] == dp.world_size * pad
            x_all, x = x, x[start : start + tokens]
            row = torch.arange(x_all.shape[0], device=x.device)
            valid = (row % pad) < batch.dp_counts[row // pad]
        elif batch.dp_counts is not None:
            # a CUDA graph's padding rows go to no expert (nor the expert load): all of them are
            # token 0 at position 0, which would pile onto one top-k of experts
            x_all, valid = x, torch.arange(x.shape[0], device=x.device) < batch.dp_counts[0]
        else:
            x_all, valid = x, None

        y, d = self._experts(x_all, valid, batch)
        all_local = self.slots == self.expert_map.num_physical and valid is None  # every row is one of our slots
        shared = self._shared(x)
        if dp.world_size == 1:
            return ExpertOutputs(y, d, all_local, self.groups.world, shared=shared)
        out = combine(y, d.sorted_row, d.weights, d.ends, all_local=all_local)
        if shared is not None:
            out[start : start + x.shape[0]] += shared
        return ReplicaRowsSum(out, start, x.shape[0], self.groups)

    def _forward_split(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Context parallelism: x [rows, H] is this rank's share of its replica's rows. Every
        cp member's rows, then (dp > 1) every replica's, are gathered; after the experts the
        replica's rows are summed over dp (reduce-scatter) and over its attention ranks, and
        this rank keeps its own."""
        split, dp = batch.split, self.groups.dp
        assert split is not None
        x_all = self.groups.cp.all_gather(F.pad(x, (0, 0, 0, split.pad - x.shape[0])))
        if dp.world_size > 1:
            x_all = dp.all_gather(F.pad(x_all, (0, 0, 0, split.replica_rows - x_all.shape[0])))
        y, d = self._experts(x_all, split.valid, batch)
        out = combine(y, d.sorted_row, d.weights, d.ends, all_local=False)
        shared = self._shared(x)
        if shared is not None:  # this rank's tp share, on its own rows
            start = dp.rank_in_group * split.replica_rows + split.start if dp.world_size > 1 else split.start
            out[start : start + x.shape[0]] += shared
        if dp.world_size > 1:
            out = dp.reduce_scatter(out)
        return self.groups.attn.all_reduce(out)[split.start : split.start + x.shape[0]]

    def _experts(
        self, x_all: torch.Tensor, valid: torch.Tensor | None, batch: ForwardBatch
    ) -> tuple[torch.Tensor, Dispatch]:
        """Route the gathered rows ``x_all`` (``valid``: the real ones; None: all) and run this
        rank's experts -> (their outputs grouped by slot, the dispatch that grouped them)."""
        logits = linear(x_all.float() if self.grouped is not None else x_all, self.router)
        if self.router_bias is not None:  # benchmark-only skew (eplb.router_skew)
            logits = logits + self.router_bias
        d = self._dispatch(logits, valid)
        if batch.expert_load is not None:
            batch.expert_load.record(self.moe_layer, d.physical)
        y = expert_mlp(
            x_all,
            d.rows,
            d.ends,
            w13=self.w13,
            w2=self.w2,
            groups=d.groups,
            all_slots=self.expert_map.num_physical,
            w13_scale=self.w13_scale,
            w2_scale=self.w2_scale,
            fp8_block=self.fp8_block,
        )
        return y, d

    def expert_tensors(self) -> list[torch.Tensor]:
        """The tensors that hold one entry per expert slot (what a moved expert carries): the
        weights, and their block scales when FP8."""
        return [t for t in (self.w13, self.w13_scale, self.w2, self.w2_scale) if t is not None]

    def _dispatch(self, logits: torch.Tensor, valid: torch.Tensor | None) -> Dispatch:
        emap = self.expert_map
        tables = dict(
            logical_to_physical=emap.logical_to_physical[self.moe_layer],
            replica_count=emap.replica_count[self.moe_layer],
            num_physical=emap.num_physical,
            slot_start=self.slot_start,
            slots=self.slots,
            valid=valid,
        )
        rule = dict(norm_topk_prob=self.norm_topk_prob, grouped=self.grouped, correction_bias=self.correction_bias)
        return dispatch(logits, self.top_k, **rule, **tables)

    def _shared(self, x: torch.Tensor) -> torch.Tensor | None:
        """x [T, H] -> this rank's share of the shared experts' output [T, H] (a sum over tp), or
        None."""
        if self.shared is None:
            return None
        out = self.shared(x).x
        return out * torch.sigmoid(linear(x, self.shared_gate)) if self.shared_gate is not None else out

    def load(self, reader: CheckpointReader, names: ExpertNames) -> None:
        """This rank's experts, the router and the shared experts; the other ranks' experts
        are marked used (the reader checks that every tensor has a reader)."""
        self.router.copy_(reader.read(names.router.format(layer=self.layer)))
        if self.correction_bias is not None:
            self.correction_bias.copy_(reader.read(names.router_bias.format(layer=self.layer)))
        if self.shared is not None:
            shared = names.shared.format(layer=self.layer)
            self.shared.load(reader, shared + "gate_proj.weight", shared + "up_proj.weight", shared + "down_proj.")
        if self.shared_gate is not None:
            self.shared_gate.copy_(reader.read(names.shared_gate.format(layer=self.layer)))
        s, e = self.inter_start, self.inter_start + self.inter
        whole = self.whole_inter
        physical_to_logical = self.expert_map.physical_to_logical_cpu[self.moe_layer]
        fp8 = self.fp8_block
        for slot in range(self.slots):
            expert = int(physical_to_logical[self.slot_start + slot])
            fill = dict(layer=self.layer, expert=expert)
            gate_up = [
                reader.read_weight(n.format(**fill), 0, s, e, fp8_block=fp8, size=whole) for n in (names.gate, names.up)
            ]
            w13_scale = self.w13_scale[slot] if fp8 else None
            WeightSlice.cat(gate_up, 0, names.gate.format(**fill)).store(self.w13[slot], w13_scale, fp8)
            down = reader.read_weight(names.down.format(**fill), 1, s, e, fp8_block=fp8, size=whole)
            down.store(self.w2[slot], self.w2_scale[slot] if fp8 else None, fp8)
        for expert in range(self.expert_map.num_logical):
            for name in (names.gate, names.up, names.down):
                reader.mark_used(name.format(layer=self.layer, expert=expert))


@dataclass(frozen=True)
class ExpertOutputs:
    """This rank's expert outputs ``y`` of a step, grouped as ``dispatch`` says, before
    the combine and the sum over the world, and its share of the shared experts' output
    (``shared``, a sum over tp, which is the world here). The next norm finishes them
    (BlockOutput): on one rank the combine, add and norm are one kernel; over several,
    the combine writes straight into the buffer the sum + add + norm reads (where it has one)."""

    y: torch.Tensor
    dispatch: Dispatch
    all_local: bool
    world: GroupCoordinator
    shared: torch.Tensor | None = None

    def add_rms_norm(
        self, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y, d = self.y, self.dispatch
        if self.world.world_size == 1:
            return combine_add_rms_norm(
                y,
                d.sorted_row,
                d.weights,
                d.ends,
                residual=residual,
                weight=weight,
                eps=eps,
                all_local=self.all_local,
                shared=self.shared,
            )
        buffer = self.world.partial_buffer(residual)
        out = combine(y, d.sorted_row, d.weights, d.ends, all_local=self.all_local, out=buffer)
        if self.shared is not None:
            out += self.shared
        return PartialSum(out, self.world).add_rms_norm(residual, weight, eps)


@dataclass(frozen=True)
class ReplicaRowsSum:
    """With dp > 1: every replica's rows of this rank's expert outputs ``out`` [dp * pad, H],
    of which the next norm takes the sum over the world of this replica's rows [first_row,
    first_row + rows) (BlockOutput): in one step from symmetric memory where it allows,
    else a reduce-scatter over dp (each replica's ranks get its rows) and an all-reduce
    over the replica's attention ranks."""

    out: torch.Tensor
    first_row: int
    rows: int
    groups: Groups

    def add_rms_norm(
        self, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.groups

        def reduce_rows(out: torch.Tensor) -> torch.Tensor:
            return g.attn.all_reduce(g.dp.reduce_scatter(out))[: self.rows]

        return g.world.reduce_rows_add_rms_norm(
            self.out, self.first_row, residual, weight, eps, reduce_rows=reduce_rows, add_rms_norm=ops.add_rms_norm
        )


def zipf_router_bias(num_experts: int, skew: float, *, seed: int, device, dtype) -> torch.Tensor | None:
    """Router-logit bias making expert popularity Zipf-like: the i-th most popular expert
    (a fixed random order per ``seed``) gets probabilities scaled by (i + 1) ** -skew.
    For benchmarks on random weights only: it changes the model's outputs."""
    if skew == 0:
        return None
    order = torch.randperm(num_experts, generator=torch.Generator().manual_seed(seed))
    bias = torch.empty(num_experts)
    bias[order] = -skew * torch.log(torch.arange(1, num_experts + 1, dtype=torch.float))
    return bias.to(device=device, dtype=dtype)
