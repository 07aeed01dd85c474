"""Reference attention backend: paged KV cache in torch tensors, SDPA per sequence.

The CPU path and the reference the GPU backend is checked against. The KV
cache layout is FlashInfer's paged layout, so both backends share it, in the model's
dtype or in FP8 (``engine.kv_cache_dtype``: read back into the queries' dtype):
``[layers, num_blocks, 2 (k, v), block_slots, kv_heads, head_dim]``; for latent
attention (``forward_latent``) ``[layers, num_blocks, block_slots, latent + rope]``.

Context parallelism (``cp`` > 1): the token at position p lives on cp rank p % cp, in
slot (p % block_size) // cp of its block, so every rank holds 1/cp of every block
(``block_slots`` = block_size / cp) and the block tables are the same on every rank.
That rank also runs the token through the layers (context_split.py): ``forward`` gets
q/k/v of this rank's rows only. The queries are gathered over the cp group, each rank
attends every query of the step to the keys it holds, keeping the log-sum-exp of each
query's scores; the partial outputs are gathered and merged (see ``merge_partials``),
and each rank keeps its rows.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from raymoe.actors.engine.context_split import context_split
from raymoe.actors.engine.step import StepLayout
from raymoe.actors.models.batch import LatentPair
from raymoe.actors.models.fp8 import FP8_MAX
from raymoe.comm.group import GroupCoordinator

KeysValues = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def write_kv(
    cache: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor, *, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Store the step's k/v [T, kv_heads, D] into one layer's paged cache
    [num_blocks, 2, block_size, kv_heads, D] at (blocks[t], offsets[t]), cast to its dtype."""
    cache[blocks, 0, offsets] = to_cache_dtype(k, cache.dtype)
    cache[blocks, 1, offsets] = to_cache_dtype(v, cache.dtype)


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as an FP8 cache stores it (saturated to +-448, then rounded; scale 1), or cast."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(dtype) if dtype == torch.float8_e4m3fn else x.to(dtype)


def merge_partials(outs: torch.Tensor, lses: torch.Tensor) -> torch.Tensor:
    """Attention over a key set split into parts: outs [parts, T, H, D] (each part's
    softmax-weighted values), lses [parts, T, H] (each part's log-sum-exp of scores, -inf
    for a part with no key) -> the attention over all keys [T, H, D]."""
    weights = torch.softmax(lses, dim=0)  # each part's share of the total exp-sum
    return (weights.unsqueeze(-1) * outs).sum(dim=0)


