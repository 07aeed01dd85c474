"""config.json -> ModelSpec for every supported architecture: the zoo's configs load; a
field whose value changes the maths without being implemented is refused by name (a
table here flips each one for every architecture); the rotary tables (default, llama3,
YaRN, partial rotary) equal transformers' rope init, attention scaling included."""

from __future__ import annotations

import importlib
import logging
import math

import pytest
import torch
from model_zoo import KINDS, hf_classes, hf_config

from raymoe.actors.models.layers import RotaryEmbedding
from raymoe.actors.models.registry import ARCHITECTURES, COMMON_IMPLEMENTED_VALUES, MODEL_TYPES
from raymoe.actors.models.spec import spec_from_hf_config

ZOO = {hf_classes(kind)[1].__name__: kind for kind in KINDS}


def _config(kind: str, **overrides) -> dict:
    """config.json of the zoo's ``kind`` as save_pretrained writes it."""
    cfg = hf_config(kind, **overrides).to_dict()
    cfg["architectures"] = [hf_classes(kind)[1].__name__]
    return cfg


def test_every_architecture_has_a_zoo_model_whose_config_loads():
    assert set(ARCHITECTURES) <= set(ZOO)
    for kind in KINDS:
        spec = spec_from_hf_config(_config(kind))
        assert spec.architecture == hf_classes(kind)[1].__name__


@pytest.mark.parametrize("arch", [a for a, traits in ARCHITECTURES.items() if traits.config_defaults])
def test_a_silent_field_means_what_it_means_to_transformers(arch):
    """A config.json without a field that changes the maths (routing groups, dense layers,
    shared experts, renormalisation, rotary base, norm epsilon, sliding window) gives the spec
    of one holding transformers' default for it:
    the defaults are those of transformers' own config class, which are not the same across
    architectures (DeepSeek-V2 keeps no dense layer by default, V3 three, GLM-4.5 one)."""
    kind = ZOO[arch]
    hf_defaults = hf_classes(kind)[0]().to_dict()
    hf_defaults = {**hf_defaults.get("rope_parameters", {}), **hf_defaults}  # rope_theta sits in there
    if "use_sliding_window" in hf_defaults:  # the class nulls its default window while windows are off
        hf_defaults["sliding_window"] = hf_classes(kind)[0](use_sliding_window=True).sliding_window

    def outcome(cfg: dict):  # the spec, or the refusal (a default may not fit the zoo's small shape)
        try:
            return spec_from_hf_config(cfg)
        except ValueError as e:
            return str(e)

    for key, value in ARCHITECTURES[arch].config_defaults.items():
        assert value == hf_defaults[key], key
        layers = 6  # more than any default number of dense layers
        silent = {k: v for k, v in _config(kind, num_hidden_layers=layers).items() if k != key}
        for nested in ("rope_parameters", "rope_scaling"):  # where transformers may have put it
            if isinstance(silent.get(nested), dict):
                silent[nested] = {k: v for k, v in silent[nested].items() if k != key}
        explicit = _config(kind, num_hidden_layers=layers, **{key: hf_defaults[key]})
        assert outcome(silent) == outcome(explicit), key


def _outcome(cfg: dict):
    """The spec, or the refusal's message."""
    try:
        return spec_from_hf_config(cfg)
    except ValueError as e:
        return str(e)


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_silent_field_means_what_transformers_makes_of_it(kind):
    """Dropping any one field of a zoo config.json gives the spec of the config that
    transformers' config class makes of the rest (its own defaults, and what it derives from
    other fields: head_dim, the KV heads, the architecture from model_type), or a refusal that
    names the field; never another model."""
    cfg = _config(kind, num_hidden_layers=6)
    for key in sorted(cfg):
        silent = {k: v for k, v in cfg.items() if k != key}
        try:
            resolved = {**hf_classes(kind)[0](**silent).to_dict(), "architectures": cfg["architectures"]}
        except Exception:  # transformers refuses it as well (num_hidden_layers against layer_types)
            continue
        got = _outcome(silent)
        if isinstance(got, str) and key in got:
            continue
        assert got == _outcome(resolved), key


def test_model_type_names_the_architecture_as_in_transformers():
    for kind in KINDS:
        config_class, model_class = hf_classes(kind)
        assert MODEL_TYPES[config_class.model_type] == model_class.__name__
    unknown = {k: v for k, v in _config("qwen3_moe").items() if k != "architectures"} | {"model_type": "gpt2"}
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        spec_from_hf_config(unknown)


