"""FP8 block-quantised checkpoints (the Hub's format: float8_e4m3fn weights, one float32
``weight_scale_inv`` per block, config.json's quantization_config) give the same greedy tokens
and logits as transformers running the dequantised weights, at tp/ep/dp layouts:

- dequantised at load (CPU's default), sliced per rank on blocks that need not align;
- kept in FP8 with their scales (``model.quantization: fp8``, the GPU default), sliced on block
  boundaries, scales moving with the experts EPLB moves; a bf16 checkpoint quantised at load.

Other quantization methods, and FP8 slices off the blocks, are refused by name. (On CPU an FP8
weight is dequantised at each use: the same maths as the reference; the GPU kernels, which
quantise activations too, are checked in tests/unit/test_triton_kernels.py and tests/gpu.)"""

from __future__ import annotations

import json
import random
import sys
import time

import pytest
import ray
import torch
from model_zoo import fp8_checkpoints, hf_greedy, write_checkpoint

from raymoe.actors.models.checkpoint import CheckpointReader
from raymoe.actors.models.spec import spec_from_hf_config
from raymoe.cluster.config import config_from_dict
from raymoe.deploy import LLM, SamplingParams

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # _weight_dtypes runs on the ranks

BLOCK = (24, 40)  # divides no dimension of the zoo's shapes: rank slices start mid-block
ALIGNED = (8, 8)  # divides every split of the zoo's shapes (MLA's 24-row q bottleneck too)
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


def _aligned(tmp_path_factory, kind: str, block: tuple[int, int]):
    """(the bf16 checkpoint, its FP8 checkpoint with ``block``, transformers' outputs on the
    dequantised weights)."""
    root = tmp_path_factory.mktemp(f"fp8-{kind}-{block[0]}")
    source = write_checkpoint(kind, root / "bf16")
    fp8_checkpoints(source, root / "fp8", root / "reference", block)
    return source, root / "fp8", hf_greedy(root / "reference", _prompts(), 12)


@pytest.fixture(scope="module")
def aligned_checkpoints(tmp_path_factory):
    return _aligned(tmp_path_factory, "qwen3_moe", ALIGNED)


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


def _config(fp8_dir, tp: int, ep: int, eplb: bool = False, quantization: str = "auto"):
    return config_from_dict(
        {
            "model": {"path": str(fp8_dir), "dtype": "float32", "quantization": quantization},
            "parallel": {"tp": tp, "dp": max(1, ep // tp), "ep": ep, "device": "cpu"},
            "engine": {"block_size": 8, "num_kv_blocks": 64},
            "eplb": {"enabled": eplb, "num_redundant_experts": ep if eplb else 0, "rebalance_every_steps": 10**6},
        }
    )


def _weight_dtypes(ctx) -> dict:
    return {name: p.dtype for name, p in ctx.state["runner"].model.named_parameters()}


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


@pytest.mark.parametrize("quantization", ["auto", "fp8"])
def test_fp8_experts_moved_by_eplb_keep_outputs(ray_session, checkpoints, aligned_checkpoints, quantization):
    """EPLB moves the experts, dequantised (auto on CPU) or in FP8 with their block scales:
    outputs still equal the reference."""
    fp8_dir, expected = checkpoints if quantization == "auto" else aligned_checkpoints[1:]
    with LLM(_config(fp8_dir, 1, 2, eplb=True, quantization=quantization), collect_logits=True) as llm:
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
        ({"quant_method": "fp8", "weight_block_size": [128, 128], "fmt": "e5m2"}, "fmt"),
        ({"quant_method": "fp8", "weight_block_size": [True, True]}, "weight_block_size"),
        (
            {"quant_method": "fp8", "weight_block_size": [128, 128], "modules_to_not_convert": [1]},
            "modules_to_not_convert",
        ),
    ],
)
def test_other_quantizations_are_refused_by_name(checkpoints, quant, field):
    fp8_dir, _ = checkpoints
    cfg = json.loads((fp8_dir / "config.json").read_text())
    with pytest.raises(ValueError, match=f"quantization_config.{field}"):
        spec_from_hf_config({**cfg, "quantization_config": quant})


# the block-aligned checkpoint at no split and at tp and ep together (the checkpoint test above
# takes every layout, its blocks cut mid-slice)
ALIGNED_LAYOUTS = [(1, 1), (2, 4)]


@pytest.mark.parametrize("tp,ep", ALIGNED_LAYOUTS, ids=[f"tp{t}-ep{e}" for t, e in ALIGNED_LAYOUTS])
def test_weights_kept_in_fp8_equal_transformers_on_the_dequantised_weights(ray_session, aligned_checkpoints, tp, ep):
    _, fp8_dir, expected = aligned_checkpoints
    with LLM(_config(fp8_dir, tp, ep, quantization="fp8"), collect_logits=True) as llm:
        kept = ray.get(llm.controller.run_on_ranks.remote(_weight_dtypes))[-1]
        _check(llm.generate(_prompts(), SAMPLING), expected, f"fp8 tp={tp} ep={ep}")
    assert kept["layers.0.mlp.w13"] == kept["layers.1.mlp.gate_up"] == torch.float8_e4m3fn
    assert kept["layers.0.attn.qkv.weight"] == kept["layers.0.attn.o_proj.weight"] == torch.float8_e4m3fn
    assert kept["layers.0.mlp.w13_scale"] == kept["layers.0.mlp.router"] == torch.float32


