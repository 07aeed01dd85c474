"""Supported Hugging Face architectures and what distinguishes them.

All four are pre-norm decoders (RMSNorm, rotary attention with GQA, SwiGLU
MLPs); they differ only in the traits below and in checkpoint tensor names,
so one decoder (raymoe.actors.models.decoder) builds them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ExpertNames:
    """Checkpoint tensor names of one MoE layer; ``{layer}`` and ``{expert}`` are filled in."""

    router: str
    gate: str
    up: str
    down: str


QWEN_EXPERTS = ExpertNames(
    router="model.layers.{layer}.mlp.gate.weight",
    gate="model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight",
    up="model.layers.{layer}.mlp.experts.{expert}.up_proj.weight",
    down="model.layers.{layer}.mlp.experts.{expert}.down_proj.weight",
)
MIXTRAL_EXPERTS = ExpertNames(
    router="model.layers.{layer}.block_sparse_moe.gate.weight",
    gate="model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight",
    up="model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight",
    down="model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight",
)


@dataclass(frozen=True)
class ArchitectureTraits:
    moe: bool
    qk_norm: bool  # RMSNorm over each head's q and k before rotary (Qwen3)
    default_norm_topk: bool = False  # renormalise top-k router weights when config.json is silent
    experts: Optional[ExpertNames] = None


ARCHITECTURES = {
    "Qwen3MoeForCausalLM": ArchitectureTraits(moe=True, qk_norm=True, experts=QWEN_EXPERTS),
    # Mixtral always renormalises its top-k weights
    "MixtralForCausalLM": ArchitectureTraits(moe=True, qk_norm=False, default_norm_topk=True, experts=MIXTRAL_EXPERTS),
    "Qwen3ForCausalLM": ArchitectureTraits(moe=False, qk_norm=True),
    "LlamaForCausalLM": ArchitectureTraits(moe=False, qk_norm=False),
}


def architecture_traits(name: str) -> ArchitectureTraits:
    if name not in ARCHITECTURES:
        raise ValueError(f"architecture {name!r} is not supported; raymoe supports {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[name]
