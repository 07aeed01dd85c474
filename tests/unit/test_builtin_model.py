"""The built-in tiny Qwen3-MoE checkpoint: transformers (the reference) loads and runs it;
writing is deterministic, atomic, race-safe and a no-op once done."""

import json
import math
import pathlib
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

from raymoe.actors.models import builtin
from raymoe.actors.models.builtin import ensure_builtin

NAME = "tiny-qwen3-moe"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> pathlib.Path:
    return ensure_builtin(NAME, tmp_path_factory.mktemp("cache"))


def _files(d: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_layout_and_size(ckpt, tmp_path):
    assert ckpt.name == f"{NAME}-v1" and ckpt.parent.name == "builtin"
    names = set(_files(ckpt))
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    } <= names
    assert sum(len(b) for b in _files(ckpt).values()) < 2 * 1024 * 1024
    assert ckpt.stat().st_mode & 0o777 == 0o755
    # nothing left behind from the temporary write directory
    assert [p.name for p in ckpt.parent.iterdir()] == [ckpt.name]


def test_transformers_config_matches_spec(ckpt):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(ckpt)
    assert cfg.model_type == "qwen3_moe" and cfg.architectures == ["Qwen3MoeForCausalLM"]
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.moe_intermediate_size, cfg.intermediate_size) == (
        4,
        64,
        32,
        128,
    )
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob) == (8, 2, True)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)
    assert cfg.decoder_sparse_step == 1 and cfg.mlp_only_layers == []
    assert cfg.rope_parameters["rope_theta"] == 10000.0
    assert cfg.tie_word_embeddings is False


