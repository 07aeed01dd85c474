"""ModelSpec: the parts of a Hugging Face config.json that raymoe's models use.

Parsed once, validated, then passed explicitly to the model builders. Field
names accept the spellings found in real checkpoints and in transformers 5
(``num_experts`` / ``num_local_experts``, ``rope_theta`` / ``rope_parameters``).
"""

from __future__ import annotations

import json
import logging
import pathlib
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from raymoe.actors.models.registry import architecture_traits

log = logging.getLogger(__name__)

SUPPORTED_ROPE = ("default", "llama3")


@dataclass(frozen=True, kw_only=True)
class RopeSpec:
    theta: float
    kind: str = "default"  # default | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True, kw_only=True)
class MoESpec:
    num_experts: int
    top_k: int
    intermediate_size: int
    norm_topk_prob: bool  # renormalise the top-k probabilities to sum to 1
    dense_layers: frozenset[int] = field(default_factory=frozenset)  # layers with a dense MLP instead


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP width (0 if the model has none)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeSpec
    max_position: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    moe: Optional[MoESpec]
    sliding_window: Optional[int]
    torch_dtype: str

    @property
    def moe_layers(self) -> list[int]:
        if self.moe is None:
            return []
        return [i for i in range(self.num_layers) if i not in self.moe.dense_layers]

    def max_model_len(self, requested: Optional[int]) -> int:
        """The longest sequence to serve: ``requested`` (model.max_model_len), else what the
        model supports -- its positions, capped at its sliding window (windowed attention
        is not implemented; capping keeps results exact). ValueError past that limit."""
        limit = self.max_position
        if self.sliding_window is not None and self.sliding_window < limit:
            log.info(
                "max_model_len capped at the sliding window (%d): windowed attention is not implemented",
                self.sliding_window,
            )
            limit = self.sliding_window
        if requested is not None and requested > limit:
            raise ValueError(f"model.max_model_len: {requested} exceeds what the model supports ({limit})")
        return requested or limit


def resolve_dtype(requested: str, spec: ModelSpec, device: torch.device) -> torch.dtype:
    """``auto``: the checkpoint's dtype on GPU, float32 on CPU (CPU bf16 matmuls are slow and lossy)."""
    name = requested if requested != "auto" else (spec.torch_dtype if device.type == "cuda" else "float32")
    if name not in ("float32", "bfloat16", "float16"):
        name = "bfloat16"
    return getattr(torch, name)


def load_spec(checkpoint_dir: str | pathlib.Path) -> ModelSpec:
    path = pathlib.Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{checkpoint_dir}: no config.json (is this a Hugging Face checkpoint directory?)")
    return spec_from_hf_config(json.loads(path.read_text()))


def spec_from_hf_config(cfg: dict[str, Any]) -> ModelSpec:
    arch = (cfg.get("architectures") or ["<none>"])[0]
    traits = architecture_traits(arch)  # raises for unknown architectures
    hidden = _need(cfg, "hidden_size")
    heads = _need(cfg, "num_attention_heads")
    moe = None
    if traits.moe:
        num_experts = cfg.get("num_experts", cfg.get("num_local_experts"))
        if num_experts is None:
            raise ValueError(f"config.json of {arch}: needs num_experts (or num_local_experts)")
        sparse_step = cfg.get("decoder_sparse_step", 1) or 1
        layers = _need(cfg, "num_hidden_layers")
        dense = {i for i in range(layers) if (i + 1) % sparse_step != 0} | set(cfg.get("mlp_only_layers") or [])
        moe = MoESpec(
            num_experts=num_experts,
            top_k=_need(cfg, "num_experts_per_tok"),
            intermediate_size=cfg.get("moe_intermediate_size") or _need(cfg, "intermediate_size"),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", traits.default_norm_topk)),
            dense_layers=frozenset(dense),
        )
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    return ModelSpec(
        architecture=arch,
        vocab_size=_need(cfg, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=cfg.get("intermediate_size") or 0,
        num_layers=_need(cfg, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=_rope(cfg),
        max_position=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", False)),
        qk_norm=traits.qk_norm,
        moe=moe,
        sliding_window=window,
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
    )


def _rope(cfg: dict[str, Any]) -> RopeSpec:
    params = dict(cfg.get("rope_scaling") or {})
    params.update(cfg.get("rope_parameters") or {})
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in SUPPORTED_ROPE:
        raise ValueError(f"config.json: rope type {kind!r} is not supported (supported: {', '.join(SUPPORTED_ROPE)})")
    if kind == "default":
        return RopeSpec(theta=float(theta))
    return RopeSpec(
        theta=float(theta),
        kind=kind,
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position=int(params.get("original_max_position_embeddings", 8192)),
    )


def _need(cfg: dict[str, Any], key: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ValueError(f"config.json: missing required field {key!r}")
    return cfg[key]