@pytest.mark.parametrize("layers", [0, -1, 2.5, True])
def test_a_model_needs_a_layer(layers):
    with pytest.raises(ValueError, match="num_hidden_layers"):
        spec_from_hf_config({**_config("qwen3_moe"), "num_hidden_layers": layers})


def test_the_new_architectures_read_their_fields():
    qwen2 = spec_from_hf_config(_config("qwen2_moe"))
    assert (qwen2.qkv_bias, qwen2.o_proj_bias, qwen2.qk_norm) == (True, False, False)
    assert (qwen2.moe.shared_intermediate_size, qwen2.moe.shared_gate, qwen2.moe.grouped) == (64, True, None)
    assert qwen2.moe.dense_layers == {1} and not qwen2.moe.norm_topk_prob
    glm = spec_from_hf_config(_config("glm4_moe"))
    assert (glm.qkv_bias, glm.o_proj_bias, glm.qk_norm, glm.rope.partial_rotary_factor) == (True, False, True, 0.5)
    assert (glm.moe.num_experts, glm.moe.top_k, glm.moe.shared_intermediate_size, glm.moe.shared_gate) == (
        8,
        3,
        64,
        False,
    )
    assert (glm.moe.grouped.num_groups, glm.moe.grouped.topk_groups, glm.moe.grouped.routed_scaling_factor) == (
        4,
        2,
        2.5,
    )
    assert glm.moe.dense_layers == {0} and glm.moe.norm_topk_prob and glm.num_mtp_layers == 1
    v3 = spec_from_hf_config(_config("deepseek_v3"))
    assert (v3.mla.q_lora_rank, v3.mla.kv_lora_rank, v3.mla.v_head_dim, v3.mla.rope_interleaved) == (24, 32, 12, True)
    assert (v3.head_dim, v3.moe.grouped.scoring, v3.moe.shared_intermediate_size, v3.num_mtp_layers) == (
        8,
        "sigmoid",
        32,
        1,
    )
    v2 = spec_from_hf_config(_config("deepseek_v2"))
    assert (v2.mla.q_lora_rank, v2.moe.grouped.scoring, v2.moe.grouped.num_groups) == (None, "softmax", 1)
    assert (v2.moe.grouped.routed_scaling_factor, v2.moe.shared_intermediate_size, v2.moe.dense_layers) == (
        1.5,
        64,
        {0},
    )


@pytest.mark.parametrize(
    "kind,rope",
    [
        ("deepseek_v3", None),
        (
            "deepseek_v2",
            dict(
                rope_type="yarn", factor=40.0, original_max_position_embeddings=16, mscale=0.707, mscale_all_dim=0.707
            ),
        ),
        ("deepseek_v2", dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=32, mscale=1.0)),
        ("deepseek_v3", dict(rope_type="linear", factor=4.0, mscale_all_dim=1.0)),
        ("deepseek_v2", dict(rope_type="dynamic", factor=2.0, mscale_all_dim=0.707)),
    ],
)
def test_latent_attention_softmax_scale_equals_transformers(kind, rope):
    overrides = {} if rope is None else dict(rope_parameters=dict(rope, rope_theta=10000.0))
    hf = hf_config(kind, **overrides)
    module = importlib.import_module(f"transformers.models.{hf.model_type}.modeling_{hf.model_type}")
    prefix = hf_classes(kind)[1].__name__.removesuffix("ForCausalLM")
    reference = getattr(module, f"{prefix}Attention")(hf, layer_idx=0)
    assert spec_from_hf_config(_config(kind, **overrides)).mla.softmax_scale == pytest.approx(
        reference.scaling, rel=1e-12
    )
    yarn = spec_from_hf_config(_config("qwen3_moe_yarn"))
    assert (yarn.rope.kind, yarn.rope.factor, yarn.rope.original_max_position) == ("yarn", 4.0, 64)
    assert yarn.max_position == 256


