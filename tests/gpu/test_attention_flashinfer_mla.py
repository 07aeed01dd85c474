"""The FlashInfer MLA backend (eager and CUDA-graph decode) against a plain torch
reference of absorbed MLA: causal MQA of every query head over the latent cache, scores
over latent + rope dims, values the latent part."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("flashinfer") is None, reason="needs flashinfer"),
]

from raymoe.actors.engine.attention_flashinfer import WORKSPACE_BYTES  # noqa: E402
from raymoe.actors.engine.attention_flashinfer_mla import (  # noqa: E402
    MAX_WORK_ITEMS,
    FlashInferLatentAttention,
    GraphLatentAttention,
    max_step_tokens,
)
from raymoe.actors.engine.step import StepInput, StepLayout, build_step_layout  # noqa: E402
from raymoe.actors.models.batch import LatentPair  # noqa: E402

LATENT, ROPE, BLOCK = 512, 64, 16
DIM = LATENT + ROPE
LAYERS, LAYER = 2, 1  # the second layer: the per-layer cache view starts past the first
NUM_BLOCKS, WIDTH = 16, 4  # the cache has one more block: the graphs' scratch block
SM_SCALE = (128 + 64) ** -0.5
BF16 = dict(device="cuda", dtype=torch.bfloat16)


def block_tables() -> np.ndarray:
    """Three sequences of up to WIDTH blocks each, scattered over the cache."""
    blocks = np.random.default_rng(0).permutation(NUM_BLOCKS)[: 3 * WIDTH]
    return blocks.reshape(3, WIDTH).astype(np.int32)


def step_layout(start_pos: list[int], query_lens: list[int], tables: np.ndarray) -> StepLayout:
    b, lens = len(query_lens), np.asarray(query_lens, dtype=np.int64)
    step = StepInput(
        token_ids=np.zeros(int(lens.sum()), dtype=np.int64),
        query_lens=lens,
        start_pos=np.asarray(start_pos, dtype=np.int64),
        block_tables=tables,
        sample=np.ones(b, dtype=bool),
        temperature=np.zeros(b, dtype=np.float32),
        top_k=np.full(b, -1, dtype=np.int64),
        top_p=np.ones(b, dtype=np.float32),
        seed=np.zeros(b, dtype=np.int64),
        output_index=np.zeros(b, dtype=np.int64),
        dp_token_counts=(int(lens.sum()),),
    )
    return build_step_layout(step, BLOCK)


def reference(cache: torch.Tensor, layout: StepLayout, q: torch.Tensor) -> torch.Tensor:
    """Absorbed MLA over one layer's cache [blocks, BLOCK, DIM], in float32 -> [T, heads, LATENT]."""
    out = []
    for b in range(layout.num_seqs):
        lo, hi = int(layout.query_start[b]), int(layout.query_start[b + 1])
        context, n = int(layout.context_lens[b]), hi - lo
        pos = torch.arange(context)
        blocks = torch.from_numpy(layout.block_tables[b].astype(np.int64))[pos // BLOCK]
        entries = cache[blocks.cuda(), (pos % BLOCK).cuda()].float()  # [context, DIM]
        scores = SM_SCALE * torch.einsum("nhd,cd->nhc", q[lo:hi].float(), entries)
        # query i sits at position context - n + i and sees the cache up to it
        visible = pos[None, :] <= (context - n + torch.arange(n))[:, None]
        scores = scores.masked_fill(~visible[:, None, :].cuda(), float("-inf"))
        out.append(torch.einsum("nhc,cl->nhl", scores.softmax(-1), entries[:, :LATENT]))
    return torch.cat(out) if out else torch.zeros(0, q.shape[1], LATENT, device="cuda")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).norm() / want.norm()).item()


def write(cache: torch.Tensor, layout: StepLayout, kv: torch.Tensor) -> None:
    cache[LAYER, layout.slot_blocks.cuda(), layout.slot_offsets.cuda()] = kv


def as_the_model_hands_it(q: torch.Tensor, kv: torch.Tensor) -> tuple[LatentPair, LatentPair]:
    """q [T, heads, DIM], kv [T, DIM] in the layouts latent_attention.py makes: the absorbed
    query a token-major view of a head-major bmm output, the other parts contiguous."""
    q_latent = q[..., :LATENT].transpose(0, 1).contiguous().transpose(0, 1)
    return LatentPair(q_latent, q[..., LATENT:].contiguous()), LatentPair(
        kv[:, :LATENT].contiguous(), kv[:, LATENT:].contiguous()
    )


