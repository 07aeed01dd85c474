"""DeepSeek's multi-head latent attention (MLA), heads split over tp, computed absorbed.

Each token's keys and values come from one shared latent: ``kv_lora_rank`` values
(normed) plus one rotary key of ``qk_rope_head_dim`` that every head shares; the
cache holds only those (a latent paged cache, see attention_torch.py). Head h's key
is ``W_UK[h] @ latent`` plus the rotary key, its value ``W_UV[h] @ latent``
(kv_b_proj). Absorbed, the attention never expands the latent per head: the query's
non-rotary part goes through ``W_UK[h]^T`` into latent space, every head attends to
the latent directly (multi-query attention with a ``kv_lora_rank + qk_rope_head_dim``
key whose first ``kv_lora_rank`` dims are the value), and ``W_UV[h]`` maps each
head's output back to its value space before o_proj. The scores equal the
non-absorbed ones in exact arithmetic.

Interleaved rotary (checkpoints rotating pairs (x0, x1), (x2, x3), ...) is turned into
rotate-half at load by permuting the rotary rows of the query and key projections:
q.k only sees the dims' pairing, not their order.
"""

from __future__ import annotations

import torch
from torch import nn

from raymoe.actors.models import ops
from raymoe.actors.models.batch import ForwardBatch, LatentPair
from raymoe.actors.models.checkpoint import CheckpointReader
from raymoe.actors.models.fp8 import WeightSlice, weight_params
from raymoe.actors.models.layers import PartialSum, RMSNorm, RotaryEmbedding, RowParallelLinear, split_evenly
from raymoe.actors.models.linear import linear
from raymoe.actors.models.spec import LatentAttentionSpec, ModelSpec
from raymoe.comm.groups import Groups

LATENT_NORM_EPS = 1e-6