# Every field raymoe refuses, flipped to a value it does not implement. "every" covers each
# architecture; the examples (Llama's mlp_bias and gelu) are among them.
ROPE_TYPES = ["longrope"]
FLIPS = [
    ("every", "hidden_act", "gelu"),
    ("every", "quantization_config", {"quant_method": "fp8"}),
    *[("every", "rope_type", kind) for kind in ROPE_TYPES],
    ("whole heads", "partial_rotary_factor", 0.5),
    ("LlamaForCausalLM", "mlp_bias", True),
    ("DeepseekV3ForCausalLM", "attention_bias", True),
    ("DeepseekV3ForCausalLM", "topk_method", "greedy"),
    ("DeepseekV3ForCausalLM", "scoring_func", "softmax"),
    ("DeepseekV3ForCausalLM", "moe_layer_freq", 2),
    ("DeepseekV2ForCausalLM", "attention_bias", True),
    ("DeepseekV2ForCausalLM", "mlp_bias", True),
    ("DeepseekV2ForCausalLM", "norm_topk_prob", True),
    ("DeepseekV2ForCausalLM", "topk_method", "noaux_tc"),
    ("DeepseekV2ForCausalLM", "scoring_func", "sigmoid"),
    ("DeepseekV2ForCausalLM", "moe_layer_freq", 2),
]


def _cases():
    for arch, kind in sorted(ZOO.items()):
        whole_heads = ARCHITECTURES[arch].partial_rotary_default is None
        for where, field, value in FLIPS:
            if where == "every" or where == arch or (where == "whole heads" and whole_heads):
                yield pytest.param(kind, field, value, id=f"{kind}-{field}-{value}")


@pytest.mark.parametrize("kind,field,value", list(_cases()))
def test_an_unimplemented_value_is_refused_naming_the_field(kind, field, value):
    cfg = _config(kind)
    if field in ("rope_type", "partial_rotary_factor"):
        cfg["rope_parameters"] = {**cfg["rope_parameters"], field: value, "factor": 2.0}
    if field == "partial_rotary_factor":  # a scaled rope's init reads it (the default one of these models not)
        cfg["rope_parameters"]["rope_type"] = "yarn"
    else:
        cfg[field] = value
    with pytest.raises(ValueError, match=field):
        spec_from_hf_config(cfg)


def test_the_flips_cover_every_refused_field():
    refused = set(COMMON_IMPLEMENTED_VALUES) | {f for t in ARCHITECTURES.values() for f in t.implemented_values}
    assert refused <= {field for _, field, _ in FLIPS}


ROPES = {
    "default": ("qwen3_moe", None),
    "llama3": (
        "llama",
        dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        ),
    ),
    "yarn": ("qwen3_moe", dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64)),
    "yarn-betas-untruncated": (
        "qwen3_moe",
        dict(
            rope_type="yarn", factor=3.0, original_max_position_embeddings=48, beta_fast=8, beta_slow=2, truncate=False
        ),
    ),
    "yarn-attention-factor": (
        "qwen3",
        dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64, attention_factor=0.8),
    ),
    "yarn-mscale": (
        "mixtral",
        dict(rope_type="yarn", factor=40.0, original_max_position_embeddings=16, mscale=1.0, mscale_all_dim=0.707),
    ),
    "yarn-no-factor": ("llama", dict(rope_type="yarn", factor=None, original_max_position_embeddings=128)),
    "yarn-partial": ("glm4_moe", dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64)),
    "yarn-qwen2-moe": ("qwen2_moe", dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=128)),
    "yarn-deepseek-v3": (
        "deepseek_v3",
        dict(rope_type="yarn", factor=40.0, original_max_position_embeddings=16, mscale=1.0, mscale_all_dim=1.0),
    ),
    "linear": ("qwen3_moe", dict(rope_type="linear", factor=4.0)),
    "linear-partial": ("glm4_moe", dict(rope_type="linear", factor=2.5)),
    "linear-deepseek-v2": ("deepseek_v2", dict(rope_type="linear", factor=3.0)),
    # dynamic NTK: the default's frequencies up to max_position_embeddings (the table's positions)
    "dynamic": ("mixtral", dict(rope_type="dynamic", factor=4.0)),
    # whole-head models: their default rope init never reads partial_rotary_factor; a scaled one's
    # does, and works where the frequencies still cover the head (16 * 0.97 -> 15 dims: 8 pairs)
    "default-partial-ignored": ("qwen3", dict(rope_type="default", partial_rotary_factor=0.5)),
    "default-partial-ignored-deepseek-v2": ("deepseek_v2", dict(rope_type="default", partial_rotary_factor=0.5)),
    "llama3-partial-whole-head": (
        "llama",
        dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
            partial_rotary_factor=0.97,
        ),
    ),
    "yarn-deepseek-v2-lite": (
        "deepseek_v2",
        dict(rope_type="yarn", factor=40.0, original_max_position_embeddings=16, mscale=0.707, mscale_all_dim=0.707),
    ),
}


