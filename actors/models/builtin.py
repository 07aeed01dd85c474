"""Built-in checkpoints, written to a local cache on first use (no network).

``ensure_builtin("tiny-qwen3-moe")`` returns a real Hugging Face checkpoint
directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
generation_config.json) that transformers loads as ``Qwen3MoeForCausalLM``. It
lets every test and the default CPU config run a genuine MoE model end to end.

``ensure_builtin("qwen3-30b-a3b-shape")`` and ``ensure_builtin("deepseek-v2-lite-shape")``
hold no weights: the real model's config.json with the built-in tokenizer, for
``model.load_format: dummy`` (weights drawn at load), so the real model shape serves
on GPUs without a checkpoint. The vocabulary is the model's; ids the tokenizer does
not know decode to nothing.

Writing is deterministic (same bytes every time, in every process) and atomic:
files go to a temporary directory next to the target, which is then renamed
into place, so processes racing to create it never see a half-written one.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import pathlib
import shutil
import tempfile
from typing import Callable, Optional, Union

from raymoe.actors.models.builtin_tokenizer import tokenizer_config, write_tokenizer
from raymoe.cluster.config import BUILTIN_PREFIX

_VERSION = "v1"
_SEED = 1234


def default_cache_dir() -> pathlib.Path:
    """$RAYMOE_CACHE, else ~/.cache/raymoe."""
    env = os.environ.get("RAYMOE_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "raymoe"


def ensure_builtin(name: str, cache_dir: Optional[Union[str, os.PathLike]] = None) -> pathlib.Path:
    """Path of the built-in checkpoint ``name``, written on first call.

    The directory is ``<cache_dir>/builtin/<name>-v1``; later calls (from any
    process) only check that it exists.
    """
    writers = _writers()
    if name not in writers:
        raise ValueError(f"unknown built-in model {name!r}; known built-in models: {sorted(writers)}")
    root = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / "builtin" / f"{name}-{_VERSION}"
    if not final.is_dir():
        _write_atomically(final, writers[name])
    return final


def builtin_names() -> tuple[str, ...]:
    """Names ``ensure_builtin`` accepts."""
    return tuple(sorted(_writers()))


def _writers() -> dict[str, Callable[[pathlib.Path], None]]:
    return {
        "tiny-qwen3-moe": write_tiny_qwen3_moe,
        "qwen3-30b-a3b-shape": functools.partial(write_shape, QWEN3_30B_A3B),
        "deepseek-v2-lite-shape": functools.partial(write_shape, DEEPSEEK_V2_LITE),
    }


# Qwen/Qwen3-30B-A3B's config.json (the fields raymoe and transformers read)
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 40960,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "hidden_act": "silu",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "model_type": "qwen3_moe",
}


# deepseek-ai/DeepSeek-V2-Lite's config.json (the fields raymoe and transformers read): MLA
# without a q bottleneck, 64 routed experts (top-6, softmax) and 2 shared, YaRN
DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "vocab_size": 102400,
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "n_shared_experts": 2,
    "n_routed_experts": 64,
    "num_experts_per_tok": 6,
    "routed_scaling_factor": 1.0,
    "topk_method": "greedy",
    "scoring_func": "softmax",
    "norm_topk_prob": False,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "kv_lora_rank": 512,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
    },
    "max_position_embeddings": 163840,
    "attention_bias": False,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "hidden_act": "silu",
    "model_type": "deepseek_v2",
}


def _write_atomically(final: pathlib.Path, write: Callable[[pathlib.Path], None]) -> None:
    """Run ``write(tmp)`` into a fresh sibling directory, then rename it to ``final``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.rename(tmp, final)
        except OSError as e:
            # Another process renamed its copy into place first: keep theirs.
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_tiny_qwen3_moe(dst: pathlib.Path) -> None:
    """Write the tiny Qwen3-MoE checkpoint (4 layers, 8 experts, top-2) into ``dst``."""
    ids, vocab_size = write_tokenizer(dst)
    config = _model_config(vocab_size, ids)
    _write_json(dst / "config.json", config)
    _write_json(dst / "tokenizer_config.json", tokenizer_config(ids))
    _write_json(
        dst / "generation_config.json",
        {
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
            "pad_token_id": ids["<|endoftext|>"],
        },
    )
    _write_weights(dst / "model.safetensors", config)