class LatentAttention(nn.Module):
    def __init__(
        self, spec: ModelSpec, layer: int, groups: Groups, rotary: RotaryEmbedding, *, dtype, device, fp8_block=None
    ) -> None:
        super().__init__()
        m = spec.mla
        assert m is not None
        tp = groups.tp
        self.layer, self.rotary, self.mla = layer, rotary, m
        self.heads = split_evenly(spec.num_heads, tp.world_size, "num_attention_heads", "choose a tp that divides it")
        self.head_start = tp.rank_in_group * self.heads
        self.num_heads = spec.num_heads
        self.qk_dim = m.qk_nope_head_dim + m.qk_rope_head_dim
        self.latent_width = m.kv_lora_rank + m.qk_rope_head_dim
        # one GEMM reads x for the query's first projection and the latent (q_a_proj or this
        # rank's q_proj rows, then kv_a_proj_with_mqa)
        self.q_in = m.q_lora_rank or self.heads * self.qk_dim
        self.fp8_block = fp8_block
        fmt = dict(dtype=dtype, device=device, fp8_block=fp8_block)
        self.in_proj, self.in_proj_scale = weight_params((self.q_in + self.latent_width, spec.hidden_size), **fmt)
        # the latent norms' eps is fixed, not rms_norm_eps: transformers' and DeepSeek's own models
        eps = LATENT_NORM_EPS
        self.q_a_norm = RMSNorm(m.q_lora_rank, eps, dtype, device) if m.q_lora_rank else None
        self.q_b, self.q_b_scale = (
            weight_params((self.heads * self.qk_dim, m.q_lora_rank), **fmt) if m.q_lora_rank else (None, None)
        )
        self.kv_a_norm = RMSNorm(m.kv_lora_rank, eps, dtype, device)
        self.w_uk = _weight(self.heads, m.qk_nope_head_dim, m.kv_lora_rank, dtype=dtype, device=device)
        self.w_uv_t = _weight(self.heads, m.kv_lora_rank, m.v_head_dim, dtype=dtype, device=device)
        self.o_proj = RowParallelLinear(
            self.heads * m.v_head_dim, spec.hidden_size, tp, bias=False, dtype=dtype, device=device, fp8_block=fp8_block
        )

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> PartialSum:
        m, t = self.mla, x.shape[0]
        fp8 = self.fp8_block
        q_in, latent = linear(x, self.in_proj, scale=self.in_proj_scale, block=fp8).split(
            [self.q_in, self.latent_width], dim=-1
        )
        if self.q_b is not None:
            q_in = linear(self.q_a_norm(q_in.contiguous()), self.q_b, scale=self.q_b_scale, block=fp8)
        q = q_in.view(t, self.heads, self.qk_dim)
        norm = self.kv_a_norm
        q_rope, kv_latent, k_rope = ops.latent_norm_rotary(
            batch.positions,
            q,
            latent,
            norm_weight=norm.weight,
            eps=norm.eps,
            cos_sin=self.rotary.cos_sin,
            nope_dim=m.qk_nope_head_dim,
        )
        # the bmms run head-major; their token-major views go on without copies
        q_latent = torch.bmm(q[..., : m.qk_nope_head_dim].transpose(0, 1), self.w_uk).transpose(0, 1)
        out = batch.attention.forward_latent(self.layer, LatentPair(q_latent, q_rope), LatentPair(kv_latent, k_rope))
        values = x.new_empty(t, self.heads, m.v_head_dim)
        torch.bmm(out.transpose(0, 1), self.w_uv_t, out=values.transpose(0, 1))
        return PartialSum(self.o_proj(values.view(t, self.heads * m.v_head_dim)), self.o_proj.group)

    def load(self, reader: CheckpointReader, prefix: str) -> None:
        m, fp8 = self.mla, self.fp8_block
        h0, h1 = self.head_start, self.head_start + self.heads
        latent = reader.read_weight(prefix + "kv_a_proj_with_mqa.weight", fp8_block=fp8)
        latent = latent.reorder_rows(_rope_halves_order(self.latent_width, m), prefix + "kv_a_proj_with_mqa.weight")
        query_rows = (0, h0 * self.qk_dim, h1 * self.qk_dim)
        query_size = self.num_heads * self.qk_dim  # the whole model's query rows
        query_order = torch.cat([_rope_halves_order(self.qk_dim, m) + h * self.qk_dim for h in range(self.heads)])
        if self.q_b is not None:
            q_in = reader.read_weight(prefix + "q_a_proj.weight", fp8_block=fp8)
            self.q_a_norm.load(reader, prefix + "q_a_layernorm.weight")
            q_b = reader.read_weight(prefix + "q_b_proj.weight", *query_rows, fp8_block=fp8, size=query_size)
            q_b.reorder_rows(query_order, prefix + "q_b_proj.weight").store(self.q_b, self.q_b_scale, fp8)
        else:
            q_in = reader.read_weight(prefix + "q_proj.weight", *query_rows, fp8_block=fp8, size=query_size)
            q_in = q_in.reorder_rows(query_order, prefix + "q_proj.weight")
        WeightSlice.cat([q_in, latent], 0, prefix + "q and kv_a projections").store(
            self.in_proj, self.in_proj_scale, fp8
        )
        self.kv_a_norm.load(reader, prefix + "kv_a_layernorm.weight")
        per_head = m.qk_nope_head_dim + m.v_head_dim
        kv_b = reader.read(prefix + "kv_b_proj.weight", 0, h0 * per_head, h1 * per_head, size=self.num_heads * per_head)
        kv_b = kv_b.view(self.heads, per_head, -1)
        self.w_uk.copy_(kv_b[:, : m.qk_nope_head_dim])
        self.w_uv_t.copy_(kv_b[:, m.qk_nope_head_dim :].transpose(1, 2))
        self.o_proj.load(reader, prefix + "o_proj.", h0 * m.v_head_dim)


def _rope_halves_order(rows: int, mla: LatentAttentionSpec) -> torch.Tensor:
    """The row order of a [rows, in] weight whose last qk_rope_head_dim rows make a rotary
    vector: those rows from interleaved pairs to rotate-half (evens, then odds) when the
    checkpoint interleaves, every other row in place."""
    order = torch.arange(rows)
    if mla.rope_interleaved:
        rope = order[rows - mla.qk_rope_head_dim :]
        order = torch.cat([order[: rows - mla.qk_rope_head_dim], rope[0::2], rope[1::2]])
    return order


def _weight(*shape: int, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape, dtype=dtype, device=device), requires_grad=False)