@pytest.mark.parametrize("name", list(ROPES))
def test_rotary_table_equals_transformers(name):
    kind, rope = ROPES[name]
    overrides = {} if rope is None else dict(rope_parameters=dict(rope, rope_theta=10000.0))
    if kind == "glm4_moe" and rope is not None:
        overrides["rope_parameters"]["partial_rotary_factor"] = 0.5
    hf = hf_config(kind, **overrides)
    spec = spec_from_hf_config(_config(kind, **overrides))
    module = importlib.import_module(f"transformers.models.{hf.model_type}.modeling_{hf.model_type}")
    prefix = hf_classes(kind)[1].__name__.removesuffix("ForCausalLM")
    reference = getattr(module, f"{prefix}RotaryEmbedding")(hf)
    positions = torch.arange(spec.max_position)
    out = reference(torch.zeros(1, dtype=torch.float32), positions[None])
    complex_table = isinstance(out, torch.Tensor)  # DeepSeek-V2's: cos + i sin (torch.polar: within an ulp)
    if complex_table:
        cos, sin = out.real, out.imag
    else:
        # transformers' rope init (its inv_freq and attention scaling), turned into angles by an exact
        # product: its forward takes them through a float32 matmul, which CPU BLAS does not always
        # compute exactly (seen 1.5e-4 off in about one run in eight)
        angles = torch.cat([positions[:, None].float() * reference.inv_freq[None, :]] * 2, dim=-1)[None]
        cos, sin = angles.cos() * reference.attention_scaling, angles.sin() * reference.attention_scaling
    table = RotaryEmbedding(spec.head_dim, spec.rope, spec.max_position, torch.device("cpu")).cos_sin
    half = table.shape[-1] // 2
    assert table.shape[-1] == 2 * math.ceil(int(spec.head_dim * spec.rope.partial_rotary_factor) / 2)
    assert cos.shape[-1] == (half if complex_table else 2 * half)
    tol = dict(rtol=0, atol=2e-7 if complex_table else 0)
    torch.testing.assert_close(table[:, :half], cos[0, :, :half], **tol)
    torch.testing.assert_close(table[:, half:], sin[0, :, :half], **tol)
    if name.startswith("yarn"):
        assert spec.max_position >= spec.rope.original_max_position * spec.rope.factor


@pytest.mark.parametrize("field,value", [("qk_rope_head_dim", 7), ("kv_lora_rank", 0), ("v_head_dim", -1)])
def test_latent_attention_dims_that_cannot_work_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        spec_from_hf_config({**_config("deepseek_v3"), field: value})


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", "qwen2_moe", "glm4_moe", "deepseek_v3"])
def test_a_moe_without_experts_is_refused_naming_the_field(kind):
    cfg = _config(kind)
    key = next(k for k in ("num_experts", "num_local_experts", "n_routed_experts") if k in cfg)
    cfg[key] = 0
    with pytest.raises(ValueError, match=f"{key} = 0 is not implemented"):
        spec_from_hf_config(cfg)


@pytest.mark.parametrize("max_window_layers", [0, 1, 2, 5])
def test_the_window_applies_only_where_transformers_slides_a_layer(max_window_layers):
    """Qwen3's layers slide from max_window_layers on (transformers' layer_types): with none
    sliding the context is not capped at the window."""
    hf = hf_config("qwen3", use_sliding_window=True, sliding_window=32, max_window_layers=max_window_layers)
    spec = spec_from_hf_config(
        _config("qwen3", use_sliding_window=True, sliding_window=32, max_window_layers=max_window_layers)
    )
    assert spec.sliding_window == (32 if "sliding_attention" in hf.layer_types else None)
    # the same config as older transformers wrote it, without layer_types
    legacy = _config("qwen3", use_sliding_window=True, sliding_window=32, max_window_layers=max_window_layers)
    del legacy["layer_types"]
    assert spec_from_hf_config(legacy).sliding_window == spec.sliding_window


