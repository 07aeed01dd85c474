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

from raymoe.actors.models.hf_config import need, rope_params
from raymoe.actors.models.registry import (
    COMMON_IMPLEMENTED_VALUES,
    ArchitectureTraits,
    architecture_of,
    architecture_traits,
)
from raymoe.actors.models.rope_spec import RopeSpec, rope_spec, yarn_mscale

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class GroupedTopK:
    """Group-limited routing (moe_routing.py). ``sigmoid``: DeepSeek-V3's rule (GLM-4.5
    shares it): sigmoid scores plus a per-expert correction bias choose the experts, only
    within the ``topk_groups`` of ``num_groups`` equal expert groups whose two best biased
    scores sum highest; the chosen experts' sigmoid scores (renormalised if norm_topk_prob)
    times ``routed_scaling_factor`` weight them. ``softmax``: DeepSeek-V2's rule: softmax
    scores, groups ranked by their best score, no bias, no renormalisation."""

    num_groups: int
    topk_groups: int
    routed_scaling_factor: float
    scoring: str = "sigmoid"  # sigmoid | softmax


@dataclass(frozen=True, kw_only=True)
class MoESpec:
    num_experts: int
    top_k: int
    intermediate_size: int
    norm_topk_prob: bool  # renormalise the top-k probabilities to sum to 1
    dense_layers: frozenset[int] = field(default_factory=frozenset)  # layers with a dense MLP instead
    grouped: Optional[GroupedTopK] = None  # None: softmax over the router logits, then top-k
    shared_intermediate_size: int = 0  # width of the shared experts' dense MLP on every token (0: none)
    shared_gate: bool = False  # the shared experts' output scaled by sigmoid(x . gate) (Qwen2-MoE)


@dataclass(frozen=True, kw_only=True)
class LatentAttentionSpec:
    """DeepSeek's multi-head latent attention (MLA): queries through a low-rank
    ``q_lora_rank`` bottleneck (None: one projection); keys and values from a shared
    ``kv_lora_rank`` latent per token plus one rotary key of ``qk_rope_head_dim`` shared by
    every head. Each head's query and key are ``qk_nope_head_dim`` + ``qk_rope_head_dim``
    wide, its value ``v_head_dim``."""

    q_lora_rank: Optional[int]
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    softmax_scale: float
    rope_interleaved: bool  # rotary pairs (x0, x1), (x2, x3), ... rather than rotate-half


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
    qkv_bias: bool
    o_proj_bias: bool
    qk_norm: bool
    moe: Optional[MoESpec]
    sliding_window: Optional[int]
    torch_dtype: str
    num_mtp_layers: int = 0  # checkpoint layers past num_layers for multi-token prediction (not run)
    # FP8 checkpoint (quantization_config fp8): the weights' [rows, columns] block of one scale
    fp8_block: Optional[tuple[int, int]] = None
    # its quantization_config.modules_to_not_convert: modules it ships unquantised
    fp8_unconverted: tuple[str, ...] = ()
    mla: Optional[LatentAttentionSpec] = None  # None: multi-head attention (q/k/v projections, GQA)

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
    """ValueError for an unsupported architecture, a missing field, or a field whose value
    changes the maths in a way raymoe does not implement (naming the field)."""
    arch = architecture_of(cfg)
    traits = architecture_traits(arch)  # raises for unknown architectures
    cfg = {k: v for k, v in {**traits.config_defaults, **cfg}.items() if k not in traits.ignored_fields}
    _refuse_unimplemented(cfg, arch, traits)
    hidden = need(cfg, "hidden_size")
    heads = need(cfg, "num_attention_heads")
    layers = need(cfg, "num_hidden_layers")
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ValueError(f"config.json: num_hidden_layers = {json.dumps(layers)} must be a whole number >= 1")
    qkv_bias = bool(cfg.get(traits.qkv_bias_field, traits.qkv_bias_default)) if traits.qkv_bias_field else False
    rope = rope_spec(cfg, arch, traits)
    max_position = int(need(cfg, "max_position_embeddings"))
    if rope.kind == "yarn":  # YaRN stretches the original context by its factor
        max_position = max(max_position, int(rope.original_max_position * rope.factor))
    window = _sliding_window(cfg, layers, traits.sliding_layers)
    mla = _latent_attention(cfg, rope) if traits.latent_attention else None
    kv_heads = cfg.get("num_key_value_heads")
    # MLA: every head reads the one latent (transformers' attention works only where the field equals the heads)
    kv_heads = heads if kv_heads is None or mla is not None else kv_heads
    if mla is None and not (isinstance(kv_heads, int) and kv_heads >= 1 and heads % kv_heads == 0):
        raise ValueError(
            f"config.json: num_key_value_heads = {json.dumps(kv_heads)} must divide num_attention_heads = {heads} "
            "(each KV head serves a whole group of query heads)"
        )
    eps = cfg.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"config.json: rms_norm_eps = {json.dumps(eps)} must be a number >= 0")
    return ModelSpec(
        architecture=arch,
        vocab_size=need(cfg, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=cfg.get("intermediate_size") or 0,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        # MLA's rotary covers qk_rope_head_dim (transformers sets head_dim to it)
        head_dim=mla.qk_rope_head_dim if mla else cfg.get("head_dim") or hidden // heads,
        rms_norm_eps=float(eps),
        rope=rope,
        max_position=max_position,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_proj_bias=qkv_bias and traits.o_proj_bias,
        qk_norm=traits.qk_norm or bool(traits.qk_norm_field and cfg.get(traits.qk_norm_field)),
        moe=_moe(cfg, arch, traits, layers) if traits.moe else None,
        sliding_window=window,
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
        num_mtp_layers=int(cfg.get(traits.mtp_layers_field) or 0) if traits.mtp_layers_field else 0,
        fp8_block=_fp8_block(cfg.get("quantization_config")),
        fp8_unconverted=_modules_to_not_convert(cfg.get("quantization_config")),
        mla=mla,
    )


def _sliding_window(cfg: dict[str, Any], layers: int, rule: Optional[str]) -> Optional[int]:
    """The attention window of the layers that slide, or None where none does: transformers'
    layer_types, else the architecture's rule (ArchitectureTraits.sliding_layers)."""
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) and rule else None
    if window is None:
        return None
    types = cfg.get("layer_types")
    first = int(cfg.get("max_window_layers") or 0)
    if types is not None:
        slides = "sliding_attention" in types
    elif rule == "all":
        slides = True
    elif rule == "from_max_window_layers":
        slides = first < layers
    else:  # even_below_max_window_layers: layer 0 slides when any does
        slides = first > 0
    if slides and not (isinstance(window, int) and window >= 1):
        raise ValueError(f"config.json: sliding_window = {json.dumps(window)} must be a window of >= 1 tokens")
    return window if slides else None


