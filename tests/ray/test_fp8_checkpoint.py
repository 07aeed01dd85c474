"""FP8 block-quantised checkpoints (the Hub's format: float8_e4m3fn weights, one float32
``weight_scale_inv`` per block, config.json's quantization_config) load dequantised, sliced
per rank on blocks that need not align with the slices, and give the same greedy tokens and
logits as transformers running the dequantised weights, at tp/ep/dp layouts; other
quantization methods are refused by name."""

from __future__ import annotations

import json
import random
import time

import pytest
import ray
import torch
from model_zoo import fp8_checkpoints, hf_greedy, write_checkpoint

from raymoe.actors.models.checkpoint import CheckpointReader
from raymoe.actors.models.spec import spec_from_hf_config
from raymoe.cluster.config import config_from_dict
from raymoe.deploy import LLM, SamplingParams

BLOCK = (24, 40)  # divides no dimension of the zoo's shapes: rank slices start mid-block
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 4)]  # (tp, ep); dp = ep / tp past tp


def _prompts() -> list[list[int]]:
    rng = random.Random(3)
    return [[rng.randrange(3, 500) for _ in range(n)] for n in (9, 30, 2)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    source = write_checkpoint("qwen3_moe", root / "bf16")
    fp8_checkpoints(source, root / "fp8", root / "reference", BLOCK)
    return root / "fp8", hf_greedy(root / "reference", _prompts(), 12)


@pytest.fixture(scope="module")
def deepseek_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8-deepseek")
    source = write_checkpoint("deepseek_v3", root / "bf16")
    fp8_checkpoints(source, root / "fp8", root / "reference", BLOCK)
    return root / "fp8", hf_greedy(root / "reference", _prompts(), 12)


def test_reader_dequantises_any_slice(checkpoints):
    fp8_dir, _ = checkpoints
    reader = CheckpointReader(fp8_dir, fp8_block=BLOCK)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert reader.shape(name) == [64, 64]
    full = reader.read(name)
    assert full.dtype == torch.float32 and reader.read(name + "_scale_inv").shape == (3, 2)
    assert torch.equal(reader.read(name, 0, 16, 32), full[16:32])  # rows from mid-block
    assert torch.equal(reader.read(name, 1, 5, 47), full[:, 5:47])  # columns across blocks
    with pytest.raises(ValueError, match="no fp8 quantization_config"):
        CheckpointReader(fp8_dir).read(name)


def _config(fp8_dir, tp: int, ep: int, eplb: bool = False):
    return config_from_dict(
        {
            "model": {"path": str(fp8_dir), "dtype": "float32"},
            "parallel": {"tp": tp, "dp": max(1, ep // tp), "ep": ep, "device": "cpu"},
            "engine": {"block_size": 8, "num_kv_blocks": 64},
            "eplb": {"enabled": eplb, "num_redundant_experts": ep if eplb else 0, "rebalance_every_steps": 10**6},
        }
    )


def _check(outputs, expected, what: str) -> None:
    for i, (out, (tokens, logits)) in enumerate(zip(outputs, expected)):
        assert out.token_ids == tokens, f"{what} prompt {i}"
        err = ((torch.stack(out.logits) - logits).norm() / logits.norm()).item()
        assert err < 1e-4, f"{what} prompt {i}: logits rel. error {err:.2e}"


SAMPLING = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("tp,ep", LAYOUTS, ids=[f"tp{t}-ep{e}" for t, e in LAYOUTS])
def test_fp8_checkpoint_equals_transformers_on_its_dequantised_weights(ray_session, checkpoints, tp, ep):
    fp8_dir, expected = checkpoints
    with LLM(_config(fp8_dir, tp, ep), collect_logits=True) as llm:
        _check(llm.generate(_prompts(), SAMPLING), expected, f"tp={tp} ep={ep}")


@pytest.mark.parametrize("tp,ep", [(2, 1), (1, 2)], ids=["tp2-ep1", "tp1-ep2"])
def test_fp8_deepseek_v3_equals_transformers_on_its_dequantised_weights(ray_session, deepseek_checkpoints, tp, ep):
    """DeepSeek-V3 ships FP8: its latent-attention projections (q_b_proj and kv_b_proj split by
    head over tp, from mid-block rows) dequantise like every other weight."""
    fp8_dir, expected = deepseek_checkpoints
    with LLM(_config(fp8_dir, tp, ep), collect_logits=True) as llm:
        _check(llm.generate(_prompts(), SAMPLING), expected, f"deepseek_v3 tp={tp} ep={ep}")


def test_fp8_experts_moved_by_eplb_keep_outputs(ray_session, checkpoints):
    """EPLB moves the dequantised experts like any others: outputs still equal the reference."""
    fp8_dir, expected = checkpoints
    with LLM(_config(fp8_dir, 1, 2, eplb=True), collect_logits=True) as llm:
        hot = torch.ones(8)
        hot[0], hot[5] = 60.0, 25.0  # two MoE layers (layer 1 is dense), experts 0 and 5 hot
        ray.get(llm.controller.rebalance.remote(((torch.rand(2, 8) + hot) * 1000).tolist()))
        deadline = time.monotonic() + 60
        while ray.get(llm.controller.eplb_status.remote())["rebalances"] < 1 and time.monotonic() < deadline:
            llm.generate(_prompts()[:1], SAMPLING)  # the moves land between steps
        status = ray.get(llm.controller.eplb_status.remote())
        assert status["rebalances"] == 1 and status["balancedness_after"] > status["balancedness_before"]
        _check(llm.generate(_prompts(), SAMPLING), expected, "after a rebalance")


@pytest.mark.parametrize(
    "quant,field",
    [
        ({"quant_method": "gptq", "bits": 4}, "quant_method"),
        ({"quant_method": "fp8"}, "weight_block_size"),
        ({"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "static"}, "activation_scheme"),
    ],
)
def test_other_quantizations_are_refused_by_name(checkpoints, quant, field):
    fp8_dir, _ = checkpoints
    cfg = json.loads((fp8_dir / "config.json").read_text())
    with pytest.raises(ValueError, match=f"quantization_config.{field}"):
        spec_from_hf_config({**cfg, "quantization_config": quant})
