"""Building blocks shared by the architectures, built already sharded.

Every sharded layer takes its GroupCoordinator at build time and loads only its
own share from the checkpoint (``load(reader, ...)``). Projection weights are FP8 with
block scales (``weight_scale``) when built with an ``fp8_block`` (fp8.py). Shapes use T = tokens in
the step, H = hidden size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.actors.models import ops
from raymoe.actors.models.checkpoint import CheckpointReader
from raymoe.actors.models.fp8 import WeightSlice, weight_params
from raymoe.actors.models.linear import linear
from raymoe.actors.models.rope_spec import RopeSpec
from raymoe.actors.models.spec import ModelSpec
from raymoe.comm.group import GroupCoordinator


def split_evenly(total: int, parts: int, what: str, fix: str) -> int:
    if total % parts:
        raise ValueError(f"{what}={total} is not divisible by {parts}: {fix}")
    return total // parts


class BlockOutput(Protocol):
    """A block's output that the next RMSNorm finishes: whatever is left of it (a sum
    over ranks, the MoE combine) fused with the residual add and the norm where the
    kernels allow."""

    def add_rms_norm(
        self, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (RMSNorm(residual + output) * weight, residual + output)."""
        ...


@dataclass(frozen=True)
class ReplicaGather:
    """With data-parallel attention: the MoE layer's input is every replica's rows, each
    padded to ``rows``, gathered over ``dp`` (a group of the ``world``)."""

    world: GroupCoordinator
    dp: GroupCoordinator
    rows: int


