"""GPU attention backend for MLA (DeepSeek-V2/V3 multi-head latent attention, with
the projections absorbed): FlashInfer's ``BatchMLAPagedAttentionWrapper``.

Latent KV cache: ``[layers, num_blocks + 1, block_size, latent_dim + rope_dim]``, per
token the normed latent then the rotated rope key. Every query head attends to that
one latent "KV head": score = sm_scale * q . entry over all latent + rope dims, value =
the entry's latent part. Queries go to the wrapper as their two parts (``LatentPair``: the
absorbed query and its rotary part, each a strided view with a contiguous last dim), a
layer's cache ``[blocks, block_size, latent_dim + rope_dim]`` as its two column ranges:
FlashInfer's FA2/FA3 backends read both as split strided views, so nothing is
concatenated. A step's entries are written by FlashInfer's MLA append kernel
(``LatentKVAppend``) from their two parts.

FlashInfer's "auto" backend picks FA3 on Hopper (SM90, CUDA >= 12.3), FA2 on Ampere;
both take any page size, and both re-plan a CUDA-graph wrapper in place: plan() copies
the page tables into the wrapper's reserved buffers and the work lists into its integer
workspace, at the same offsets and grid whenever the batch is the same number of
one-token rows. Only kv_lora_rank 512 with qk_rope_head_dim 64 is supported (the
append kernel's fixed dims; FA3 also needs the latent in 128/256/512).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from raymoe.actors.engine.attention_flashinfer import WORKSPACE_BYTES, KVAppend
from raymoe.actors.engine.step import StepLayout
from raymoe.actors.models.batch import LatentPair

LATENT_DIM, ROPE_DIM = 512, 64
# FlashInfer's FA MLA planner refuses a step needing more work items than this
# (flashinfer/mla/_batch_mla/_backends/_fa_common.py, _FA_MAX_WORK_ITEMS)
MAX_WORK_ITEMS = 16384


def check_latent_dims(latent_dim: int, rope_dim: int) -> None:
    if (latent_dim, rope_dim) != (LATENT_DIM, ROPE_DIM):
        raise ValueError(
            f"the FlashInfer MLA backend needs kv_lora_rank {LATENT_DIM} and qk_rope_head_dim {ROPE_DIM}, "
            f"got {latent_dim} and {rope_dim}: use the torch attention backend for this model"
        )


def max_step_tokens(num_heads: int, max_seqs: int, num_sms: int) -> int:
    """The most query tokens one step may hold so that FlashInfer's FA MLA planner can plan
    it, whatever the split into at most ``max_seqs`` sequences and whatever their KV lengths.

    The planner gives each sequence ceil(q * heads / tile) query tiles (tile 128 once a
    sequence averages over 64 query rows, else 64, which bounds that case by 3 tiles a
    sequence) and splits KV with a per-item limit of at least the average KV per SM cluster,
    which adds at most one item per cluster (at most ``num_sms``). So a step needs at most
    max(tokens * heads / 128 + seqs, 3 * seqs) + num_sms work items."""
    if 3 * max_seqs + num_sms > MAX_WORK_ITEMS:
        return 0
    return (MAX_WORK_ITEMS - num_sms - max_seqs) * 128 // num_heads


def check_step_budget(step_tokens: int, max_seqs: int, num_heads: int, num_sms: int) -> None:
    """Refuse a step budget FlashInfer MLA could not plan, at start-up, naming the field."""
    limit = max_step_tokens(num_heads, max_seqs, num_sms)
    if step_tokens > limit:
        raise StepBudgetError(
            f"engine.max_num_batched_tokens: {step_tokens} tokens in one step is more than FlashInfer's MLA "
            f"attention can plan with {num_heads} heads a rank and engine.max_num_seqs {max_seqs} on this GPU "
            f"({num_sms} SMs); use at most {limit}, or engine.attention_backend: torch"
        )


class StepBudgetError(RuntimeError):
    """A configuration the MLA backend cannot run: not a reason to fall back to torch attention."""


def plan_tables(
    query_start: np.ndarray, pages: np.ndarray, indices: np.ndarray, context_lens: np.ndarray
) -> dict[str, torch.Tensor]:
    """FlashInfer MLA's CSR plan metadata as pinned host int32 tensors: qo_indptr [B+1],
    kv_indptr [B+1], kv_indices [sum(pages)], kv_len_arr [B]."""
    kv_indptr = np.zeros(pages.shape[0] + 1, dtype=np.int64)
    np.cumsum(pages, out=kv_indptr[1:])
    tables = dict(qo_indptr=query_start, kv_indptr=kv_indptr, kv_indices=indices, kv_len_arr=context_lens)
    return {name: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32)).pin_memory() for name, a in tables.items()}


def plan_wrapper(attention: Any, wrapper: Any, tables: dict[str, torch.Tensor], *, causal: bool) -> None:
    """Plan an MLA wrapper of ``attention`` (either backend below: its heads, widths, page
    size, scale and cache dtype) for the CSR ``tables``, split query and cache."""
    import flashinfer

    wrapper.plan(
        metadata=flashinfer.mla.MLAPlanMetadata.csr(**tables),
        num_heads=attention.num_heads,
        head_dim_ckv=attention.latent_dim,
        head_dim_kpe=attention.rope_dim,
        page_size=attention.block_size,
        causal=causal,
        sm_scale=attention.sm_scale,
        q_data_type=attention.kv_cache.dtype,
        kv_data_type=attention.kv_cache.dtype,
        query_layout="split",
        kv_cache_layout="split",
    )


class LatentKVAppend(KVAppend):
    """KVAppend for the latent cache: writes a step's entries (latent [T, latent_dim], rope
    [T, rope_dim]) into a layer's cache [blocks, block_size, latent_dim + rope_dim] with
    FlashInfer's MLA append kernel (the cache's two parts written as strided views)."""

    def __init__(self, tokens: int, device: torch.device, latent_dim: int) -> None:
        import flashinfer

        super().__init__(tokens, device)
        self._append = flashinfer.page.append_paged_mla_kv_cache
        self.latent_dim = latent_dim

    def __call__(self, cache: torch.Tensor, kv: LatentPair) -> None:
        t, n, dim = self.tables, kv.latent.shape[0], self.latent_dim
        if n == 0:  # an idle replica's eager step: FlashInfer cannot launch an empty grid
            return
        self._append(
            append_ckv=kv.latent,
            append_kpe=kv.rope,
            batch_indices=t[2, :n],
            positions=t[1, :n],
            ckv_cache=cache[..., :dim],
            kpe_cache=cache[..., dim:],
            kv_indices=t[0, :n],
            kv_indptr=t[3, : n + 1],
            kv_last_page_len=t[4, :n],
        )


def _split(q: LatentPair, cache: torch.Tensor, latent_dim: int) -> dict:
    """The wrapper's run arguments for a split query and a layer's cache. Its kernels take
    the row and head strides but assume a unit stride in the last dim."""
    # a plain tuple: FlashInfer takes no other sequence (not the NamedTuple)
    parts = tuple(p if p.stride(-1) == 1 else p.contiguous() for p in q)
    return dict(query=parts, kv_cache=(cache[..., :latent_dim], cache[..., latent_dim:]))


class FlashInferLatentAttention:
    """One plan per step, shared by every layer (prefill, mixed and decode steps)."""

    def __init__(
        self, kv_cache: torch.Tensor, block_size: int, num_heads: int, *, latent_dim: int, sm_scale: float
    ) -> None:
        import flashinfer

        check_latent_dims(latent_dim, kv_cache.shape[-1] - latent_dim)
        if kv_cache.dtype not in (torch.float16, torch.bfloat16):
            # refused here, where auto falls back to torch, not at the first plan
            raise ValueError(f"the FlashInfer MLA backend needs a bf16 or fp16 KV cache, not {kv_cache.dtype}")
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.num_heads = num_heads
        self.latent_dim, self.rope_dim = latent_dim, kv_cache.shape[-1] - latent_dim
        self.sm_scale = sm_scale
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=kv_cache.device)
        self.wrapper = flashinfer.mla.BatchMLAPagedAttentionWrapper(float_workspace_buffer=self.workspace)
        self._append: LatentKVAppend | None = None
        self._has_seqs = False
        self._planned = torch.cuda.Event()

    def plan(self, layout: StepLayout) -> None:
        # The KV tables stage in page-locked memory the GPU copies from later: wait until
        # the previous plan's copies ran before this one writes there (with a step in
        # flight they could still be queued)
        self._planned.synchronize()
        self._plan(layout)
        self._planned.record(torch.cuda.current_stream(self.kv_cache.device))

    def _plan(self, layout: StepLayout) -> None:
        tokens = layout.slot_blocks.shape[0]
        if self._append is None or self._append.tokens < tokens:  # grown by doubling, then reused
            size = max(tokens, 2 * (self._append.tokens if self._append else 0))
            self._append = LatentKVAppend(size, self.kv_cache.device, self.latent_dim)
        self._append.fill(layout.slot_blocks, layout.slot_offsets)
        self._has_seqs = layout.num_seqs > 0
        if not self._has_seqs:
            return
        tables = plan_tables(layout.query_start, layout.pages, layout.kv_indices(), layout.context_lens)
        plan_wrapper(self, self.wrapper, tables, causal=True)

    def for_graph(self, batch_size: int, *, max_pages_per_seq: int, scratch_block: int) -> "GraphLatentAttention":
        """The decode attention of one CUDA-graph batch size, on this cache and workspace
        (shared: one step runs at a time)."""
        return GraphLatentAttention(
            self.kv_cache,
            self.block_size,
            self.num_heads,
            latent_dim=self.latent_dim,
            sm_scale=self.sm_scale,
            batch_size=batch_size,
            max_pages_per_seq=max_pages_per_seq,
            workspace=self.workspace,
            scratch_block=scratch_block,
        )

    def forward_latent(
        self, layer: int, q: LatentPair, kv: LatentPair, out: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """-> [T, heads, latent] (see models.batch.LatentAttention; into ``out`` if given);
        writes kv into the cache first."""
        assert self._append is not None, "plan() before forward_latent()"
        cache = self.kv_cache[layer]
        self._append(cache, kv)
        if out is None:
            out = q.latent.new_empty(q.latent.shape[0], self.num_heads, self.latent_dim)
        if not self._has_seqs:
            return out
        return self.wrapper.run(**_split(q, cache, self.latent_dim), out=out)


class GraphLatentAttention:
    """FlashInfer MLA decode for one CUDA-graph batch size: one query token per row.

    Everything the captured kernels read lives in static buffers, filled by ``plan``
    outside the graph: the wrapper's reserved page tables and integer workspace, and the
    KV write slots. Rows beyond the real batch are padding: they write into, and attend
    to, a scratch block no request owns.
    """

    def __init__(
        self,
        kv_cache: torch.Tensor,
        block_size: int,
        num_heads: int,
        *,
        latent_dim: int,
        sm_scale: float,
        batch_size: int,
        max_pages_per_seq: int,
        workspace: torch.Tensor,
        scratch_block: int,
    ) -> None:
        import flashinfer

        check_latent_dims(latent_dim, kv_cache.shape[-1] - latent_dim)
        dev = kv_cache.device
        self.kv_cache, self.block_size, self.batch_size = kv_cache, block_size, batch_size
        self.num_heads, self.sm_scale = num_heads, sm_scale
        self.latent_dim, self.rope_dim = latent_dim, kv_cache.shape[-1] - latent_dim
        self.scratch_block = scratch_block
        self.append = LatentKVAppend(batch_size, dev, latent_dim)
        index = dict(dtype=torch.int32, device=dev)
        self.wrapper = flashinfer.mla.BatchMLAPagedAttentionWrapper(
            float_workspace_buffer=workspace,
            use_cuda_graph=True,
            qo_indptr=torch.zeros(batch_size + 1, **index),
            kv_indptr=torch.zeros(batch_size + 1, **index),
            kv_indices=torch.zeros(batch_size * max_pages_per_seq, **index),
            kv_len_arr=torch.zeros(batch_size, **index),
        )

    def plan(self, layout: StepLayout | None) -> None:
        """Point the graph's page tables and KV write slots at this step's sequences (None:
        all padding, for capture). The copies are queued: the owner must not call it again
        before they ran (the pinned host buffers are reused)."""
        n = layout.num_seqs if layout is not None else 0
        assert n == 0 or layout.input_ids.shape[0] == n, "a decode step: one token per sequence"
        empty = torch.zeros(0, dtype=torch.int64)
        self.append.fill(layout.slot_blocks if n else empty, layout.slot_offsets if n else empty, self.scratch_block)
        pad = self.batch_size - n
        assert pad >= 0
        ones = np.ones(pad, dtype=np.int64)
        pages = np.concatenate([layout.pages, ones]) if n else ones
        context = np.concatenate([layout.context_lens, ones]) if n else ones
        blocks = np.full(pad, self.scratch_block, dtype=np.int32)
        indices = np.concatenate([layout.kv_indices(), blocks]) if n else blocks
        tables = plan_tables(np.arange(self.batch_size + 1), pages, indices, context)
        # one query per row sees its whole context: non-causal is exact (and skips FlashInfer's
        # causal tile bookkeeping)
        plan_wrapper(self, self.wrapper, tables, causal=False)

    def forward_latent(self, layer: int, q: LatentPair, kv: LatentPair) -> torch.Tensor:
        cache = self.kv_cache[layer]
        self.append(cache, kv)
        out = q.latent.new_empty(q.latent.shape[0], self.num_heads, self.latent_dim)
        return self.wrapper.run(**_split(q, cache, self.latent_dim), out=out)
