"""GPU attention backend over the shared paged KV cache.

One plan per step, shared by every layer: when every chunk is a single token (the steady
state) raymoe's Triton decode kernel (decode_attention_triton.py: about FlashInfer's decode
time at even lengths, far less with one long context among short ones; BENCHMARKS.md,
"Length-aware decode parts"), otherwise FlashInfer's paged prefill
kernel (it handles mixed prefill + decode batches).
KV cache layout: FlashInfer's NHD paged layout, the same tensor the torch
backend uses (see attention_torch.py), in the model's dtype or in FP8
(``engine.kv_cache_dtype``: read with the model's queries); a step's k/v are written into
it, cast, by one Triton kernel for k and v (``KVAppend``).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from raymoe.actors.engine.decode_attention_triton import TritonDecode
from raymoe.actors.engine.kv_write_triton import write_kv
from raymoe.actors.engine.step import StepLayout

WORKSPACE_BYTES = 256 * 2**20
HEAD_DIMS = (64, 128, 256)  # FlashInfer's prefill kernels' (others fail inside them: an invalid configuration)


def check_head_dim(head_dim: int) -> None:
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"FlashInfer attention takes head_dim {', '.join(map(str, HEAD_DIMS))}, not {head_dim}")


def page_tables(pages: np.ndarray, indices: np.ndarray, context_lens: np.ndarray, block_size: int):
    """FlashInfer's paged-KV description as host int32 tensors: indptr [B+1],
    indices [sum(pages)], last_page_len [B]."""
    indptr = np.zeros(pages.shape[0] + 1, dtype=np.int32)
    np.cumsum(pages, out=indptr[1:])
    last = context_lens - (pages - 1) * block_size
    return torch.from_numpy(indptr), torch.from_numpy(indices.astype(np.int32)), torch.from_numpy(last.astype(np.int32))


class KVAppend:
    """Writes a step's k/v [T, kv_heads, D] into a layer's paged cache, k and v in one
    kernel reading them in place from the qkv output (kv_write_triton.py: cast to the
    cache's dtype on the way).

    Token t lands at (blocks[t], offsets[t]). The tables live in one int32 device buffer
    [5, tokens + 1], filled by one copy from ``host`` (``fill``): static for a CUDA graph,
    which owns one of these. Rows 0 and 1 are the blocks and offsets; rows 2-4 describe
    each token to FlashInfer's append kernels (the latent cache's, attention_flashinfer_mla.py)
    as its own sequence of one page: batch index t, page pointer 0..T, last-page length 1.
    """

    def __init__(self, tokens: int, device: torch.device) -> None:
        self.tokens = tokens
        self.host = torch.zeros(5, tokens + 1, dtype=torch.int32, pin_memory=True)
        self.host[2] = torch.arange(tokens + 1)
        self.host[3] = torch.arange(tokens + 1)
        self.host[4] = 1
        self.tables = torch.empty_like(self.host, device=device)

    def fill(self, blocks: torch.Tensor, offsets: torch.Tensor, pad_block: int = 0) -> None:
        """Queue the copy of the tables, with this step's slots (rows past them: offset 0
        of ``pad_block``); before the first call."""
        n = blocks.shape[0]
        assert n <= self.tokens
        self.host[0, :n], self.host[0, n:] = blocks, pad_block
        self.host[1, :n], self.host[1, n:] = offsets, 0
        self.tables.copy_(self.host, non_blocking=True)

    def __call__(self, cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        write_kv(cache, self.tables[0], self.tables[1], k=k, v=v)


class FlashInferAttention:
    def __init__(self, kv_cache: torch.Tensor, block_size: int, num_heads: int, *, q_dtype: torch.dtype) -> None:
        """``q_dtype``: the queries' (the model's) dtype; the cache's may be FP8."""
        import flashinfer

        self.kv_cache = kv_cache
        self.block_size = block_size
        self.num_heads, self.num_kv_heads = num_heads, kv_cache.shape[-2]
        self.head_dim = kv_cache.shape[-1]
        self.q_dtype = q_dtype
        device = kv_cache.device
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        self.wrapper = None
        self._append: KVAppend | None = None
        self._planned = torch.cuda.Event()

    def plan(self, layout: StepLayout) -> None:
        # FlashInfer's plan() and the KV tables stage in page-locked memory the GPU copies
        # from later: wait until the previous plan's copies ran before this one writes
        # there (with a step in flight they could still be queued)
        self._planned.synchronize()
        self._plan(layout)
        self._planned.record(torch.cuda.current_stream(self.kv_cache.device))

    def _plan(self, layout: StepLayout) -> None:
        dev = self.kv_cache.device
        tokens = layout.slot_blocks.shape[0]
        if self._append is None or self._append.tokens < tokens:  # grown by doubling, then reused
            self._append = KVAppend(max(tokens, 2 * (self._append.tokens if self._append else 0)), dev)
        self._append.fill(layout.slot_blocks, layout.slot_offsets)
        if layout.num_seqs == 0:
            self.wrapper = None
            return
        bs = self.block_size
        kv_indptr, kv_indices, last_len = page_tables(layout.pages, layout.kv_indices(), layout.context_lens, bs)
        if layout.input_ids.shape[0] == layout.num_seqs:  # one query token per sequence
            self.wrapper = TritonDecode(layout.num_seqs, kv_indices.shape[0], self.num_kv_heads, dev)
            lens = torch.from_numpy(layout.context_lens.astype(np.int32))
            self.wrapper.plan(kv_indptr, kv_indices.pin_memory(), lens)
        else:
            qo = torch.from_numpy(layout.query_start.astype(np.int32))
            self.wrapper = self.prefill
            self.prefill.plan(
                qo,
                kv_indptr,
                kv_indices,
                last_len,
                self.num_heads,
                self.num_kv_heads,
                self.head_dim,
                bs,
                causal=True,
                q_data_type=self.q_dtype,
                kv_data_type=self.kv_cache.dtype,
            )

    def for_graph(self, batch_size: int, *, max_pages_per_seq: int, scratch_block: int) -> "GraphDecodeAttention":
        """The decode attention of one CUDA-graph batch size, on this cache."""
        return GraphDecodeAttention(
            self.kv_cache,
            self.block_size,
            batch_size=batch_size,
            max_pages_per_seq=max_pages_per_seq,
            scratch_block=scratch_block,
        )

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """q [T, heads, D], k/v [T, kv_heads, D] -> [T, heads, D] (into ``out`` if given); writes
        k/v into the cache first."""
        assert self._append is not None, "plan() before forward()"
        cache = self.kv_cache[layer]
        self._append(cache, k, v)
        if self.wrapper is None:
            return torch.empty_like(q) if out is None else out
        return self.wrapper.run(q, cache, out=out)