def write_shape(model_config: dict, dst: pathlib.Path) -> None:
    """A real model's config with the built-in tokenizer, no weights (see the module docstring)."""
    ids, _ = write_tokenizer(dst)
    config = dict(model_config, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    _write_json(dst / "config.json", config)
    _write_json(dst / "tokenizer_config.json", tokenizer_config(ids))


def _model_config(vocab_size: int, ids: dict[str, int]) -> dict:
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "max_position_embeddings": 2048,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "router_aux_loss_coef": 0.001,
        "output_router_logits": False,
        "use_cache": True,
        "torch_dtype": "float32",
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
    }


def _weight_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """HF Hub tensor names and shapes for Qwen3-MoE (per-expert layout), in a fixed order."""
    h, v, d = cfg["hidden_size"], cfg["vocab_size"], cfg["head_dim"]
    nq, nkv, f = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["moe_intermediate_size"]
    shapes = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (nq * d, h)),
            (p + "self_attn.k_proj.weight", (nkv * d, h)),
            (p + "self_attn.v_proj.weight", (nkv * d, h)),
            (p + "self_attn.o_proj.weight", (h, nq * d)),
            (p + "self_attn.q_norm.weight", (d,)),
            (p + "self_attn.k_norm.weight", (d,)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate.weight", (cfg["num_experts"], h)),
        ]
        for j in range(cfg["num_experts"]):
            e = f"{p}mlp.experts.{j}."
            shapes += [
                (e + "gate_proj.weight", (f, h)),
                (e + "up_proj.weight", (f, h)),
                (e + "down_proj.weight", (h, f)),
            ]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return shapes


def _init_std(name: str) -> float:
    """Std of the normal init for one tensor (0 means: all ones, for norms).

    Every linear layer reads an RMS-normalised input (RMS 1 per element), so
    output std ~= sqrt(fan_in) * std. Embeddings at std 1 keep the residual
    stream O(1). Projections at 0.15 (fan-in 32..64) give O(1) activations that
    neither vanish nor blow up over 4 layers. The router (0.5) and lm_head (0.5)
    give logits of std ~4 over the 64-wide input instead of the ~0.2 of the usual
    0.02 init: next-token distributions are peaked (top-1 well above the rest),
    so sampling tests see distinct behaviour per temperature/top-p, and greedy
    top-1/top-2 margins are typically O(0.1..1), orders above float32 rounding
    (~1e-5), so greedy output does not flip between kernels or parallel layouts.
    (Margins scale with the logits, as does bf16 error, so bf16-vs-fp32 runs
    should compare logits with a tolerance, not token sequences.)
    """
    if name.endswith("norm.weight"):
        return 0.0
    if name == "model.embed_tokens.weight":
        return 1.0
    if name.endswith("mlp.gate.weight") or name == "lm_head.weight":
        return 0.5
    return 0.15


def _write_weights(path: pathlib.Path, cfg: dict) -> None:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(_SEED)
    tensors = {}
    for name, shape in _weight_shapes(cfg):
        std = _init_std(name)
        if std == 0.0:
            tensors[name] = torch.ones(shape, dtype=torch.float32)
        else:
            tensors[name] = torch.randn(shape, generator=gen, dtype=torch.float32) * std
    save_file(tensors, str(path), metadata={"format": "pt"})


def _write_json(path: pathlib.Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def resolve_model_path(path: str, cache_dir: Optional[Union[str, os.PathLike]] = None) -> pathlib.Path:
    """``builtin:<name>`` -> the written built-in checkpoint; else an existing checkpoint directory."""
    if path.startswith(BUILTIN_PREFIX):
        return ensure_builtin(path[len(BUILTIN_PREFIX) :], cache_dir)
    p = pathlib.Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise ValueError(
            f"model.path: {path!r} is not a Hugging Face checkpoint directory (no config.json there); "
            f"download the checkpoint first, or use builtin:tiny-qwen3-moe"
        )
    return p
