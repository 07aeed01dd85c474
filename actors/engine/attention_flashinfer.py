"""GPU attention backend: FlashInfer paged kernels over the shared KV cache.

One plan per step, shared by every layer: the decode kernel when every chunk
is a single token (the steady state), the paged prefill kernel otherwise (it
handles mixed prefill + decode batches). Both wrappers share one workspace.
KV cache layout: FlashInfer's NHD paged layout, the same tensor the torch
backend uses (see attention_torch.py).
"""
from __future__ import annotations

import torch

from raymoe.actors.engine.step import StepLayout

WORKSPACE_BYTES = 256 * 2**20


class FlashInferAttention:
    def __init__(self, kv_cache: torch.Tensor, block_size: int, num_heads: int, num_kv_heads: int) -> None:
        import flashinfer

        self.kv_cache = kv_cache
        self.block_size = block_size
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = kv_cache.shape[-1]
        self.dtype = kv_cache.dtype
        device = kv_cache.device
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        # tensor-core decode pays off once several query heads share a KV head
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=num_heads // num_kv_heads >= 4
        )
        self.wrapper = None
        self._write = None

    def plan(self, layout: StepLayout) -> None:
        dev = self.kv_cache.device
        self._write = (layout.slot_blocks.to(dev, non_blocking=True), layout.slot_offsets.to(dev, non_blocking=True))
        if not layout.seqs:
            self.wrapper = None
            return
        bs = self.block_size
        pages = [-(-s.context_len // bs) for s in layout.seqs]
        kv_indptr = torch.tensor([0] + pages, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        kv_indices = torch.tensor([b for s, n in zip(layout.seqs, pages) for b in s.block_ids[:n]], dtype=torch.int32)
        last_len = torch.tensor([s.context_len - (n - 1) * bs for s, n in zip(layout.seqs, pages)], dtype=torch.int32)
        # host tensors: plan() schedules on the CPU and copies to the GPU itself (no sync)
        args = (self.num_heads, self.num_kv_heads, self.head_dim, bs)
        dtypes = dict(q_data_type=self.dtype, kv_data_type=self.dtype)
        if all(s.num_query == 1 for s in layout.seqs):
            self.wrapper = self.decode
            self.decode.plan(kv_indptr, kv_indices, last_len, *args, **dtypes)
        else:
            qo = torch.tensor([0] + [s.num_query for s in layout.seqs], dtype=torch.int32).cumsum(0, dtype=torch.int32)
            self.wrapper = self.prefill
            self.prefill.plan(qo, kv_indptr, kv_indices, last_len, *args, causal=True, **dtypes)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, heads, D], k/v [T, kv_heads, D] -> [T, heads, D]; writes k/v into the cache first."""
        assert self._write is not None, "plan() before forward()"
        cache = self.kv_cache[layer]
        blocks, offsets = self._write
        cache[blocks, 0, offsets] = k
        cache[blocks, 1, offsets] = v
        if self.wrapper is None:
            return torch.empty_like(q)
        return self.wrapper.run(q, cache)


class GraphDecodeAttention:
    """FlashInfer decode for one CUDA-graph batch size.

    Everything the captured kernels read lives in static buffers: the wrapper's
    page tables (filled by ``plan``, outside the graph) and the KV write slots.
    Rows beyond the real batch are padding: they write into, and attend to, a
    scratch block no request owns.
    """

    def __init__(self, kv_cache: torch.Tensor, block_size: int, num_heads: int, batch_size: int,
                 max_pages_per_seq: int, workspace: torch.Tensor, scratch_block: int) -> None:  # fmt: skip
        import flashinfer

        dev = kv_cache.device
        self.kv_cache, self.block_size, self.batch_size = kv_cache, block_size, batch_size
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, kv_cache.shape[-2], kv_cache.shape[-1]
        self.scratch_block = scratch_block
        self.slot_blocks = torch.full((batch_size,), scratch_block, dtype=torch.int64, device=dev)
        self.slot_offsets = torch.zeros(batch_size, dtype=torch.int64, device=dev)
        self.wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            workspace,
            "NHD",
            use_cuda_graph=True,
            use_tensor_cores=num_heads // self.num_kv_heads >= 4,
            paged_kv_indptr_buffer=torch.zeros(batch_size + 1, dtype=torch.int32, device=dev),
            paged_kv_indices_buffer=torch.zeros(batch_size * max_pages_per_seq, dtype=torch.int32, device=dev),
            paged_kv_last_page_len_buffer=torch.zeros(batch_size, dtype=torch.int32, device=dev),
        )

    def plan(self, layout: StepLayout | None) -> None:
        """Point the graph at this step's sequences (None: all padding, for capture)."""
        seqs = layout.seqs if layout is not None else ()
        n, bs = len(seqs), self.block_size
        assert n <= self.batch_size
        pages = [-(-s.context_len // bs) for s in seqs] + [1] * (self.batch_size - n)
        indices = [b for s, p in zip(seqs, pages) for b in s.block_ids[:p]] + [self.scratch_block] * (self.batch_size - n)
        last = [s.context_len - (p - 1) * bs for s, p in zip(seqs, pages)] + [1] * (self.batch_size - n)
        self.wrapper.plan(
            torch.tensor([0] + pages, dtype=torch.int32).cumsum(0, dtype=torch.int32),
            torch.tensor(indices, dtype=torch.int32),
            torch.tensor(last, dtype=torch.int32),
            self.num_heads, self.num_kv_heads, self.head_dim, bs,
            q_data_type=self.kv_cache.dtype, kv_data_type=self.kv_cache.dtype,
        )  # fmt: skip
        self.slot_blocks.fill_(self.scratch_block)
        self.slot_offsets.zero_()
        if layout is not None and n:
            self.slot_blocks[:n].copy_(layout.slot_blocks, non_blocking=True)
            self.slot_offsets[:n].copy_(layout.slot_offsets, non_blocking=True)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cache = self.kv_cache[layer]
        cache[self.slot_blocks, 0, self.slot_offsets] = k
        cache[self.slot_blocks, 1, self.slot_offsets] = v
        return self.wrapper.run(q, cache)
