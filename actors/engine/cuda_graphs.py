"""CUDA graphs of the decode step (forward + logits), one per batch size.

A decode step of B sequences replays the graph of the smallest captured size
>= B, with rows past B as padding (token 0, KV written to a scratch block,
outputs ignored). Every rank of the world captures the same sizes in the same
order, so the collectives recorded in the graphs line up across ranks.
"""
from __future__ import annotations

import logging
import time
from typing import Sequence

import torch

from raymoe.actors.engine.attention_flashinfer import GraphDecodeAttention
from raymoe.actors.engine.step import StepLayout
from raymoe.actors.models.batch import ForwardBatch

log = logging.getLogger(__name__)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to 64 and every 32 beyond, capped at max_num_seqs (included)."""
    sizes = [1, 2, 4, 8] + list(range(16, 65, 16)) + list(range(96, 1025, 32))
    return sorted({s for s in sizes if s < max_num_seqs} | {max_num_seqs})


class _Graph:
    def __init__(self, size: int, attention: GraphDecodeAttention, dp: int, device: torch.device) -> None:
        self.size = size
        self.attention = attention
        self.input_ids = torch.zeros(size, dtype=torch.int64, device=device)
        self.positions = torch.zeros(size, dtype=torch.int64, device=device)
        self.dp_counts = torch.zeros(dp, dtype=torch.int64, device=device)
        self.graph = torch.cuda.CUDAGraph()
        self.logits: torch.Tensor | None = None


class DecodeGraphs:
    def __init__(self, model, kv_cache: torch.Tensor, block_size: int, num_heads: int, sizes: Sequence[int],
                 max_pages_per_seq: int, scratch_block: int, dp: int, workspace: torch.Tensor,
                 expert_load=None) -> None:  # fmt: skip
        t0 = time.perf_counter()
        device = kv_cache.device
        self.workspace = workspace  # shared with the eager FlashInfer wrappers: one step runs at a time
        self.graphs: dict[int, _Graph] = {}
        pool = None
        for size in sorted(sizes, reverse=True):  # largest first: smaller ones reuse its pool
            attn = GraphDecodeAttention(kv_cache, block_size, num_heads, size, max_pages_per_seq, self.workspace,
                                        scratch_block)  # fmt: skip
            g = _Graph(size, attn, dp, device)
            batch = ForwardBatch(g.input_ids, g.positions, attn, dp_pad=size, dp_counts=g.dp_counts,
                                 expert_load=expert_load)  # fmt: skip
            attn.plan(None)
            g.dp_counts.fill_(size)
            with torch.inference_mode():
                model.compute_logits(model(batch))  # warm-up: lazy init outside capture
                torch.cuda.synchronize(device)
                with torch.cuda.graph(g.graph, pool=pool):
                    g.logits = model.compute_logits(model(batch))
            pool = g.graph.pool()
            self.graphs[size] = g
        self.sizes = sorted(self.graphs)
        log.info("captured %d decode CUDA graphs (sizes %s) in %.1f s", len(self.sizes), self.sizes,
                 time.perf_counter() - t0)  # fmt: skip

    def size_for(self, batch: int) -> int | None:
        return next((s for s in self.sizes if s >= batch), None)

    def run(self, layout: StepLayout, dp_token_counts: Sequence[int]) -> torch.Tensor:
        """Replay for this decode step; returns logits [B, vocab] of this replica's B rows."""
        size = self.size_for(max(dp_token_counts))
        assert size is not None
        g = self.graphs[size]
        n = layout.num_seqs
        g.attention.plan(layout)
        g.input_ids.zero_()
        g.positions.zero_()
        g.input_ids[:n].copy_(layout.input_ids, non_blocking=True)
        g.positions[:n].copy_(layout.positions, non_blocking=True)
        g.dp_counts.copy_(torch.tensor(dp_token_counts), non_blocking=True)
        g.graph.replay()
        return g.logits[:n]