def test_deepseek_v3_latent_attention_kept_in_fp8(ray_session, tmp_path_factory):
    """MLA's fused q / latent projection and q_b_proj in FP8: interleaved rotary rows reordered
    within their blocks, q_b_proj split by head over tp."""
    _, fp8_dir, expected = _aligned(tmp_path_factory, "deepseek_v3", ALIGNED)
    with LLM(_config(fp8_dir, 2, 1, quantization="fp8"), collect_logits=True) as llm:
        kept = ray.get(llm.controller.run_on_ranks.remote(_weight_dtypes))[1]
        _check(llm.generate(_prompts(), SAMPLING), expected, "deepseek_v3 fp8 tp=2")
    assert kept["layers.0.attn.in_proj"] == kept["layers.0.attn.q_b"] == kept["layers.1.mlp.w2"] == torch.float8_e4m3fn


def test_bf16_checkpoint_quantised_at_load(ray_session, tmp_path_factory):
    """model.quantization: fp8 on a bf16 checkpoint: 128 x 128 blocks, the same values as an FP8
    checkpoint written with them (dimensions of 128, so that every fused part is whole blocks)."""
    wide = dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=8, moe_intermediate_size=128)
    root = tmp_path_factory.mktemp("fp8-128")
    source = write_checkpoint("qwen3_moe", root / "bf16", **wide)
    fp8_checkpoints(source, root / "fp8", root / "reference", (128, 128))
    expected = hf_greedy(root / "reference", _prompts(), 12)
    with LLM(_config(source, 1, 2, quantization="fp8"), collect_logits=True) as llm:
        kept = ray.get(llm.controller.run_on_ranks.remote(_weight_dtypes))[0]
        _check(llm.generate(_prompts(), SAMPLING), expected, "bf16 quantised at load")
    assert kept["layers.0.mlp.w2"] == kept["layers.0.attn.qkv.weight"] == torch.float8_e4m3fn


def test_fp8_slices_off_the_blocks_are_refused_by_name(checkpoints):
    """A tp split that starts mid-block cannot keep the checkpoint's FP8 blocks: the error names
    the tensor, the rows and the way out."""
    fp8_dir, _ = checkpoints
    reader = CheckpointReader(fp8_dir, fp8_block=BLOCK)
    name = "model.layers.1.mlp.gate_proj.weight"  # the dense layer
    with pytest.raises(ValueError, match=r"gate_proj.weight: this rank's rows \[64, 128\).*model.quantization: none"):
        reader.read_weight(name, 0, 64, 128, fp8_block=BLOCK)
    whole = reader.read_weight(name, 0, 0, 48, fp8_block=BLOCK)  # two whole blocks of 24 rows
    assert whole.data.dtype == torch.float8_e4m3fn and whole.scale.shape == (2, 2)
    assert torch.equal(whole.data, reader._slice(name, 0, 0, 48)[0])


def test_one_module_name_not_to_convert_is_one_name(checkpoints):
    fp8_dir, _ = checkpoints
    cfg = json.loads((fp8_dir / "config.json").read_text())
    quant = {**cfg["quantization_config"], "modules_to_not_convert": "lm_head"}
    assert spec_from_hf_config({**cfg, "quantization_config": quant}).fp8_unconverted == ("lm_head",)


def _edited_copy(fp8_dir, directory, edit) -> CheckpointReader:
    """A copy of the FP8 checkpoint with ``edit`` applied to its tensors (a dict, in place)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(fp8_dir, directory)
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"))
    return CheckpointReader(directory, fp8_block=BLOCK)


def test_a_scale_of_another_shape_is_refused_naming_it(checkpoints, tmp_path):
    """Scales written for other blocks (or one row short) scaled the wrong blocks: the output
    was silently wrong, or a torch error named no tensor."""
    fp8_dir, _ = checkpoints
    name = "model.layers.0.self_attn.o_proj.weight"
    reader = _edited_copy(fp8_dir, tmp_path / "ckpt", lambda t: t.update({name + "_scale_inv": torch.ones(6, 4)}))
    message = rf"{name}_scale_inv has shape \[6, 4\], but a 64 x 64 weight in FP8 blocks of \[24, 40\].* has \[3, 2\]"
    for read in (lambda: reader.read(name), lambda: reader.read_weight(name, fp8_block=BLOCK)):
        with pytest.raises(ValueError, match=message):
            read()


def test_a_projection_an_fp8_checkpoint_ships_unquantised_unlisted_is_refused_in_fp8(checkpoints, tmp_path):
    """A projection in float32 that modules_to_not_convert does not name: kept in FP8 it was
    quantised, unlike the checkpoint's own weights (and a named one is refused the same way);
    dequantised (model.quantization: none, or auto on CPU) it loads as shipped."""
    fp8_dir, _ = checkpoints
    name = "model.layers.0.self_attn.o_proj.weight"
    plain = CheckpointReader(fp8_dir, fp8_block=BLOCK).read(name)

    def unquantise(tensors):
        tensors[name] = plain.contiguous()
        del tensors[name + "_scale_inv"]

    reader = _edited_copy(fp8_dir, tmp_path / "ckpt", unquantise)
    with pytest.raises(ValueError, match=rf"{name} is torch.float32, not float8.*model.quantization: none"):
        reader.read_weight(name, fp8_block=BLOCK)
    assert torch.equal(reader.read_weight(name).data, plain)
