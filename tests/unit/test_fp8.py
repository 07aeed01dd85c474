"""FP8 block quantisation (actors/models/fp8.py): the round trip's error bound, partial blocks,
which weights stay FP8 under which model.quantization, and the refusals of slices that would
break a block."""

from __future__ import annotations

import pytest
import torch

from raymoe.actors.models.fp8 import (
    FP8,
    WeightSlice,
    dequantize_blocks,
    quantize_blocks,
    quantize_groups,
    resolve_fp8_block,
    scale_shape,
)


def test_round_trip_error_is_within_half_an_fp8_step_of_each_block():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 40, 72, generator=g) * torch.logspace(-3, 1, 72)  # columns of very different sizes
    q, scale = quantize_blocks(w, (16, 32))
    assert q.dtype == FP8 and scale.shape == scale_shape(w.shape, (16, 32)) == (2, 3, 3)
    back = dequantize_blocks(q, scale, (16, 32))
    # e4m3: 3 mantissa bits, so a relative step of 2^-3 at most; half a step from rounding
    per_block = scale.repeat_interleave(16, 1)[:, :40].repeat_interleave(32, 2)[:, :, :72] * 448
    assert ((back - w).abs() <= per_block * 2**-4 + 1e-12).all()
    assert not torch.equal(back, w)
    # every block's largest value lands on the largest FP8 value
    assert q.float().abs().amax() == 448


def test_activation_groups_scale_each_row_and_group_on_its_own():
    x = torch.tensor([[1.0, -2.0, 100.0, 0.5], [0.0, 0.0, 3.0, -6.0]])
    q, scale = quantize_groups(x, 2)
    torch.testing.assert_close(scale, torch.tensor([[2.0, 100.0], [1e-12, 6.0]]) / 448)
    assert q[0, 1].float() == -448 and q[1, 3].float() == -448 and q[1, 0].float() == 0


def test_quantization_setting_decides_which_models_keep_fp8():
    assert resolve_fp8_block("auto", (128, 128), on_cuda=True) == (128, 128)
    assert resolve_fp8_block("auto", (128, 128), on_cuda=False) is None  # CPU: dequantised at load
    assert resolve_fp8_block("auto", None, on_cuda=True) is None
    assert resolve_fp8_block("fp8", None, on_cuda=False) == (128, 128)  # a bf16 checkpoint quantised
    assert resolve_fp8_block("fp8", [64, 64], on_cuda=False) == (64, 64)
    assert resolve_fp8_block("none", (128, 128), on_cuda=True) is None
    # blocks the Triton kernels cannot take: dequantised under auto, refused under fp8 (GPUs only)
    assert resolve_fp8_block("auto", (24, 40), on_cuda=True) is None
    assert resolve_fp8_block("fp8", (24, 40), on_cuda=False) == (24, 40)
    with pytest.raises(ValueError, match=r"model.quantization: fp8 on GPUs needs .*\[24, 40\]"):
        resolve_fp8_block("fp8", (24, 40), on_cuda=True)


def test_projections_a_checkpoint_ships_unquantised_are_refused_in_fp8_only():
    """modules_to_not_convert naming embeddings, norms, routers or the LM head changes nothing
    (raymoe keeps them in the compute dtype anyway); naming a projection is refused when it
    would be kept in FP8, and fine when the checkpoint runs dequantised."""
    # kv_b_proj: MLA's, always dequantised into the absorbed per-head weights
    harmless = ["model.embed_tokens", "lm_head", "mlp.gate", "model.layers.0.input_layernorm", "self_attn.kv_b_proj"]
    assert resolve_fp8_block("fp8", (128, 128), on_cuda=False, unconverted=harmless) == (128, 128)
    odd = harmless + ["model.layers.3.self_attn.q_proj"]
    with pytest.raises(ValueError, match=r"modules_to_not_convert names \['model.layers.3.self_attn.q_proj'\]"):
        resolve_fp8_block("auto", (128, 128), on_cuda=True, unconverted=odd)
    assert resolve_fp8_block("auto", (128, 128), on_cuda=False, unconverted=odd) is None
    assert resolve_fp8_block("none", (128, 128), on_cuda=True, unconverted=odd) is None


def test_fused_parts_must_fill_whole_blocks():
    q, s = quantize_blocks(torch.randn(24, 16), (8, 8))
    part = WeightSlice(q, s, (8, 8))
    fused = WeightSlice.cat([part, part], 0)
    assert fused.data.shape == (48, 16) and fused.scale.shape == (6, 2)
    odd = WeightSlice(q[:20], s[:3], (8, 8))
    with pytest.raises(ValueError, match="20 rows does not fill whole FP8 blocks of 8.*model.quantization: none"):
        WeightSlice.cat([odd, part], 0, "q/k/v")
    WeightSlice.cat([part, odd], 0)  # the last part may end mid-block


def test_rows_reorder_within_their_blocks_only():
    q, s = quantize_blocks(torch.randn(16, 8), (8, 8))
    part = WeightSlice(q, s, (8, 8))
    order = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15])
    moved = part.reorder_rows(order)
    assert torch.equal(moved.data.view(torch.uint8), q.view(torch.uint8)[order])
    with pytest.raises(ValueError, match="^x.q_proj.weight: its rotary rows would move across FP8 blocks of 8"):
        part.reorder_rows(torch.arange(16).flip(0), "x.q_proj.weight")


def test_a_plain_slice_is_quantised_when_stored_into_an_fp8_weight():
    w = torch.randn(20, 24)
    weight, scale = torch.zeros(20, 24, dtype=FP8), torch.zeros(3, 3)
    WeightSlice(w).store(weight, scale, (8, 8))
    q, s = quantize_blocks(w, (8, 8))
    assert torch.equal(weight.view(torch.uint8), q.view(torch.uint8)) and torch.equal(scale, s)
    plain = torch.zeros(20, 24)
    WeightSlice(q, s, (8, 8)).store(plain, None, None)  # into a compute-dtype weight: dequantised
    assert torch.equal(plain, dequantize_blocks(q, s, (8, 8)))


def test_random_fp8_weights_draw_the_bf16_distribution_and_generate():
    """model.load_format: dummy with quantization fp8 (engine_bench --dtype fp8): projections
    in FP8 whose dequantised values are normal(0, 0.02) like the bf16 draw; the engine runs."""
    from raymoe.actors.engine.local import build_local_engine
    from raymoe.actors.engine.request import SamplingParams
    from raymoe.cluster.config import config_from_dict

    config = config_from_dict({"model": {"load_format": "dummy", "quantization": "fp8", "dtype": "float32"}})
    local = build_local_engine(config)
    model = local.core.executor.runner.model
    moe = model.layers[0].mlp
    assert moe.w13.dtype == FP8 and moe.w13_scale.dtype == torch.float32 and model.lm_head.embedding.weight.dtype != FP8
    weights = dequantize_blocks(moe.w13, moe.w13_scale, (128, 128))
    assert abs(weights.std().item() - 0.02) < 0.002 and abs(weights.mean().item()) < 0.002
    local.core.add_request("r", [5, 6, 7], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    tokens = []
    while local.core.has_unfinished:
        tokens += [o.token for o in local.core.step()]
    assert len(tokens) == 4
