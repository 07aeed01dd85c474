"""Prefill and mixed steps through the piecewise CUDA graphs (piecewise_graphs.py) against the
same steps run eagerly, on one runner and one KV cache: the logits of the sampling rows agree
to bf16 rounding (a graph pads the step to its bucket, so its GEMMs may pick other tilings; a
wrong attention input, KV slot or padding row moves them by far more),
and the graphs write the same KV the eager steps do (a later decode reads it).

The engine-level check is test_gpu_engine.py: its prompts' prefill chunks replay these graphs
(mixed_step_graph_tokens is on by default) and must equal transformers."""

from __future__ import annotations

import random

import pytest
import torch
from model_zoo import write_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BLOCK = 16
BUDGET = 256  # max_num_batched_tokens: buckets 16 ... 256


# FlashInfer's widths: head_dim 64 for its attention; its MLA kernels take DeepSeek's latent (512)
# and rotary (64) widths only
SHAPES = {
    "qwen3_moe": dict(hidden_size=256, head_dim=64),
    "deepseek_v3": dict(
        hidden_size=256,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        head_dim=64,
        q_lora_rank=96,
        qk_nope_head_dim=32,
        v_head_dim=48,
    ),
}


@pytest.fixture(scope="module", params=list(SHAPES))
def runner(request, tmp_path_factory):
    from raymoe.actors.engine.local import build_local_engine
    from raymoe.cluster.config import config_from_dict

    kind = request.param
    path = write_checkpoint(kind, tmp_path_factory.mktemp("ckpt") / kind, **SHAPES[kind])
    config = config_from_dict(
        {
            "model": {"path": str(path), "dtype": "bfloat16"},
            "parallel": {"device": "cuda"},
            "engine": {
                "block_size": BLOCK,
                "num_kv_blocks": 128,
                "max_num_batched_tokens": BUDGET,
                "attention_backend": "flashinfer",
            },
        }
    )
    runner = build_local_engine(config).core.executor.runner
    assert runner.mixed_graphs is not None and runner.mixed_graphs.sizes[-1] == BUDGET
    return runner


def _chunk(rid: str, tokens: list[int], start: int, blocks: tuple[int, ...]):
    from raymoe.actors.engine.request import SamplingParams
    from raymoe.actors.engine.scheduler import ScheduledChunk

    sampling = SamplingParams(temperature=0.0)
    return ScheduledChunk(
        request_id=rid,
        token_ids=tuple(tokens),
        start_pos=start,
        block_ids=blocks,
        sample=True,
        sampling=sampling,
        seed=0,
        num_output_tokens=0,
    )


def _both(runner, chunks):
    """This step's sampling rows' logits, eagerly and through the piecewise graphs."""
    from raymoe.actors.engine.step import build_step_layout, pack_step

    step = pack_step(chunks, (sum(len(c.token_ids) for c in chunks),), BLOCK)
    layout = build_step_layout(step, BLOCK)
    assert runner.mixed_graphs.size_for(max(step.dp_token_counts)) is not None
    with torch.inference_mode():
        eager = runner.forward_eager(layout, step.dp_token_counts).float()
        graph = runner._forward_mixed_graph(layout, step.dp_token_counts).float()
    return eager, graph


def _assert_close(eager, graph):
    assert eager.shape == graph.shape
    # bounds as test_gpu_engine.py's: bf16 rounding may flip a router's near-tie for a row
    rel = (graph - eager).norm(dim=-1) / eager.norm(dim=-1)
    assert rel.median() <= 1e-2 and rel.max() <= 6e-2, f"relative errors per row: {rel.tolist()}"


def test_prefill_and_mixed_steps_replay_as_they_run_eagerly(runner):
    rng = random.Random(0)
    prompts = {"a": 37, "b": 100, "c": 5}
    tokens = {rid: [rng.randrange(3, 500) for _ in range(n + 1)] for rid, n in prompts.items()}
    blocks = {"a": tuple(range(0, 4)), "b": tuple(range(8, 16)), "c": tuple(range(20, 22))}

    # a prefill of three sequences (142 tokens: bucket 256)
    first = [_chunk(rid, tokens[rid][:n], 0, blocks[rid]) for rid, n in prompts.items()]
    _assert_close(*_both(runner, first))

    # mixed: two decode rows over that KV, and a new sequence's prefill (bucket 64)
    decode = [_chunk(rid, tokens[rid][n : n + 1], n, blocks[rid]) for rid, n in prompts.items() if rid != "b"]
    new = _chunk("d", [rng.randrange(3, 500) for _ in range(40)], 0, tuple(range(30, 33)))
    _assert_close(*_both(runner, [*decode, new]))


def _run(runner, chunks, graph: bool):
    from raymoe.actors.engine.step import build_step_layout, pack_step

    step = pack_step(chunks, (sum(len(c.token_ids) for c in chunks),), BLOCK)
    layout = build_step_layout(step, BLOCK)
    with torch.inference_mode():
        if graph:
            return runner._forward_mixed_graph(layout, step.dp_token_counts).float()
        return runner.forward_eager(layout, step.dp_token_counts).float()


def test_the_kv_a_graph_writes_is_the_kv_an_eager_step_writes(runner):
    """A prefill through the graphs only, then the same prefill eagerly into the same slots:
    the cache entries agree (bf16 rounding apart), and so does a decode reading them."""
    prompt, blocks = [3 + (11 * i) % 400 for i in range(70)], (50, 51, 52, 53, 54)
    prefill, decode = _chunk("f", prompt, 0, blocks), _chunk("f", [9], 70, blocks)
    cache = runner.attention.kv_cache
    cache[:, list(blocks)] = 0
    _run(runner, [prefill], graph=True)
    after_graph = _run(runner, [decode], graph=False)
    by_graph = cache[:, list(blocks)].float().clone()
    assert by_graph.abs().amax() > 0, "the graphs wrote no KV"
    _run(runner, [prefill], graph=False)
    by_eager = cache[:, list(blocks)].float()
    assert ((by_graph - by_eager).norm() / by_eager.norm()).item() <= 1e-2
    _assert_close(_run(runner, [decode], graph=False), after_graph)


def test_a_replay_is_bit_identical_after_other_buckets_ran(runner):
    """Step A (bucket 256), step B (bucket 64), step A again: A's logits are the same bits, so no
    bucket's replay reads memory another bucket's replay left behind."""
    a = [_chunk("g", [5 + i % 300 for i in range(150)], 0, tuple(range(60, 70)))]
    b = [_chunk("h", [7 + i % 200 for i in range(40)], 0, tuple(range(80, 83)))]
    first = _run(runner, a, graph=True)
    _run(runner, b, graph=True)
    assert torch.equal(_run(runner, a, graph=True), first)