def _latent_attention(cfg: dict[str, Any], rope: RopeSpec) -> LatentAttentionSpec:
    nope, rope_dim = int(need(cfg, "qk_nope_head_dim")), int(need(cfg, "qk_rope_head_dim"))
    for key in ("kv_lora_rank", "v_head_dim", "qk_rope_head_dim"):
        if not int(need(cfg, key)) > 0:
            raise ValueError(f"config.json: {key} = {cfg[key]} must be > 0")
    if nope < 0 or rope_dim % 2:
        raise ValueError(
            f"config.json: qk_nope_head_dim = {nope} must be >= 0 and qk_rope_head_dim = {rope_dim} even "
            "(rotary turns pairs of dims)"
        )
    scale = (nope + rope_dim) ** -0.5
    params = rope_params(cfg)
    mscale_all_dim = params.get("mscale_all_dim")
    if rope.kind != "default" and mscale_all_dim:  # YaRN scales every dim of q.k, as transformers' yarn_apply_mscale
        scale *= yarn_mscale(rope.factor, float(mscale_all_dim)) ** 2
    q_lora = cfg.get("q_lora_rank")
    return LatentAttentionSpec(
        q_lora_rank=int(q_lora) if q_lora else None,
        kv_lora_rank=int(need(cfg, "kv_lora_rank")),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope_dim,
        v_head_dim=int(need(cfg, "v_head_dim")),
        softmax_scale=scale,
        rope_interleaved=bool(cfg.get("rope_interleave", True)),
    )


def _modules_to_not_convert(quant: Any) -> tuple[str, ...]:
    """quantization_config.modules_to_not_convert: module names (one name alone is one name)."""
    names = quant.get("modules_to_not_convert") if isinstance(quant, dict) else None
    names = [names] if isinstance(names, str) else names or []
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise ValueError(
            f"config.json: quantization_config.modules_to_not_convert = {json.dumps(names)}: expected a list of "
            "module names"
        )
    return tuple(names)


def _fp8_block(quant: Any) -> Optional[tuple[int, int]]:
    """The block of an FP8 block-quantised checkpoint (DeepSeek-V3's and Qwen3-FP8's format:
    float8_e4m3fn weights, one float32 ``weight_scale_inv`` per block); None without
    quantization; ValueError naming the field for anything else."""
    if quant is None:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method != "fp8":
        raise ValueError(
            f"config.json: quantization_config.quant_method = {json.dumps(method)} is not implemented "
            '(raymoe implements "fp8" with weight_block_size)'
        )
    block = quant.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(type(b) is int and b > 0 for b in block)):
        raise ValueError(
            f"config.json: quantization_config.weight_block_size = {json.dumps(block)} is not implemented "
            "(raymoe implements block-wise FP8: [rows, columns], e.g. [128, 128])"
        )
    fmt = quant.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(
            f"config.json: quantization_config.fmt = {json.dumps(fmt)} is not implemented "
            '(raymoe implements "e4m3": float8_e4m3fn weights)'
        )
    scheme = quant.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise ValueError(
            f"config.json: quantization_config.activation_scheme = {json.dumps(scheme)} is not implemented "
            '(raymoe implements "dynamic")'
        )
    return block[0], block[1]