# 128 heads: DeepSeek-V3 at tp 1 (FlashInfer takes another decode path than for 16)
@pytest.mark.parametrize("heads", [16, 128])
def test_eager_prefill_mixed_decode_and_idle_steps(heads):
    g = torch.Generator(device="cuda").manual_seed(0)
    cache = torch.zeros(LAYERS, NUM_BLOCKS + 1, BLOCK, DIM, **BF16)
    want_cache = cache.clone()
    attn = FlashInferLatentAttention(cache, BLOCK, heads, latent_dim=LATENT, sm_scale=SM_SCALE)
    tables = block_tables()
    steps = [
        ([0, 0], [21, 6], [0, 1]),  # prefill: a chunk of sequence 0's prompt, all of sequence 1's
        ([21, 6, 0], [16, 1, 51], [0, 1, 2]),  # mixed: the rest of 0, a decode of 1, a prefill of 2
        ([37, 7, 51], [1, 1, 1], [0, 1, 2]),  # decode
        ([], [], []),  # an idle data-parallel replica
    ]
    for start, lens, rows in steps:
        layout = step_layout(start, lens, tables[rows])
        tokens = sum(lens)
        q = torch.randn(tokens, heads, DIM, generator=g, **BF16)
        kv = torch.randn(tokens, DIM, generator=g, **BF16)
        attn.plan(layout)
        got = attn.forward_latent(LAYER, *as_the_model_hands_it(q, kv))
        write(want_cache, layout, kv)
        assert torch.equal(cache, want_cache)
        assert got.shape == (tokens, heads, LATENT) and got.dtype == torch.bfloat16
        if tokens:
            assert relative_error(got, reference(want_cache[LAYER], layout, q)) < 1e-2


@pytest.mark.parametrize("heads", [16, 128])
def test_graph_replays_decode_steps(heads):
    g = torch.Generator(device="cuda").manual_seed(1)
    cache = torch.randn(LAYERS, NUM_BLOCKS + 1, BLOCK, DIM, generator=g, **BF16)
    batch = 4
    attn = GraphLatentAttention(
        cache,
        BLOCK,
        heads,
        latent_dim=LATENT,
        sm_scale=SM_SCALE,
        batch_size=batch,
        max_pages_per_seq=WIDTH,
        workspace=torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device="cuda"),
        scratch_block=NUM_BLOCKS,
    )
    q_in, kv_in = as_the_model_hands_it(torch.zeros(batch, heads, DIM, **BF16), torch.zeros(batch, DIM, **BF16))
    attn.plan(None)
    attn.forward_latent(LAYER, q_in, kv_in)  # warm-up: lazy init outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attn.forward_latent(LAYER, q_in, kv_in)
    want_cache = cache.clone()
    tables = block_tables()
    for start, rows in [([37, 6, 50], [0, 1, 2]), ([51, 38], [2, 0])]:  # 1 then 2 padding rows
        layout = step_layout(start, [1] * len(rows), tables[rows])
        n = len(rows)
        q, kv = torch.randn(n, heads, DIM, generator=g, **BF16), torch.randn(n, DIM, generator=g, **BF16)
        attn.plan(layout)
        for buffer, part in zip((*q_in, *kv_in), (q[..., :LATENT], q[..., LATENT:], kv[:, :LATENT], kv[:, LATENT:])):
            buffer[:n] = part
        graph.replay()
        write(want_cache, layout, kv)
        # padding rows write to the scratch block only
        assert torch.equal(cache[:, :NUM_BLOCKS], want_cache[:, :NUM_BLOCKS])
        assert relative_error(out[:n], reference(want_cache[LAYER], layout, q)) < 1e-2


def random_split(rng: np.random.Generator, tokens: int, seqs: int) -> np.ndarray:
    cuts = np.sort(rng.choice(np.arange(1, tokens), size=seqs - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [tokens]]))


@pytest.mark.parametrize("heads", [16, 128])
def test_step_budget_bound_against_flashinfer_planner(heads):
    """max_step_tokens against FlashInfer's own work-item count: every split of that many
    tokens into up to max_seqs sequences, any KV lengths, plans; a sixth more does not."""
    fa = pytest.importorskip("flashinfer.mla._batch_mla._backends._fa_common")
    assert fa._FA_MAX_WORK_ITEMS == MAX_WORK_ITEMS
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    max_seqs, rng = 256, np.random.default_rng(0)
    limit = max_step_tokens(heads, max_seqs, num_sms)
    for trial in range(300):
        seqs = [1, max_seqs, int(rng.integers(1, max_seqs + 1))][trial % 3]
        q = random_split(rng, limit, seqs)
        kv = q + rng.integers(0, [1, 64, 200_000][trial % 3] + 1, size=seqs)
        count = fa._fa_plan_work_count(q.tolist(), kv.tolist(), heads, num_sms, True)
        assert count <= MAX_WORK_ITEMS, (seqs, count)

    # the real planner, on a layout at the bound, and refusing one a sixth over it
    cache = torch.zeros(1, 2, BLOCK, DIM, **BF16)
    attention = FlashInferLatentAttention(cache, BLOCK, heads, latent_dim=LATENT, sm_scale=SM_SCALE)

    def plan(query_lens: np.ndarray) -> None:
        start = rng.integers(0, 4096, size=query_lens.shape[0])
        pages = -(-(start + query_lens).max() // BLOCK)
        attention.plan(step_layout(start.tolist(), query_lens.tolist(), np.zeros((len(query_lens), pages), np.int32)))

    plan(random_split(rng, limit, max_seqs))
    with pytest.raises(Exception, match="work items"):
        plan(np.array([limit + limit // 6]))