class GraphDecodeAttention:
    """Decode attention for one CUDA-graph batch size (the Triton kernel).

    Everything the captured kernels read lives in static buffers, filled by ``plan``
    outside the graph: the page tables and the KV write slots. Rows beyond
    the real batch are padding: they write into, and attend to, a scratch block no
    request owns.
    """

    def __init__(
        self,
        kv_cache: torch.Tensor,
        block_size: int,
        *,
        batch_size: int,
        max_pages_per_seq: int,
        scratch_block: int,
    ) -> None:
        dev = kv_cache.device
        self.kv_cache, self.block_size, self.batch_size = kv_cache, block_size, batch_size
        self.scratch_block = scratch_block
        self.append = KVAppend(batch_size, dev)
        self.decode = TritonDecode(batch_size, batch_size * max_pages_per_seq, kv_cache.shape[-2], dev)

    def plan(self, layout: StepLayout | None) -> None:
        """Point the graph's page tables and KV write slots at this step's sequences (None:
        all padding, for capture). The copies are queued: the owner must not call it again
        before they ran (the pinned host buffers are reused)."""
        n = layout.num_seqs if layout is not None else 0
        empty = torch.zeros(0, dtype=torch.int64)
        self.append.fill(layout.slot_blocks if n else empty, layout.slot_offsets if n else empty, self.scratch_block)
        pad = self.batch_size - n
        assert pad >= 0
        ones = np.ones(pad, dtype=np.int64)
        pages = np.concatenate([layout.pages, ones]) if n else ones
        context = np.concatenate([layout.context_lens, ones]) if n else ones
        blocks = np.full(pad, self.scratch_block, dtype=np.int32)
        indices = np.concatenate([layout.kv_indices(), blocks]) if n else blocks
        indptr, kv_indices, _ = page_tables(pages, indices, context, self.block_size)
        lens = torch.from_numpy(context.astype(np.int32))
        self.decode.plan(indptr, kv_indices.pin_memory(), lens)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cache = self.kv_cache[layer]
        self.append(cache, k, v)
        return self.decode.run(q, cache)
