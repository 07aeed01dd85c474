"""Reference attention backend: paged KV cache in torch tensors, SDPA per sequence.

The CPU path and the reference the GPU backend is checked against. The KV
cache layout is FlashInfer's paged layout, so both backends share it:
``[layers, num_blocks, 2 (k, v), block_size, kv_heads, head_dim]``; for latent
attention (``forward_latent``) ``[layers, num_blocks, block_size, latent + rope]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raymoe.actors.engine.step import StepLayout


def write_kv(
    cache: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor, *, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Store the step's k/v [T, kv_heads, D] into one layer's paged cache
    [num_blocks, 2, block_size, kv_heads, D] at (blocks[t], offsets[t])."""
    cache[blocks, 0, offsets] = k
    cache[blocks, 1, offsets] = v


class TorchAttention:
    def __init__(self, kv_cache: torch.Tensor, block_size: int, *, latent_dim: int = 0, sm_scale: float = 0.0) -> None:
        """``latent_dim`` and ``sm_scale``: a latent cache's value width and softmax scale (forward_latent)."""
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.latent_dim, self.sm_scale = latent_dim, sm_scale
        self.layout: StepLayout | None = None

    def plan(self, layout: StepLayout) -> None:
        """Per step, before the forward: where each token's k/v goes and what each sequence reads."""
        self.layout = layout
        dev = self.kv_cache.device
        self._write = (layout.slot_blocks.to(dev), layout.slot_offsets.to(dev))
        self._reads = []
        for table, context in zip(layout.block_tables, layout.context_lens.tolist()):
            pos = torch.arange(context)
            blocks = torch.from_numpy(table.astype("int64"))[pos // self.block_size]
            self._reads.append((blocks.to(dev), (pos % self.block_size).to(dev)))

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, heads, D], k/v [T, kv_heads, D] -> [T, heads, D]; writes k/v into the cache first."""
        assert self.layout is not None, "plan() before forward()"
        cache = self.kv_cache[layer]
        write_kv(cache, *self._write, k=k, v=v)
        group = q.shape[1] // k.shape[1]

        def keys_values(rb: torch.Tensor, ro: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            keys = cache[rb, 0, ro].transpose(0, 1).repeat_interleave(group, dim=0)  # [heads, ctx, D]
            return keys, cache[rb, 1, ro].transpose(0, 1).repeat_interleave(group, dim=0)

        return self._attend(q, torch.empty_like(q), keys_values, scale=None)

    def forward_latent(self, layer: int, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """q [T, heads, L + R], kv [T, L + R] -> [T, heads, L] (see models.batch.LatentAttention);
        writes kv into the latent cache first."""
        assert self.layout is not None, "plan() before forward_latent()"
        cache = self.kv_cache[layer]
        cache[self._write] = kv

        def keys_values(rb: torch.Tensor, ro: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            keys = cache[rb, ro].expand(q.shape[1], -1, -1)  # [heads, ctx, L + R]: one entry every head reads
            return keys, keys[..., : self.latent_dim]

        out = q.new_empty(q.shape[0], q.shape[1], self.latent_dim)
        return self._attend(q, out, keys_values, scale=self.sm_scale)

    def _attend(self, q: torch.Tensor, out: torch.Tensor, keys_values, scale: float | None) -> torch.Tensor:
        """Causal attention of each sequence's queries over its cached keys, into ``out``."""
        assert self.layout is not None
        starts = self.layout.query_start.tolist()
        for i, (rb, ro) in enumerate(self._reads):
            lo, hi, context = starts[i], starts[i + 1], len(rb)
            keys, vals = keys_values(rb, ro)
            # query j sits at position context - n + j and sees keys up to it
            first = context - (hi - lo)
            mask = torch.arange(context, device=q.device)[None, :] <= (
                first + torch.arange(hi - lo, device=q.device)[:, None]
            )
            qs = q[lo:hi].transpose(0, 1)  # [heads, n, D]
            o = F.scaled_dot_product_attention(qs, keys, vals, attn_mask=mask, scale=scale)
            out[lo:hi] = o.transpose(0, 1)
        return out