def _transformers_slides(kind: str, cfg) -> bool:
    """Whether transformers' model of ``cfg`` attends within a window in any layer: its attention
    modules' own window where they keep one, Mixtral's config (its attention reads it there)."""
    model = hf_classes(kind)[1](cfg)
    windows = [m.sliding_window for m in model.modules() if hasattr(m, "sliding_window") and hasattr(m, "o_proj")]
    if windows:
        return any(w for w in windows)
    return kind.startswith("mixtral") and bool(getattr(cfg, "sliding_window", None))


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_window_applies_where_transformers_slides_any_layer(kind):
    """Each architecture's rule for which layers slide (Qwen3-MoE: all of them, whatever
    max_window_layers; Qwen2-MoE: the even ones below it; Qwen3: from it on; Llama, GLM-4.5 and
    DeepSeek: none) against transformers' model of the same config.json; where any layer slides
    the context is capped at the window. Qwen3-MoE with max_window_layers >= its layers ran with
    no cap and gave other tokens than transformers past the window."""
    for max_window_layers in (0, 1, 2, 5):
        fields = dict(use_sliding_window=True, sliding_window=32, max_window_layers=max_window_layers)
        cfg = _config(kind, **fields)
        cfg.pop("layer_types", None)  # as older transformers wrote it: the architecture's rule decides
        hf = hf_config(kind, **fields)
        hf.layer_types = None if not hasattr(hf, "layer_types") else hf.layer_types
        expected = 32 if _transformers_slides(kind, hf) else None
        assert spec_from_hf_config(cfg).sliding_window == expected, (kind, max_window_layers)


def test_mixtral_renormalises_its_top_k_whatever_norm_topk_prob_says():
    """transformers' MixtralTopKRouter always divides the top-k weights by their sum and never
    reads norm_topk_prob (a false here gave other tokens than transformers)."""
    assert spec_from_hf_config(_config("mixtral", norm_topk_prob=False)).moe.norm_topk_prob is True


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_more_experts_a_token_than_there_are_is_refused_naming_the_field(kind):
    cfg = _config(kind)
    experts = next(cfg[k] for k in ("num_experts", "num_local_experts", "n_routed_experts") if k in cfg)
    cfg["num_experts_per_tok"] = experts + 1
    with pytest.raises(ValueError, match=rf"num_experts_per_tok = {experts + 1} must be in \[1, {experts}\]"):
        spec_from_hf_config(cfg)


def test_a_window_of_no_tokens_is_refused_naming_the_field():
    cfg = _config("mixtral", sliding_window=0)
    with pytest.raises(ValueError, match="sliding_window = 0"):
        spec_from_hf_config(cfg)


@pytest.mark.parametrize(
    "kind,field,value",
    [
        # 4 query heads cannot be shared out over 3 KV heads (transformers fails at its first step)
        ("qwen3_moe", "num_key_value_heads", 3),
        ("llama", "num_key_value_heads", 0),
        ("qwen3_moe", "rms_norm_eps", None),
        ("mixtral", "rms_norm_eps", "1e-5"),
        # transformers divides by it
        ("qwen3_moe", "decoder_sparse_step", 0),
        ("qwen2_moe", "decoder_sparse_step", 1.5),
    ],
)
def test_a_field_that_cannot_be_built_is_refused_naming_it(kind, field, value):
    cfg = _config(kind)
    cfg[field] = value
    with pytest.raises(ValueError, match=f"config.json: {field} = "):
        spec_from_hf_config(cfg)


def test_mixtral_experts_are_intermediate_size_wide_whatever_moe_intermediate_size_says():
    """transformers' Mixtral never reads moe_intermediate_size (raymoe read it, and loaded the
    first rows of every expert where it was smaller)."""
    model = hf_classes("mixtral")[1](hf_config("mixtral", moe_intermediate_size=16))
    down = next(p for name, p in model.named_parameters() if name.endswith("experts.down_proj"))
    spec = spec_from_hf_config(_config("mixtral", moe_intermediate_size=16))
    assert spec.moe.intermediate_size == down.shape[-1] == KINDS["mixtral"]["intermediate_size"]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("layer_type", ["full_attention", "sliding_attention"])
def test_layer_types_count_only_where_transformers_reads_them(kind, layer_type):
    """A config.json's layer_types (here every layer the same) against transformers' model of it:
    Qwen3-MoE and Mixtral slide every layer whatever it says (a list of full layers dropped their
    window in raymoe, and prompts past it gave other tokens)."""
    fields = dict(use_sliding_window=True, sliding_window=32, max_window_layers=1)
    layer_types = [layer_type] * KINDS[kind]["num_hidden_layers"]
    try:
        hf = hf_config(kind, **fields, layer_types=layer_types)
    except ValueError:  # transformers refuses layer_types for this architecture: nothing to compare
        pytest.skip(f"transformers refuses layer_types for {kind}")
    expected = 32 if _transformers_slides(kind, hf) else None
    assert spec_from_hf_config(_config(kind, **fields, layer_types=layer_types)).sliding_window == expected