class TorchAttention:
    def __init__(
        self,
        kv_cache: torch.Tensor,
        block_size: int,
        *,
        latent_dim: int = 0,
        sm_scale: float = 0.0,
        cp: Optional[GroupCoordinator] = None,
    ) -> None:
        """``latent_dim`` and ``sm_scale``: a latent cache's value width and softmax scale
        (forward_latent). ``cp``: the context-parallel group (None: no cp)."""
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.latent_dim, self.sm_scale = latent_dim, sm_scale
        self.cp = cp if cp is not None and cp.world_size > 1 else None
        self.cp_size, self.cp_rank = (cp.world_size, cp.rank_in_group) if self.cp else (1, 0)
        self.layout: StepLayout | None = None

    def plan(self, layout: StepLayout) -> None:
        """Per step, before the forward: where this rank's tokens' k/v go and which cached
        keys each sequence reads here."""
        self.layout = layout
        dev, n, r, bs = self.kv_cache.device, self.cp_size, self.cp_rank, self.block_size
        split = context_split(layout.positions.numpy(), n, r)
        mine = torch.from_numpy(split.own)
        slots = (layout.positions[mine] % bs) // n
        self._write = (layout.slot_blocks[mine].to(dev), slots.to(dev))
        self._split = None if n == 1 else (split.pad, torch.from_numpy(split.gathered_row).to(dev), mine.to(dev))
        self._reads = []
        for table, context in zip(layout.block_tables, layout.context_lens.tolist()):
            pos = torch.arange(r, max(context, r), n)  # empty when the context ends before r
            blocks = torch.from_numpy(table.astype("int64"))[pos // bs]
            self._reads.append((blocks.to(dev), ((pos % bs) // n).to(dev), pos.to(dev)))

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, heads, D], k/v [T, kv_heads, D] -> [T, heads, D]; writes k/v into the cache first."""
        assert self.layout is not None, "plan() before forward()"
        cache = self.kv_cache[layer]
        write_kv(cache, *self._write, k=k, v=v)
        group = q.shape[1] // k.shape[1]

        def keys_values(blocks: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            def read(kv: int) -> torch.Tensor:  # [heads, ctx, D] in q's dtype
                return cache[blocks, kv, slots].to(q.dtype).transpose(0, 1).repeat_interleave(group, dim=0)

            return read(0), read(1)

        return self._attend(q, q.shape[-1], keys_values, scale=None)

    def forward_latent(self, layer: int, q: LatentPair, kv: LatentPair) -> torch.Tensor:
        """-> [T, heads, L] (see models.batch.LatentAttention); writes kv into the latent cache
        first."""
        assert self.layout is not None, "plan() before forward_latent()"
        cache = self.kv_cache[layer]
        cache[self._write] = torch.cat(kv, dim=-1)
        q = torch.cat(q, dim=-1)  # [T, heads, L + R]

        def keys_values(blocks: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            keys = cache[blocks, slots].expand(q.shape[1], -1, -1)  # [heads, ctx, L + R]: one entry every head reads
            return keys, keys[..., : self.latent_dim]

        return self._attend(q, self.latent_dim, keys_values, scale=self.sm_scale)

    def _attend(self, q: torch.Tensor, value_dim: int, keys_values: KeysValues, scale: float | None) -> torch.Tensor:
        """Causal attention of each sequence's queries over its cached keys -> [rows, heads,
        value_dim] for this rank's rows ``q``."""
        assert self.layout is not None
        if self._split is not None:  # every query of the step, in step order
            assert self.cp is not None
            pad, gathered_row, _ = self._split
            q = self.cp.all_gather(F.pad(q, (0, 0, 0, 0, 0, pad - q.shape[0])))[gathered_row]
        starts = self.layout.query_start.tolist()
        contexts = self.layout.context_lens.tolist()
        out = q.new_empty(q.shape[0], q.shape[1], value_dim, dtype=q.dtype if self.cp is None else torch.float32)
        lse = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32, device=q.device) if self.cp else None
        for i, (blocks, slots, key_pos) in enumerate(self._reads):
            lo, hi = starts[i], starts[i + 1]
            keys, vals = keys_values(blocks, slots)
            # query j of the chunk sits at position context - n + j and sees keys up to it
            query_pos = contexts[i] - (hi - lo) + torch.arange(hi - lo, device=q.device)
            mask = key_pos[None, :] <= query_pos[:, None]
            qs = q[lo:hi].transpose(0, 1)  # [heads, n, D]
            if lse is None:
                o = F.scaled_dot_product_attention(qs, keys, vals, attn_mask=mask, scale=scale)
            else:
                o, lse[lo:hi] = partial_attention(qs, keys, vals, mask, scale)
            out[lo:hi] = o.transpose(0, 1)
        if self.cp is None:
            return out
        cp, own = self.cp, self._split[2]
        outs = cp.all_gather(out.unsqueeze(0)).view(cp.world_size, *out.shape)
        lses = cp.all_gather(lse.unsqueeze(0)).view(cp.world_size, *lse.shape)
        return merge_partials(outs[:, own], lses[:, own]).to(q.dtype)


def partial_attention(
    q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, mask: torch.Tensor, scale: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [H, n, D], keys [H, ctx, D], vals [H, ctx, Dv], mask [n, ctx] -> (softmax-weighted
    values [H, n, Dv], log-sum-exp of the scores [n, H]), float32; a query with no key here
    gets zeros and -inf."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.float() @ keys.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [H, n]
    probs = torch.exp(scores - lse.clamp(min=torch.finfo(torch.float32).min).unsqueeze(-1))
    return probs @ vals.float(), lse.transpose(0, 1)
