"""Supported Hugging Face architectures and what distinguishes them.

All are pre-norm decoders (RMSNorm, rotary attention, SwiGLU MLPs); they
differ only in the traits below and in checkpoint tensor names, so one decoder
(raymoe.actors.models.decoder) builds them all. Attention is multi-head with
GQA, or DeepSeek's multi-head latent attention (``latent_attention``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional


@dataclass(frozen=True)
class ExpertNames:
    """Checkpoint tensor names of one MoE layer; ``{layer}`` and ``{expert}`` are filled in."""

    router: str
    gate: str
    up: str
    down: str
    router_bias: Optional[str] = None  # grouped routing's score correction bias
    shared: Optional[str] = None  # prefix of the shared experts' dense MLP (gate_proj, up_proj, down_proj)
    shared_gate: Optional[str] = None  # the sigmoid gate scaling the shared expert's output (Qwen2-MoE)


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
QWEN2_MOE_EXPERTS = replace(
    QWEN_EXPERTS,
    shared="model.layers.{layer}.mlp.shared_expert.",
    shared_gate="model.layers.{layer}.mlp.shared_expert_gate.weight",
)
GLM4_MOE_EXPERTS = replace(
    QWEN_EXPERTS,
    router_bias="model.layers.{layer}.mlp.gate.e_score_correction_bias",
    shared="model.layers.{layer}.mlp.shared_experts.",
)
DEEPSEEK_V2_EXPERTS = replace(QWEN_EXPERTS, shared="model.layers.{layer}.mlp.shared_experts.")

# config.json fields that change the maths of every architecture, with the values raymoe implements
COMMON_IMPLEMENTED_VALUES: dict[str, tuple[Any, ...]] = {
    "hidden_act": ("silu", "swish"),
}


@dataclass(frozen=True, kw_only=True)
class ArchitectureTraits:
    moe: bool
    qk_norm: bool = False  # RMSNorm over each head's q and k before rotary (Qwen3)
    qk_norm_field: Optional[str] = None  # the config.json field that turns the q/k norms on instead (GLM-4.5)
    qkv_bias_field: Optional[str] = "attention_bias"  # turns q/k/v biases on (None: the architecture has none)
    qkv_bias_default: bool = False  # when config.json is silent
    o_proj_bias: bool = True  # the output projection has a bias whenever q/k/v have one
    # partial_rotary_factor when config.json is silent (rotary on that fraction of each head); None: the
    # architecture rotates whole heads
    partial_rotary_default: Optional[float] = None
    default_norm_topk: bool = False  # renormalise top-k router weights when config.json is silent
    # group-limited routing (spec.GroupedTopK): "sigmoid" (DeepSeek-V3's rule, with a correction
    # bias) or "softmax" (DeepSeek-V2's); None: softmax top-k over every expert
    grouped_routing: Optional[str] = None
    latent_attention: bool = False  # DeepSeek's MLA (spec.LatentAttentionSpec) instead of q/k/v projections
    first_k_dense: bool = False  # dense layers: first_k_dense_replace (else decoder_sparse_step, mlp_only_layers)
    shared_expert: Optional[str] = None  # "gated" (Qwen2-MoE) or "plain" (GLM-4.5): a dense MLP on every token
    experts: Optional[ExpertNames] = None
    # config.json fields whose other values change the maths and are not implemented
    implemented_values: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    # the field counting the checkpoint's multi-token-prediction layers past num_hidden_layers (unused here)
    mtp_layers_field: Optional[str] = None
    # transformers' defaults (its config class) for fields that change the maths, where config.json is
    # silent: the same checkpoint then means the same model here and there
    config_defaults: dict[str, Any] = field(default_factory=dict)
    # config.json fields transformers' model of this architecture never reads (their defaults apply)
    ignored_fields: tuple[str, ...] = ()
    # which layers attend within sliding_window, where config.json has no layer_types (as transformers'
    # model of this architecture decides): "all", "from_max_window_layers" (layers i >= it),
    # "even_below_max_window_layers" (even i < it); None: none (the field is not read)
    sliding_layers: Optional[str] = None


ARCHITECTURES = {
    "Qwen3MoeForCausalLM": ArchitectureTraits(
        moe=True,
        qk_norm=True,
        experts=QWEN_EXPERTS,
        config_defaults={
            "use_sliding_window": False,
            "sliding_window": 4096,
            "num_key_value_heads": 4,
            "max_position_embeddings": 32768,
            "intermediate_size": 6144,
            "moe_intermediate_size": 768,
        },
        # transformers' model of it slides every layer: layer_types is not read
        ignored_fields=("layer_types",),
        sliding_layers="all",
    ),
    # Mixtral always renormalises its top-k weights
    "MixtralForCausalLM": ArchitectureTraits(
        moe=True,
        qkv_bias_field=None,
        default_norm_topk=True,
        experts=MIXTRAL_EXPERTS,
        config_defaults={
            "rope_theta": 1e6,
            "rms_norm_eps": 1e-5,
            "num_key_value_heads": 8,
            "max_position_embeddings": 131072,
        },
        # transformers' MixtralTopKRouter always renormalises, every layer is a MoE of experts
        # intermediate_size wide, and every layer slides (layer_types is not read)
        ignored_fields=(
            "norm_topk_prob",
            "decoder_sparse_step",
            "mlp_only_layers",
            "moe_intermediate_size",
            "layer_types",
        ),
        sliding_layers="all",
    ),
    "Qwen3ForCausalLM": ArchitectureTraits(
        moe=False,
        qk_norm=True,
        config_defaults={
            "use_sliding_window": False,
            "sliding_window": 4096,
            "num_key_value_heads": 32,
            "head_dim": 128,
            "max_window_layers": 28,
            "max_position_embeddings": 32768,
            "intermediate_size": 22016,
        },
        sliding_layers="from_max_window_layers",
    ),
    "LlamaForCausalLM": ArchitectureTraits(
        moe=False,
        implemented_values={"mlp_bias": (False,)},
        config_defaults={"max_position_embeddings": 2048, "intermediate_size": 11008},
    ),
    "Qwen2MoeForCausalLM": ArchitectureTraits(
        moe=True,
        qkv_bias_field="qkv_bias",
        qkv_bias_default=True,
        o_proj_bias=False,
        shared_expert="gated",
        experts=QWEN2_MOE_EXPERTS,
        config_defaults={
            "norm_topk_prob": False,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "use_sliding_window": False,
            "sliding_window": 4096,
            "max_window_layers": 28,
            "num_key_value_heads": 16,
            "max_position_embeddings": 32768,
            "intermediate_size": 5632,
            "moe_intermediate_size": 1408,
            "shared_expert_intermediate_size": 5632,
        },
        sliding_layers="even_below_max_window_layers",
    ),
    "Glm4MoeForCausalLM": ArchitectureTraits(
        moe=True,
        qk_norm_field="use_qk_norm",
        o_proj_bias=False,
        partial_rotary_default=0.5,
        grouped_routing="sigmoid",
        first_k_dense=True,
        shared_expert="plain",
        experts=GLM4_MOE_EXPERTS,
        mtp_layers_field="num_nextn_predict_layers",
        config_defaults={
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
            "routed_scaling_factor": 1.0,
            "n_shared_experts": 1,
            "norm_topk_prob": True,
            "use_qk_norm": False,
            "rms_norm_eps": 1e-5,
            "num_key_value_heads": 8,
            "max_position_embeddings": 131072,
            "intermediate_size": 10944,
            "moe_intermediate_size": 1408,
            "num_nextn_predict_layers": 1,
        },
    ),
    "DeepseekV3ForCausalLM": ArchitectureTraits(
        moe=True,
        qkv_bias_field=None,
        latent_attention=True,
        grouped_routing="sigmoid",
        first_k_dense=True,
        shared_expert="plain",
        experts=GLM4_MOE_EXPERTS,  # GLM-4.5 took DeepSeek-V3's tensor names
        mtp_layers_field="num_nextn_predict_layers",
        implemented_values={
            "attention_bias": (False,),
            "topk_method": ("noaux_tc",),
            "scoring_func": ("sigmoid",),
            "moe_layer_freq": (1,),
        },
        config_defaults={
            "first_k_dense_replace": 3,
            "n_group": 8,
            "topk_group": 4,
            "routed_scaling_factor": 2.5,
            "n_shared_experts": 1,
            "norm_topk_prob": True,
            "rope_interleave": True,
            "max_position_embeddings": 4096,
            "intermediate_size": 18432,
            "moe_intermediate_size": 2048,
            "num_nextn_predict_layers": 1,
            "q_lora_rank": 1536,
        },
    ),
    # transformers' DeepSeek-V2 router never renormalises (norm_topk_prob is refused, not ignored)
    "DeepseekV2ForCausalLM": ArchitectureTraits(
        moe=True,
        qkv_bias_field=None,
        latent_attention=True,
        grouped_routing="softmax",
        first_k_dense=True,
        shared_expert="plain",
        experts=DEEPSEEK_V2_EXPERTS,
        implemented_values={
            "attention_bias": (False,),
            "mlp_bias": (False,),
            "norm_topk_prob": (False,),
            "topk_method": ("greedy", "group_limited_greedy"),
            "scoring_func": ("softmax",),
            "moe_layer_freq": (1,),
        },
        config_defaults={
            "first_k_dense_replace": 0,
            "routed_scaling_factor": 1.0,
            "n_shared_experts": 2,
            "norm_topk_prob": False,
            "topk_method": "greedy",
            "max_position_embeddings": 2048,
            "intermediate_size": 11008,
            "moe_intermediate_size": 1407,
            "q_lora_rank": 1536,
        },
        # transformers' DeepSeek-V2 always rotates interleaved pairs (a complex product): rope_interleave is
        # DeepSeek-V3's field
        ignored_fields=("rope_interleave",),
    ),
}


# transformers' model_type of each architecture: a config.json without ``architectures`` names its
# model by it (as transformers' AutoModelForCausalLM reads it)
MODEL_TYPES = {
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
}


def architecture_of(cfg: dict[str, Any]) -> str:
    """The architecture a config.json names: its ``architectures``' first, else its ``model_type``'s."""
    names = cfg.get("architectures")
    if names:
        return names[0]
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"config.json names no architecture ('architectures'), and its model_type {model_type!r} is none "
            f"raymoe supports ({', '.join(sorted(MODEL_TYPES))})"
        )
    return MODEL_TYPES[model_type]


def architecture_traits(name: str) -> ArchitectureTraits:
    if name not in ARCHITECTURES:
        raise ValueError(f"architecture {name!r} is not supported; raymoe supports {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[name]