def test_ids_agree_with_tokenizer(ckpt):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    cfg = json.loads((ckpt / "config.json").read_text())
    gen = json.loads((ckpt / "generation_config.json").read_text())
    assert cfg["vocab_size"] == tok.get_vocab_size(with_added_tokens=True)
    assert 400 <= cfg["vocab_size"] <= 600
    assert cfg["eos_token_id"] == tok.token_to_id("<|im_end|>")
    assert gen["eos_token_id"] == [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [cfg["vocab_size"], 64]
        assert f.get_slice("lm_head.weight").get_shape() == [cfg["vocab_size"], 64]


def _generate_eos(path: pathlib.Path) -> set[int]:
    """The ids transformers' generate stops on: its generation config's eos_token_id."""
    import transformers

    try:
        gen = transformers.GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: generate derives it from config.json
        gen = transformers.GenerationConfig.from_model_config(transformers.AutoConfig.from_pretrained(path))
    eos = gen.eos_token_id
    return set(eos) if isinstance(eos, list) else {eos}


def test_engine_eos_ids_are_what_transformers_generate_stops_on(ckpt):
    """The engine stops on the tokenizer's eos ids (generation_config.json, else config.json,
    plus the tokenizer's eos token)."""
    from raymoe.actors.engine.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(ckpt)
    assert tok.eos_token_ids == {tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")} == _generate_eos(ckpt)


def test_transformers_loads_every_weight_and_generates(ckpt):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(ckpt, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    # per-expert Hub tensors were fused on load: the numbers must survive that
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        n_file = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        down = torch.stack([f.get_tensor(f"model.layers.1.mlp.experts.{j}.down_proj.weight") for j in range(8)])
        gate3 = f.get_tensor("model.layers.2.mlp.experts.3.gate_proj.weight")
    assert sum(p.numel() for p in model.parameters()) == n_file
    experts = model.model.layers[1].mlp.experts
    torch.testing.assert_close(experts.down_proj.data, down, rtol=0, atol=0)
    torch.testing.assert_close(model.model.layers[2].mlp.experts.gate_up_proj.data[3, :32], gate3, rtol=0, atol=0)

    ids = torch.tensor([[5, 40, 41, 42, 43]])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=12,
        min_new_tokens=12,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert out.sequences.shape == (1, 5 + 12)
    # greedy margins are far above float32 rounding, so greedy decoding is stable
    margins = [float(lg[0].topk(2).values[0] - lg[0].topk(2).values[1]) for lg in out.logits]
    assert min(margins) > 1e-3, margins
    # the next-token distribution is peaked (init scale chosen for it), not near-uniform
    probs = torch.softmax(out.logits[0][0], dim=-1)
    assert probs.max() > 20.0 / probs.numel()


def test_second_call_is_a_fast_noop(ckpt):
    before = {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()}
    start = time.perf_counter()
    again = ensure_builtin(NAME, ckpt.parent.parent)
    assert time.perf_counter() - start < 0.05
    assert again == ckpt
    assert {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()} == before


def test_fresh_write_is_deterministic_and_fast(ckpt, tmp_path):
    start = time.perf_counter()
    other = ensure_builtin(NAME, tmp_path)
    assert time.perf_counter() - start < 2.0
    assert other != ckpt
    assert _files(other) == _files(ckpt)


def test_cache_dir_defaults_to_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYMOE_CACHE", str(tmp_path / "envcache"))
    path = ensure_builtin(NAME)
    assert path == tmp_path / "envcache" / "builtin" / f"{NAME}-v1"
    assert (path / "config.json").is_file()


def test_unknown_name_lists_known_names(tmp_path):
    with pytest.raises(ValueError, match="tiny-qwen3-moe") as exc:
        ensure_builtin("tiny-llama", tmp_path)
    assert "tiny-llama" in str(exc.value)
    assert builtin.builtin_names() == ("deepseek-v2-lite-shape", "qwen3-30b-a3b-shape", NAME)
    assert not (tmp_path / "builtin").exists()


def test_losing_a_race_keeps_the_winner(tmp_path):
    """Another process renames its copy into place while we are still writing ours."""
    final = tmp_path / "builtin" / "x-v1"

    def write_while_other_wins(tmp: pathlib.Path) -> None:
        (tmp / "f").write_text("ours")
        final.mkdir()
        (final / "f").write_text("theirs")

    builtin._write_atomically(final, write_while_other_wins)
    assert (final / "f").read_text() == "theirs"
    assert [p.name for p in final.parent.iterdir()] == ["x-v1"]


def test_failed_write_leaves_nothing(tmp_path):
    final = tmp_path / "builtin" / "x-v1"

    def failing(tmp: pathlib.Path) -> None:
        (tmp / "partial").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        builtin._write_atomically(final, failing)
    assert list(final.parent.iterdir()) == []


# Each child imports everything first, then waits for the parent's "go", so the two
# writes really overlap (a write takes ~30 ms once torch is imported).
_RACER = """
import pathlib, sys, time, torch, tokenizers, safetensors.torch
from raymoe.actors.models.builtin import ensure_builtin
cache, me = pathlib.Path(sys.argv[1]), sys.argv[2]
(cache / f"ready-{me}").touch()
while not (cache / "go").exists():
    time.sleep(0.001)
print(ensure_builtin("tiny-qwen3-moe", cache / "c"))
"""


def test_concurrent_processes_get_identical_complete_copies(ckpt, tmp_path):
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(tmp_path), str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{i}").exists() for i in range(2)) and time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.01)
    (tmp_path / "go").touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    paths = {pathlib.Path(out.strip()) for out, _ in outs}
    assert paths == {tmp_path / "c" / "builtin" / f"{NAME}-v1"}
    # written in other processes, byte-identical to the one written here
    assert _files(paths.pop()) == _files(ckpt)
    assert [p.name for p in (tmp_path / "c" / "builtin").iterdir()] == [f"{NAME}-v1"]


def test_resolve_model_path(ckpt, tmp_path):
    assert builtin.resolve_model_path(f"builtin:{NAME}", ckpt.parent.parent) == ckpt
    assert builtin.resolve_model_path(str(ckpt)) == ckpt
    with pytest.raises(ValueError, match="model.path") as exc:
        builtin.resolve_model_path(str(tmp_path))
    assert str(tmp_path) in str(exc.value)
    with pytest.raises(ValueError, match="known built-in models"):
        builtin.resolve_model_path("builtin:nope", tmp_path)


def test_qwen3_30b_a3b_shape_is_the_real_config_with_the_builtin_tokenizer(tmp_path):
    """No weights; transformers reads its config as Qwen3-30B-A3B's shape and its tokenizer as
    the built-in one; ids beyond the tokenizer decode to nothing, in transformers too."""
    import transformers

    from raymoe.actors.engine.tokenizer import Tokenizer
    from raymoe.actors.models.spec import load_spec

    path = ensure_builtin("qwen3-30b-a3b-shape", tmp_path)
    assert not list(path.glob("*.safetensors"))
    cfg = transformers.AutoConfig.from_pretrained(path)
    assert type(cfg).__name__ == "Qwen3MoeConfig"
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok) == (
        151936,
        2048,
        48,
        128,
        8,
    )
    spec = load_spec(path)
    assert (spec.vocab_size, spec.num_layers, spec.moe.num_experts, spec.moe.intermediate_size) == (
        151936,
        48,
        128,
        768,
    )
    ours = Tokenizer.from_dir(path)
    ref = transformers.AutoTokenizer.from_pretrained(path)
    ids = ours.encode("The lighthouse keeper")
    assert ids == ref("The lighthouse keeper")["input_ids"]
    assert ours.vocab_size < 1000 and ours.eos_token_ids == {ours.token_to_id("<|im_end|>")} == _generate_eos(path)
    beyond = [ids[0], 150000, ours.vocab_size, ids[1]]
    assert ours.decode(beyond) == ref.decode(beyond, skip_special_tokens=True) == ours.decode([ids[0], ids[1]])


def test_deepseek_v2_lite_shape_is_the_real_config(tmp_path):
    """No weights; transformers and raymoe read DeepSeek-V2-Lite's shape from its config."""
    import transformers

    from raymoe.actors.models.spec import load_spec

    path = ensure_builtin("deepseek-v2-lite-shape", tmp_path)
    assert not list(path.glob("*.safetensors"))
    cfg = transformers.AutoConfig.from_pretrained(path)
    assert type(cfg).__name__ == "DeepseekV2Config"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.n_routed_experts, cfg.kv_lora_rank) == (2048, 27, 64, 512)
    spec = load_spec(path)
    assert (spec.num_layers, spec.moe.num_experts, spec.moe.top_k, spec.moe.dense_layers) == (27, 64, 6, {0})
    assert (spec.mla.kv_lora_rank, spec.mla.qk_rope_head_dim, spec.mla.q_lora_rank, spec.rope.kind) == (
        512,
        64,
        None,
        "yarn",
    )
