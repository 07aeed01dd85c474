"""The checkpoint reader fails on tensors nothing read (weights of something raymoe does
not implement) and names the ones transformers ignores too in one warning line, and on a
tensor whose shape its config.json contradicts (where a rank reads a slice, which would
otherwise load part of the weights without an error)."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from model_zoo import write_checkpoint
from safetensors.torch import load_file, save_file

from raymoe.actors.engine.local import build_local_engine
from raymoe.actors.engine.request import SamplingParams
from raymoe.actors.models.checkpoint import CheckpointReader
from raymoe.actors.models.decoder import known_unused_tensors
from raymoe.actors.models.spec import spec_from_hf_config
from raymoe.cluster.config import config_from_dict


def test_a_tensor_neither_read_nor_marked_used_fails_naming_it(tmp_path):
    tensors = {"a": torch.zeros(2), "b": torch.zeros(2), "c.inv_freq": torch.zeros(2), "d": torch.zeros(2)}
    tensors["empty"] = torch.zeros(0, 4)  # no weights: never counted as unused
    save_file(tensors, str(tmp_path / "model.safetensors"))
    reader = CheckpointReader(tmp_path)
    reader.read("a")
    reader.mark_used("b")
    with pytest.raises(ValueError, match=r"not use: d \("):
        reader.check_all_used([r"\.inv_freq$"])
    reader.mark_used("d")
    assert reader.check_all_used([r"\.inv_freq$"]) == ["c.inv_freq"]
    with pytest.raises(ValueError, match="missing"):
        reader.mark_used("e")


def test_multi_token_prediction_layers_are_known_unused():
    cfg = {
        "architectures": ["Glm4MoeForCausalLM"],
        **dict(vocab_size=64, hidden_size=32, num_attention_heads=2, num_key_value_heads=2),
        **dict(num_hidden_layers=3, intermediate_size=64),
        **dict(moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, num_nextn_predict_layers=1),
    }
    patterns = known_unused_tensors(spec_from_hf_config(cfg))
    assert any(re.search(p, "model.layers.3.eh_proj.weight") for p in patterns)
    assert not any(re.search(p, "model.layers.2.mlp.gate.weight") for p in patterns)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return write_checkpoint("llama", tmp_path_factory.mktemp("zoo") / "llama")


def _with_extra_tensors(src, dst, extra: dict[str, torch.Tensor]):
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    save_file({**load_file(str(src / "model.safetensors")), **extra}, str(dst / "model.safetensors"), {"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    return write_checkpoint("qwen3_moe", tmp_path_factory.mktemp("zoo") / "qwen3_moe")


def _with_config(src, dst, **fields):
    """A copy of checkpoint ``src`` whose config.json says ``fields`` instead."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **fields}))
    return dst


@pytest.mark.parametrize(
    "kind, fields, tensor",
    [
        ("qwen3_moe", {"moe_intermediate_size": 16}, r"mlp\.experts\.\d+\.gate_proj"),  # the zoo's 32
        ("qwen3_moe", {"vocab_size": 500}, r"embed_tokens"),  # the zoo's 512
        ("llama", {"intermediate_size": 64}, r"mlp\.gate_proj"),  # the zoo's 128
        ("llama", {"num_key_value_heads": 1}, r"k_proj"),  # the zoo's 2
    ],
)
def test_a_config_json_its_tensors_contradict_fails_the_load(kind, fields, tensor, request, tmp_path):
    path = _with_config(request.getfixturevalue(kind), tmp_path / "ckpt", **fields)
    with pytest.raises(ValueError, match=rf"{tensor}\.weight has shape .* disagree"):
        _load(path)


def _load(path):
    config = config_from_dict({"model": {"path": str(path), "dtype": "float32"}, "engine": {"num_kv_blocks": 8}})
    return build_local_engine(config, num_threads=1)


def test_an_mlp_bias_the_config_does_not_declare_fails_the_load(llama, tmp_path):
    path = _with_extra_tensors(llama, tmp_path / "ckpt", {"model.layers.0.mlp.gate_proj.bias": torch.zeros(128)})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.bias"):
        _load(path)


def test_rotary_tables_in_the_checkpoint_are_named_in_one_warning(llama, tmp_path, caplog):
    extra = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.zeros(8) for i in range(2)}
    path = _with_extra_tensors(llama, tmp_path / "ckpt", extra)
    with caplog.at_level(logging.WARNING, logger="raymoe.actors.engine.runner"):
        _load(path)
    warnings = [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]
    assert len(warnings) == 1 and all(name in warnings[0] for name in extra)


def test_a_model_without_shared_experts_loads_the_empty_ones_transformers_saves(tmp_path):
    """transformers' DeepSeek-V3 with n_shared_experts: 0 saves zero-width shared-expert
    weights; raymoe builds no shared experts, loads, and gives transformers' greedy tokens."""
    from model_zoo import hf_greedy

    path = write_checkpoint("deepseek_v3", tmp_path / "v3", n_shared_experts=0)
    assert load_file(str(path / "model.safetensors"))["model.layers.1.mlp.shared_experts.up_proj.weight"].numel() == 0
    prompts = [[5, 17, 300, 42, 9], [100] * 12]
    engine = _load(path)
    for prompt, (want, _) in zip(prompts, hf_greedy(path, prompts, 6)):
        rid = f"r{len(prompt)}"
        engine.core.add_request(rid, prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
        got = []
        while len(got) < 6:
            got += [o.token for o in engine.core.step() if o.request_id == rid]
        assert got == want