def _refuse_unimplemented(cfg: dict[str, Any], arch: str, traits: ArchitectureTraits) -> None:
    for key, values in {**COMMON_IMPLEMENTED_VALUES, **traits.implemented_values}.items():
        if key in cfg and cfg[key] not in values:
            implemented = " or ".join(json.dumps(v) for v in values)
            raise ValueError(
                f"config.json: {key} = {json.dumps(cfg[key])} is not implemented for {arch} "
                f"(raymoe implements {key} = {implemented})"
            )


def _moe(cfg: dict[str, Any], arch: str, traits: ArchitectureTraits, layers: int) -> MoESpec:
    keys = ("num_experts", "num_local_experts", "n_routed_experts")
    num_experts = next((cfg[k] for k in keys if cfg.get(k)), None)
    if num_experts is None:
        zero = next((k for k in keys if k in cfg), None)
        if zero is not None:
            raise ValueError(f"config.json: {zero} = {cfg[zero]} is not implemented for {arch} (a MoE with no experts)")
        raise ValueError(f"config.json of {arch}: needs num_experts (or num_local_experts, n_routed_experts)")
    top_k = need(cfg, "num_experts_per_tok")
    dense = _dense_layers(cfg, traits, layers)
    routed = len(dense) < layers  # every layer dense: transformers never routes, so routing fields are moot
    if routed and not 1 <= top_k <= num_experts:
        raise ValueError(f"config.json: num_experts_per_tok = {top_k} must be in [1, {num_experts}] (the experts)")
    width = cfg.get("moe_intermediate_size") or need(cfg, "intermediate_size")
    shared = 0
    if traits.shared_expert == "gated":
        shared = need(cfg, "shared_expert_intermediate_size")
    elif traits.shared_expert == "plain":
        shared = int(cfg.get("n_shared_experts", 1) or 0) * width
    return MoESpec(
        num_experts=num_experts,
        top_k=top_k,
        intermediate_size=width,
        norm_topk_prob=bool(cfg.get("norm_topk_prob", traits.default_norm_topk)),
        dense_layers=frozenset(dense),
        grouped=_grouped_top_k(cfg, num_experts, top_k, traits.grouped_routing, routed)
        if traits.grouped_routing
        else None,
        shared_intermediate_size=shared,
        shared_gate=traits.shared_expert == "gated",
    )


def _dense_layers(cfg: dict[str, Any], traits: ArchitectureTraits, layers: int) -> set[int]:
    """The layers of a MoE model that have a dense MLP instead of experts."""
    if traits.first_k_dense:
        return set(range(min(int(cfg.get("first_k_dense_replace", 1)), layers)))
    sparse_step = cfg.get("decoder_sparse_step", 1)
    sparse_step = 1 if sparse_step is None else sparse_step
    if not (isinstance(sparse_step, int) and sparse_step >= 1):
        raise ValueError(
            f"config.json: decoder_sparse_step = {json.dumps(sparse_step)} must be >= 1 (every n-th layer is a MoE)"
        )
    return {i for i in range(layers) if (i + 1) % sparse_step != 0} | set(cfg.get("mlp_only_layers") or [])


def _grouped_top_k(cfg: dict[str, Any], num_experts: int, top_k: int, scoring: str, routed: bool = True) -> GroupedTopK:
    """``routed``: some layer routes (else the fields are kept unchecked: no layer reads them)."""
    groups, topk_groups = int(cfg.get("n_group", 1) or 1), int(cfg.get("topk_group", 1) or 1)
    if scoring == "softmax" and cfg.get("topk_method", "greedy") == "greedy":  # DeepSeek-V2's plain top-k
        groups, topk_groups = 1, 1
    # the sigmoid rule scores a group by its two best experts, the softmax rule by its best
    least = 2 if scoring == "sigmoid" else 1
    if routed and (num_experts % groups or num_experts // groups < least):
        raise ValueError(
            f"config.json: n_group = {groups} must divide the {num_experts} routed experts into groups of "
            f"at least {least}" + (" (a group scores by its two best experts)" if least == 2 else "")
        )
    if routed and (not 1 <= topk_groups <= groups or top_k > topk_groups * (num_experts // groups)):
        raise ValueError(
            f"config.json: topk_group = {topk_groups} must be in [1, n_group = {groups}] and its groups must "
            f"hold num_experts_per_tok = {top_k} experts"
        )
    return GroupedTopK(
        num_groups=groups,
        topk_groups=topk_groups,
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
        scoring=scoring,
    )