@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen3", "qwen2_moe"])
def test_use_sliding_window_without_a_window_takes_transformers_default_window(kind):
    """use_sliding_window: true and no sliding_window key: transformers' config class's window
    (4096), not none (raymoe ran such a model with no window and no cap on the context)."""
    fields = dict(use_sliding_window=True, max_window_layers=1)
    hf = hf_config(kind, **fields)  # the class's default window
    cfg = _config(kind, **fields)
    del cfg["sliding_window"]
    cfg.pop("layer_types", None)
    assert _transformers_slides(kind, hf) and hf.sliding_window
    assert spec_from_hf_config(cfg).sliding_window == hf.sliding_window


def test_rope_scaling_beside_rope_parameters_is_read_as_transformers_reads_it():
    """A rope_scaling block added to a config.json that transformers 5 saved with rope_parameters
    (as model cards say to enable YaRN): transformers takes rope_scaling in place of
    rope_parameters, rope_theta included; raymoe merged the two, rope_parameters winning, and
    ran without YaRN."""
    cfg = _config("qwen3_moe")
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    hf = hf_classes("qwen3_moe")[0].from_dict(cfg).rope_parameters
    rope = spec_from_hf_config(cfg).rope
    assert (rope.kind, rope.theta, rope.factor) == (hf["rope_type"], hf["rope_theta"], hf["factor"])
    assert rope.original_max_position == hf["original_max_position_embeddings"]


@pytest.mark.parametrize("kind_key", ["rope_type", "type"])  # "type": the older spelling in rope_scaling
@pytest.mark.parametrize(
    "parameters,warned",
    [
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, False),  # the same block
        ({"rope_type": "default", "rope_theta": 1e6}, True),  # differs where both set a key
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 5e5}, True),
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 1e4}, False),
    ],
)
def test_rope_parameters_ignored_beside_rope_scaling_are_warned_of(caplog, parameters, warned, kind_key):
    """A key only rope_parameters sets (a rope_theta of 5e5, where the one used is the default
    10,000) is dropped as well: the warning says so, and stays quiet where nothing is lost."""
    cfg = _config("qwen3_moe")
    cfg.pop("rope_theta", None)
    cfg["rope_parameters"] = parameters
    cfg["rope_scaling"] = {kind_key: "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    with caplog.at_level(logging.WARNING):
        rope = spec_from_hf_config(cfg).rope
    assert rope.theta == hf_classes("qwen3_moe")[0].from_dict(cfg).rope_parameters["rope_theta"] == 1e4
    assert ("rope_parameters" in caplog.text) == warned


def test_deepseek_v2_ignores_rope_interleave_as_transformers_does():
    """transformers' DeepSeek-V2 rotates interleaved pairs whatever rope_interleave (V3's field)
    says: the field was refused."""
    base = spec_from_hf_config(_config("deepseek_v2"))
    assert spec_from_hf_config({**_config("deepseek_v2"), "rope_interleave": False}) == base
    assert base.mla.rope_interleaved


@pytest.mark.parametrize("kind", ["glm4_moe", "deepseek_v3"])
def test_routing_fields_of_a_moe_whose_every_layer_is_dense_are_not_checked(kind):
    """first_k_dense_replace past the layers: transformers builds no router, so routing fields it
    would refuse at a forward are moot (they were refused)."""
    layers = _config(kind)["num_hidden_layers"]
    odd = dict(first_k_dense_replace=layers, n_group=3, topk_group=4)  # 3 groups of 8 experts, 4 of them kept
    spec = spec_from_hf_config({**_config(kind), **odd, "num_experts_per_tok": 9})
    assert spec.moe_layers == []
    with pytest.raises(ValueError, match="n_group"):
        spec_from_hf_config({**_config(kind), **odd, "first_k_dense_replace": layers - 1})


def test_qwen2_moe_without_a_shared_expert_width_takes_transformers_default():
    """shared_expert_intermediate_size left out: transformers' 5632 (it was refused as missing)."""
    cfg = {k: v for k, v in _config("qwen2_moe").items() if k != "shared_expert_intermediate_size"}
    assert (
        spec_from_hf_config(cfg).moe.shared_intermediate_size
        == hf_classes("qwen2_moe")[0]().shared_expert_intermediate_size
    )
