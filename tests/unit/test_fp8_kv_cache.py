"""engine.kv_cache_dtype: fp8. The cache holds k and v in float8_e4m3fn (saturated at +-448,
scale 1), so the engine must equal transformers whose attention sees the same rounded keys
and values (model_zoo.fp8_rounded_kv_attention: registered with transformers'
AttentionInterface, it rounds them and calls transformers' own SDPA attention); the cache's
bytes halve against bf16."""

from __future__ import annotations

import random

import pytest
import torch
from model_zoo import fp8_rounded_kv_attention, hf_greedy, write_checkpoint

from raymoe.actors.engine.attention_backend import resolve_kv_cache_dtype
from raymoe.actors.engine.attention_torch import write_kv
from raymoe.actors.engine.local import build_local_engine
from raymoe.actors.engine.request import SamplingParams
from raymoe.cluster.config import config_from_dict

FP8 = torch.float8_e4m3fn
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def fp8_attention() -> str:
    return fp8_rounded_kv_attention()


def _prompts() -> list[list[int]]:
    rng = random.Random(3)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in (5, 29, 1, 18)]


def _generate(path, kv_cache_dtype: str) -> list[tuple[list[int], torch.Tensor]]:
    """The engine's greedy tokens and float32 logits per prompt, in one batch; a token budget of
    16 prefills the long prompts in chunks, beside other requests' decodes."""
    config = config_from_dict(
        {
            "model": {"path": str(path), "dtype": "float32"},
            "engine": {
                "block_size": 4,
                "num_kv_blocks": 64,
                "max_num_batched_tokens": 16,
                "kv_cache_dtype": kv_cache_dtype,
            },
        }
    )
    local = build_local_engine(config, collect_logits=True, num_threads=1)
    assert local.core.executor.runner.attention.kv_cache.dtype == (FP8 if kv_cache_dtype == "fp8" else torch.float32)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(_prompts()):
        local.core.add_request(str(i), prompt, params)
    out = {str(i): [] for i in range(len(_prompts()))}
    while local.core.has_unfinished:
        for o in local.core.step():
            out[o.request_id].append(o)
    return [([o.token for o in out[str(i)]], torch.stack([o.logits for o in out[str(i)]])) for i in range(len(out))]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# qwen3_moe: q/k norms before the cache; llama: none (saturation: the write tests below)
@pytest.mark.parametrize("kind", ["qwen3_moe", "llama"])
def test_fp8_kv_cache_equals_transformers_on_fp8_rounded_keys_and_values(tmp_path, fp8_attention, kind):
    path = write_checkpoint(kind, tmp_path / kind)
    rounded = hf_greedy(path, _prompts(), NEW_TOKENS, attn_implementation=fp8_attention)
    exact = hf_greedy(path, _prompts(), NEW_TOKENS)
    ours = _generate(path, "fp8")
    for i, ((tokens, logits), (ref_tokens, ref_logits), (_, exact_logits)) in enumerate(zip(ours, rounded, exact)):
        assert tokens == ref_tokens, f"{kind} prompt {i}: tokens differ"
        err = _rel(logits[: len(tokens)], ref_logits)
        assert err < 1e-3, f"{kind} prompt {i}: logits rel. error {err:.2e}"
        # the rounding is visible: the unrounded reference is much further off (so this test
        # would notice a cache that kept full precision)
        if i == 1:
            assert _rel(ref_logits, exact_logits) > 20 * max(err, 1e-6)


def test_fp8_kv_cache_holds_four_times_a_float32_caches_blocks(monkeypatch):
    """Sized by the runner: the same byte budget buys 4 x the blocks of a float32 cache."""
    from raymoe.actors.engine import kv_cache_size

    monkeypatch.setattr(kv_cache_size, "CPU_KV_BUDGET_BYTES", 1 << 20)
    sized = {}
    for dtype in ("auto", "fp8"):
        config = config_from_dict({"model": {"dtype": "float32"}, "engine": {"kv_cache_dtype": dtype}})
        runner = build_local_engine(config, num_threads=1).core.executor.runner
        sized[dtype] = (runner.kv_block_bytes(), runner.attention.kv_cache.shape[1] - 1)  # less the scratch block
    assert sized["auto"][0] == 4 * sized["fp8"][0]
    assert sized["auto"][1] == (1 << 20) // sized["auto"][0]
    assert sized["fp8"][1] == (1 << 20) // sized["fp8"][0] == 4 * sized["auto"][1]


def test_the_torch_write_saturates_and_rounds_into_an_fp8_cache():
    cache = torch.zeros(3, 2, 4, 2, 8, dtype=FP8)
    k = torch.tensor([1000.0, -1000.0, 448.0, 0.3, 1e-9, -2.5, 300.0, 17.0]).repeat(2, 2, 1)
    write_kv(cache, torch.tensor([2, 0]), torch.tensor([3, 1]), k=k, v=-k)
    got = cache[2, 0, 3, 0].float()
    assert got[:3].tolist() == [448.0, -448.0, 448.0]
    assert torch.equal(got, k[0, 0].clamp(-448, 448).to(FP8).float())
    assert torch.equal(cache[0, 1, 1].float(), -cache[2, 0, 3].float())
    assert not cache[1].float().any()


def test_kv_cache_dtype_resolves_and_refuses_the_latent_cache():
    assert resolve_kv_cache_dtype("auto", torch.bfloat16, latent=False) == torch.bfloat16
    assert resolve_kv_cache_dtype("fp8", torch.bfloat16, latent=False) == FP8
    assert resolve_kv_cache_dtype("auto", torch.bfloat16, latent=True) == torch.bfloat16
    with pytest.raises(ValueError, match="engine.kv_cache_dtype: fp8 .*latent"):
        resolve_kv_cache_dtype("fp8", torch.bfloat16, latent=True)
    with pytest.raises(ValueError, match="engine.kv_cache_dtype"):
        config_from_dict({"engine": {"kv_cache_dtype": "int8"}})