@dataclass(frozen=True)
class PartialSum:
    """This rank's share ``x`` of an output summed over ``group``."""

    x: torch.Tensor
    group: GroupCoordinator

    def add_rms_norm(
        self, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.group.all_reduce_add_rms_norm(self.x, residual, weight, eps, add_rms_norm=ops.add_rms_norm)

    def add_rms_norm_gather(
        self, residual: torch.Tensor, weight: torch.Tensor, eps: float, gather: ReplicaGather
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As add_rms_norm, then every replica's normed rows gathered (``gather``): in one step
        where symmetric memory allows. -> ([replicas * rows, H], this replica's residual)."""
        return gather.world.all_reduce_add_rms_norm_gather(
            self.x,
            residual,
            weight,
            eps,
            attn=self.group,
            dp=gather.dp,
            rows=gather.rows,
            add_rms_norm=ops.add_rms_norm,
        )


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor | BlockOutput, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x), where x is a whole tensor or a block's
        output still to be finished (summed over ranks, combined). May reuse the inputs'
        storage."""
        if isinstance(x, torch.Tensor):
            return ops.add_rms_norm(x, residual, self.weight, self.eps)
        return x.add_rms_norm(residual, self.weight, self.eps)

    def load(self, reader: CheckpointReader, name: str) -> None:
        self.weight.copy_(reader.read(name))


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half layout) with a cos/sin table per position,
    over the first ``int(head_dim * partial_rotary_factor)`` dims of each head."""

    def __init__(self, head_dim: int, rope: RopeSpec, max_position: int, device: torch.device) -> None:
        super().__init__()
        dim = int(head_dim * rope.partial_rotary_factor)
        inv_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        if rope.kind == "linear":  # positions slowed by the factor
            inv_freq = inv_freq / rope.factor
        elif rope.kind == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, rope)
        elif rope.kind == "yarn":
            inv_freq = _yarn_inv_freq(dim, rope)
        freqs = torch.arange(max_position, dtype=torch.float)[:, None] * inv_freq[None, :]
        cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
        if rope.attention_factor != 1.0:
            cos_sin = cos_sin * rope.attention_factor
        self.register_buffer("cos_sin", cos_sin.to(device), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T]; q [T, heads, D], k [T, kv_heads, D] -> rotated q, k (in place on GPU)."""
        return ops.rotary_(positions, q, k, self.cos_sin)


def _yarn_inv_freq(dim: int, rope: RopeSpec) -> torch.Tensor:
    """YaRN (arXiv 2309.00071), as transformers computes it: frequencies that turn fewer than
    ``beta_slow`` times over the original context are interpolated (divided by ``factor``),
    those turning more than ``beta_fast`` times kept, with a linear ramp between."""

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(rope.original_max_position / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    extrapolation = 1 - ramp
    return (1.0 / (rope.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def _llama3_inv_freq(inv_freq: torch.Tensor, rope: RopeSpec) -> torch.Tensor:
    """Llama 3.1 frequency scaling: long wavelengths slowed by ``factor``, a smooth ramp between."""
    low_wavelen = rope.original_max_position / rope.low_freq_factor
    high_wavelen = rope.original_max_position / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split into equal row ranges over ``tp``."""

    def __init__(self, vocab: int, hidden: int, tp: GroupCoordinator, *, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.vocab, self.tp = vocab, tp
        self.rows = -(-vocab // tp.world_size)  # padded share: ceil(vocab / tp)
        self.start = tp.rank_in_group * self.rows
        self.stop = min(vocab, self.start + self.rows)
        self.weight = nn.Parameter(torch.zeros(self.rows, hidden, dtype=dtype, device=device), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] -> [T, H], summed over tp."""
        if self.tp.world_size == 1:
            return F.embedding(ids, self.weight)
        mine = (ids >= self.start) & (ids < self.stop)
        out = F.embedding((ids - self.start).clamp(0, self.rows - 1), self.weight)
        out = out * mine.unsqueeze(-1).to(out.dtype)
        return self.tp.all_reduce(out)

    def load(self, reader: CheckpointReader, name: str) -> None:
        if self.stop > self.start:
            self.weight[: self.stop - self.start].copy_(reader.read(name, 0, self.start, self.stop, size=self.vocab))
        else:  # a share wholly past the vocabulary
            reader.mark_used(name)


class ParallelLMHead(nn.Module):
    """Vocab-parallel output projection. ``forward`` gives this rank's shard of the
    logits; ``gather`` the full-vocabulary logits from the shards (a collective over tp
    of N x vocab values), ``greedy`` the argmax tokens from them (a collective of N x 2)."""

    def __init__(self, embedding: VocabParallelEmbedding, tied: bool, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.embedding = embedding
        self.tied = tied
        if not tied:
            self.weight = nn.Parameter(
                torch.zeros_like(embedding.weight, dtype=dtype, device=device), requires_grad=False
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, H] -> this rank's logits [N, rows of its vocabulary share] (x's dtype;
        the last share's padding rows past the vocabulary included)."""
        return linear(x, self.embedding.weight if self.tied else self.weight)

    def gather(self, shard: torch.Tensor) -> torch.Tensor:
        """Every rank's ``forward`` output -> logits [N, vocab], float32."""
        tp, n = self.embedding.tp, shard.shape[0]
        if tp.world_size > 1:
            # gathered along rows (no transposed copy before the collective), then put side
            # by side and widened to float32 in one copy
            shards = tp.all_gather(shard).view(tp.world_size, n, shard.shape[-1])
            logits = torch.empty(n, tp.world_size, shard.shape[-1], dtype=torch.float, device=shard.device)
            logits.copy_(shards.transpose(0, 1))
            shard = logits.view(n, tp.world_size * shard.shape[-1])
        return shard[..., : self.embedding.vocab].float()

    def greedy(self, shard: torch.Tensor) -> torch.Tensor:
        """Every rank's ``forward`` output -> the argmax token of each row [N] int64, the
        same as ``gather(shard).argmax(-1)`` (ties: the lowest id) without gathering the
        logits: each rank's best (value, id) pair is gathered, and the best of those wins."""
        e = self.embedding
        shard = shard[..., : max(e.stop - e.start, 0)]  # the last share's padding rows never win
        if e.tp.world_size == 1:
            return shard.argmax(dim=-1)
        n = shard.shape[0]
        if shard.shape[-1]:
            local = shard.argmax(dim=-1, keepdim=True)
            # float64 holds every bf16/fp32 value and every token id exactly
            best = torch.cat([shard.gather(-1, local).double(), (local + e.start).double()], dim=-1)
        else:  # a share wholly past the vocabulary: never the best
            best = torch.full((n, 2), float("-inf"), dtype=torch.double, device=shard.device)
        every = e.tp.all_gather(best).view(e.tp.world_size, n, 2)
        winner = every[..., 0].argmax(dim=0, keepdim=True)  # ties: the lowest rank, i.e. the lowest id
        return every[..., 1].gather(0, winner).squeeze(0).long()

    def load(self, reader: CheckpointReader, name: str) -> None:
        e = self.embedding
        if self.tied:
            return
        if e.stop > e.start:
            self.weight[: e.stop - e.start].copy_(reader.read(name, 0, e.start, e.stop, size=e.vocab))
        else:
            reader.mark_used(name)


class RowParallelLinear(nn.Module):
    """y = x W^T (+ b): input dim split over ``group``. ``forward`` returns this rank's
    share of y, still to be summed over the group (see PartialSum)."""

    def __init__(
        self, in_local: int, out: int, group: GroupCoordinator, *, bias: bool, dtype, device, fp8_block=None
    ) -> None:
        super().__init__()
        self.group, self.fp8_block = group, fp8_block
        self.weight, self.weight_scale = weight_params((out, in_local), dtype=dtype, device=device, fp8_block=fp8_block)
        self.bias = nn.Parameter(torch.zeros(out, dtype=dtype, device=device), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, scale=self.weight_scale, block=self.fp8_block)
        return y + self.bias if self.bias is not None and self.group.is_first else y  # the bias counted once

    def load(self, reader: CheckpointReader, prefix: str, col_start: int) -> None:
        cols = self.weight.shape[1]
        whole = cols * self.group.world_size  # the input dim is split evenly over the group
        part = reader.read_weight(
            prefix + "weight", 1, col_start, col_start + cols, fp8_block=self.fp8_block, size=whole
        )
        part.store(self.weight, self.weight_scale, self.fp8_block)
        if self.bias is not None:
            self.bias.copy_(reader.read(prefix + "bias"))


class QKVProjection(nn.Module):
    """Fused q/k/v projection of this rank's heads: query heads split over tp; KV
    heads split too, or replicated when tp exceeds their number."""

    def __init__(self, spec: ModelSpec, tp: GroupCoordinator, dtype, device, fp8_block=None) -> None:
        super().__init__()
        self.fp8_block = fp8_block
        n, r = tp.world_size, tp.rank_in_group
        self.heads = split_evenly(spec.num_heads, n, "num_attention_heads", "choose a tp that divides it")
        if spec.num_kv_heads >= n:
            self.kv_heads = split_evenly(spec.num_kv_heads, n, "num_key_value_heads", "choose a tp that divides it")
            self.kv_start = r * self.kv_heads
        else:
            split_evenly(n, spec.num_kv_heads, "tp", "tp must be a multiple of num_key_value_heads when larger")
            self.kv_heads, self.kv_start = 1, r // (n // spec.num_kv_heads)
        self.q_start = r * self.heads
        self.head_dim = spec.head_dim
        self.num_heads, self.num_kv_heads = spec.num_heads, spec.num_kv_heads  # the whole model's
        rows = (self.heads + 2 * self.kv_heads) * spec.head_dim
        self.weight, self.weight_scale = weight_params(
            (rows, spec.hidden_size), dtype=dtype, device=device, fp8_block=fp8_block
        )
        self.bias = (
            nn.Parameter(torch.zeros(rows, dtype=dtype, device=device), requires_grad=False) if spec.qkv_bias else None
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, H] -> q [T, heads, D], k [T, kv_heads, D], v [T, kv_heads, D]."""
        qkv = linear(x, self.weight, self.bias, scale=self.weight_scale, block=self.fp8_block)
        d = self.head_dim
        q, k, v = qkv.split([self.heads * d, self.kv_heads * d, self.kv_heads * d], dim=-1)
        return q.view(-1, self.heads, d), k.view(-1, self.kv_heads, d), v.view(-1, self.kv_heads, d)

    def load(self, reader: CheckpointReader, prefix: str) -> None:
        d = self.head_dim
        parts = [  # (projection, this rank's first head, its heads, the model's heads)
            ("q_proj.", self.q_start, self.heads, self.num_heads),
            ("k_proj.", self.kv_start, self.kv_heads, self.num_kv_heads),
            ("v_proj.", self.kv_start, self.kv_heads, self.num_kv_heads),
        ]
        slices = [
            reader.read_weight(prefix + p + "weight", 0, s * d, (s + c) * d, fp8_block=self.fp8_block, size=n * d)
            for p, s, c, n in parts
        ]
        WeightSlice.cat(slices, 0, prefix + "q/k/v_proj").store(self.weight, self.weight_scale, self.fp8_block)
        if self.bias is not None:
            biases = [reader.read(prefix + p + "bias", 0, s * d, (s + c) * d, size=n * d) for p, s, c, n in parts]
            self.bias.copy_(torch.cat(biases))


class DenseMLP(nn.Module):
    """SwiGLU MLP, intermediate dim split over tp: down(silu(gate(x)) * up(x))."""

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        tp: GroupCoordinator,
        *,
        dtype,
        device,
        fp8_block=None,
        field: str = "intermediate_size",
    ) -> None:
        """field: the config.json field(s) ``intermediate`` comes from, for the error a tp that
        does not divide it raises."""
        super().__init__()
        self.intermediate = intermediate
        self.local = split_evenly(intermediate, tp.world_size, field, "choose a tp that divides it")
        self.start = tp.rank_in_group * self.local
        self.fp8_block = fp8_block
        self.gate_up, self.gate_up_scale = weight_params(
            (2 * self.local, hidden), dtype=dtype, device=device, fp8_block=fp8_block
        )
        self.down = RowParallelLinear(
            self.local, hidden, tp, bias=False, dtype=dtype, device=device, fp8_block=fp8_block
        )

    def forward(self, x: torch.Tensor) -> PartialSum:
        gate_up = linear(x, self.gate_up, scale=self.gate_up_scale, block=self.fp8_block)
        return PartialSum(self.down(ops.silu_and_mul(gate_up)), self.down.group)

    def load(self, reader: CheckpointReader, gate: str, up: str, down_prefix: str) -> None:
        s, e = self.start, self.start + self.local
        fp8, whole = self.fp8_block, self.intermediate
        parts = [reader.read_weight(name, 0, s, e, fp8_block=fp8, size=whole) for name in (gate, up)]
        WeightSlice.cat(parts, 0, f"{gate} and {up}").store(self.gate_up, self.gate_up_scale, self.fp8_block)
        self.down.load(reader, down_prefix, s)
