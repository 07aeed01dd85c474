"""On GPUs: raymoe in bf16 with FlashInfer attention and grouped-GEMM experts equals
transformers on the same weights (first 16 greedy tokens; logits rel. error <= 2e-2)."""
from __future__ import annotations

import random

import pytest
import torch

from model_zoo import hf_greedy, write_checkpoint

GPUS = torch.cuda.device_count()
NEW_TOKENS = 16
# (tp, ep); dp = ep / tp when ep exceeds tp
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]

pytestmark = pytest.mark.skipif(GPUS < 1, reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def stable_case(tmp_path_factory):
    """A checkpoint, and the prompts on which greedy decoding is stable: transformers' own
    bf16 run agrees with its float32 run for all 16 tokens (bf16 rounding must not be able
    to flip a near-tie, or token equality would test luck)."""
    # head_dim 64: FlashInfer's kernels cover 64, 128 and 256
    path = write_checkpoint("qwen3_moe", tmp_path_factory.mktemp("ckpt") / "qwen3_moe", initializer_range=0.05,
                            embedding_std=1.0, hidden_size=256, head_dim=64)  # fmt: skip
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randrange(4, 80))] for _ in range(16)]
    ref = hf_greedy(path, prompts, NEW_TOKENS, torch.float32, "cuda")
    ref_bf16 = hf_greedy(path, prompts, NEW_TOKENS, torch.bfloat16, "cuda")
    keep = [i for i in range(len(prompts)) if ref[i][0] == ref_bf16[i][0]]
    assert len(keep) >= 6, f"only {len(keep)} of {len(prompts)} prompts are bf16-stable"
    return path, [prompts[i] for i in keep], [ref[i] for i in keep]


@pytest.mark.parametrize("tp,ep", LAYOUTS, ids=[f"tp{t}-ep{e}" for t, e in LAYOUTS])
def test_bf16_equal_to_transformers(gpu_ray, stable_case, tp, ep):
    from raymoe.cluster.config import config_from_dict
    from raymoe.deploy import LLM, SamplingParams

    world = max(tp, ep)
    if GPUS < world:
        pytest.skip(f"needs {world} GPUs, host has {GPUS}")
    path, prompts, ref = stable_case
    config = config_from_dict(
        {
            "model": {"path": str(path), "dtype": "bfloat16"},
            "parallel": {"tp": tp, "dp": max(1, ep // tp), "ep": ep, "device": "cuda"},
            "engine": {"block_size": 16, "num_kv_blocks": 256, "max_num_batched_tokens": 64,
                       "attention_backend": "flashinfer"},
        }
    )  # fmt: skip
    with LLM(config, collect_logits=True) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
    for i, (out, (tokens, logits)) in enumerate(zip(outs, ref)):
        assert out.token_ids == tokens, f"prompt {i}: greedy tokens differ"
        err = ((torch.stack(out.logits) - logits).norm() / logits.norm()).item()
        assert err <= 2e-2, f"prompt {i}: logits rel. error {err:.2e}"
