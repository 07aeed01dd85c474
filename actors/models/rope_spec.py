"""The rotary embedding a config.json asks for (default, linear, dynamic NTK, llama3, YaRN; partial
rotary), as transformers' rope init reads it (modeling_rope_utils)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from raymoe.actors.models.hf_config import need, rope_params
from raymoe.actors.models.registry import ArchitectureTraits

SUPPORTED_ROPE = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass(frozen=True, kw_only=True)
class RopeSpec:
    theta: float
    # default | linear (frequencies / factor) | dynamic (NTK: the default's frequencies up to
    # max_position_embeddings, which caps max_model_len) | llama3 | yarn
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    partial_rotary_factor: float = 1.0  # rotary on the first int(head_dim * this) dims of each head
    # yarn: the correction range between full interpolation and full extrapolation, in rotations
    # over original_max_position; cos and sin are scaled by attention_factor
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0


def rope_spec(cfg: dict[str, Any], arch: str, traits: ArchitectureTraits) -> RopeSpec:
    """The rotary embedding as transformers' rope init reads it (modeling_rope_utils)."""
    params = rope_params(cfg)
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", traits.partial_rotary_default))
    partial = 1.0 if partial is None else float(partial)
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if traits.partial_rotary_default is None and partial != 1.0:
        partial = _whole_head_partial_rotary(cfg, arch, traits, kind, partial)
    if kind not in SUPPORTED_ROPE:
        raise ValueError(
            f"config.json: rope_parameters.rope_type (or rope_scaling.type) = {kind!r} is not implemented "
            f"(raymoe implements {', '.join(SUPPORTED_ROPE)})"
        )
    if kind == "default":
        return RopeSpec(theta=theta, partial_rotary_factor=partial)
    if kind in ("linear", "dynamic"):
        # dynamic NTK rescales only past max_position_embeddings, where raymoe serves no position
        return RopeSpec(theta=theta, kind=kind, factor=float(need(params, "factor")), partial_rotary_factor=partial)
    # a top-level original_max_position_embeddings wins, as in transformers' standardize_rope_params
    original = int(
        cfg.get("original_max_position_embeddings")
        or params.get("original_max_position_embeddings")
        or need(cfg, "max_position_embeddings")
    )
    common = dict(theta=theta, kind=kind, partial_rotary_factor=partial, original_max_position=original)
    if kind == "llama3":
        return RopeSpec(
            **common,
            factor=float(params["factor"]),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        )
    factor = params.get("factor")
    factor = float(factor) if factor is not None else need(cfg, "max_position_embeddings") / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    return RopeSpec(
        **common,
        factor=factor,
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        truncate=bool(params.get("truncate", True)),
        attention_factor=float(attention_factor),
    )


def _whole_head_partial_rotary(
    cfg: dict[str, Any], arch: str, traits: ArchitectureTraits, kind: str, partial: float
) -> float:
    """partial_rotary_factor of an architecture whose transformers model rotates whole heads:
    its default rope init never reads the field (whole heads rotate: 1.0); the scaled kinds'
    inits read it, so it works only where the frequencies it gives still cover the head
    (2 * ceil(int(head_dim * partial) / 2) == head_dim; transformers' rotary fails elsewhere)."""
    if kind == "default":
        return 1.0
    head_dim = (
        int(need(cfg, "qk_rope_head_dim"))
        if traits.latent_attention
        else cfg.get("head_dim") or need(cfg, "hidden_size") // need(cfg, "num_attention_heads")
    )
    if 2 * math.ceil(int(head_dim * partial) / 2) != head_dim:
        raise ValueError(
            f"config.json: partial_rotary_factor = {partial} is not implemented for {arch} (raymoe implements 1.0: "
            "its transformers model rotates whole heads)"
        )
    return partial


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
