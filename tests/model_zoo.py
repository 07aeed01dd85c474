"""Random-weight Hugging Face checkpoints for tests, and transformers as the reference.

Every checkpoint is written by transformers itself (``save_pretrained``), with the
built-in model's tokenizer files copied in, so raymoe loads exactly what a user's
checkpoint directory would hold.
"""

from __future__ import annotations

import pathlib
import shutil

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")

# Small shapes that still exercise every sharding path: experts split over ep up to 4,
# intermediate dims over tp up to 4, KV heads replicated (dense: 1 KV head), tied
# embeddings (dense), a dense layer inside a MoE model (qwen3_moe layer 1).
COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    num_attention_heads=4,
    head_dim=16,
    rms_norm_eps=1e-6,
    max_position_embeddings=512,
    initializer_range=0.15,
)
KINDS = {
    "qwen3_moe": dict(
        num_hidden_layers=3,
        num_key_value_heads=2,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        mlp_only_layers=[1],
    ),
    "mixtral": dict(
        num_hidden_layers=2, num_key_value_heads=2, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2
    ),
    "qwen3": dict(num_hidden_layers=2, num_key_value_heads=1, intermediate_size=128, tie_word_embeddings=True),
    "llama": dict(num_hidden_layers=2, num_key_value_heads=2, intermediate_size=128, attention_bias=True),
    # a gated shared expert, q/k/v biases, softmax routing without renormalisation
    "qwen2_moe": dict(
        num_hidden_layers=3,
        num_key_value_heads=2,
        intermediate_size=128,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        num_experts=8,
        num_experts_per_tok=2,
        mlp_only_layers=[1],
    ),
    # grouped sigmoid routing (4 groups of 2, the best 2 groups, top-3) with a correction bias and a
    # scale, two shared experts, a dense first layer, partial rotary, q/k norms, q/k/v biases
    "glm4_moe": dict(
        num_hidden_layers=3,
        num_key_value_heads=2,
        intermediate_size=128,
        moe_intermediate_size=32,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        n_shared_experts=2,
        first_k_dense_replace=1,
        partial_rotary_factor=0.5,
        use_qk_norm=True,
        attention_bias=True,
    ),
    # DeepSeek-V3's MLA (a q bottleneck, a 32-wide KV latent, value heads narrower than the
    # query/key heads, interleaved rotary) with YaRN's mscale on every dim of q.k, grouped sigmoid
    # routing with a correction bias, a shared expert, a dense first layer, one MTP layer; an
    # rms_norm_eps far from the latent norms' own (fixed at 1e-6 in transformers)
    "deepseek_v3": dict(
        rms_norm_eps=0.05,
        num_hidden_layers=3,
        num_key_value_heads=4,
        intermediate_size=128,
        moe_intermediate_size=32,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        n_shared_experts=1,
        first_k_dense_replace=1,
        q_lora_rank=24,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        head_dim=8,  # transformers' rotary reads head_dim: MLA's is qk_rope_head_dim
        v_head_dim=12,
        max_position_embeddings=256,
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=10000.0,
            factor=4.0,
            original_max_position_embeddings=64,
            mscale=1.0,
            mscale_all_dim=1.0,
        ),
    ),
    # DeepSeek-V2-Lite's shape: MLA without the q bottleneck, softmax top-k routing scaled,
    # two shared experts, a dense first layer
    "deepseek_v2": dict(
        num_hidden_layers=3,
        num_key_value_heads=4,
        intermediate_size=128,
        moe_intermediate_size=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=2,
        first_k_dense_replace=1,
        routed_scaling_factor=1.5,
        q_lora_rank=None,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        head_dim=8,
        v_head_dim=16,
    ),
}
# YaRN stretching a 64-token original context 4 times: the test prompts run past position 64
KINDS["qwen3_moe_yarn"] = dict(
    KINDS["qwen3_moe"],
    max_position_embeddings=256,
    rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64),
)


def hf_classes(kind: str):
    """(config class, model class) of ``kind`` in transformers."""
    import transformers

    names = {
        "qwen3_moe": "Qwen3Moe",
        "qwen3_moe_yarn": "Qwen3Moe",
        "mixtral": "Mixtral",
        "qwen3": "Qwen3",
        "llama": "Llama",
        "qwen2_moe": "Qwen2Moe",
        "glm4_moe": "Glm4Moe",
        "deepseek_v3": "DeepseekV3",
        "deepseek_v2": "DeepseekV2",
    }
    return getattr(transformers, names[kind] + "Config"), getattr(transformers, names[kind] + "ForCausalLM")


def hf_config(kind: str, **overrides: object):
    """The transformers config of ``kind`` (the zoo's shape), as write_checkpoint builds it."""
    config_cls, _ = hf_classes(kind)
    return config_cls(**{**COMMON, **KINDS[kind], **overrides}, bos_token_id=0, eos_token_id=2)


def write_checkpoint(
    kind: str,
    directory: pathlib.Path,
    seed: int = 0,
    initializer_range: float = 0.15,
    embedding_std: float | None = None,
    **overrides: object,
) -> pathlib.Path:
    """Write a random-weight checkpoint of ``kind``. For bf16 tests use a small
    ``initializer_range`` (0.05) with ``embedding_std=1``: layers still move the logits by
    several percent, while bf16 rounding stays well below that."""
    from raymoe.actors.models.builtin import ensure_builtin

    _, model_cls = hf_classes(kind)
    torch.manual_seed(seed)
    config = hf_config(kind, initializer_range=initializer_range, **overrides)
    model = model_cls(config).eval()
    with torch.no_grad():  # norms away from 1 and biases away from 0, so loading them matters
        for name, p in [*model.named_parameters(), *model.named_buffers()]:  # GLM's correction bias is a buffer
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            elif name.endswith("embed_tokens.weight") and embedding_std is not None:
                p.normal_(0, embedding_std)
    model.save_pretrained(directory)
    builtin = ensure_builtin("tiny-qwen3-moe", directory.parent / "cache")
    for f in TOKENIZER_FILES:
        shutil.copy(builtin / f, directory / f)
    return directory


def fp8_rounded_kv_attention() -> str:
    """Register (once) and name a transformers attention implementation whose keys and values
    are rounded as an FP8 KV cache stores them (engine.kv_cache_dtype: fp8: saturated at +-448,
    float8_e4m3fn, scale 1), then handed to transformers' own SDPA attention."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def rounded(x: torch.Tensor) -> torch.Tensor:
        return x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).to(x.dtype)

    def attention(module, query, key, value, attention_mask, **kwargs):
        return sdpa_attention_forward(module, query, rounded(key), rounded(value), attention_mask, **kwargs)

    AttentionInterface.register("fp8_rounded_kv", attention)
    return "fp8_rounded_kv"


def hf_greedy(
    directory: pathlib.Path,
    prompts: list[list[int]],
    new_tokens: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    attn_implementation: str | None = None,
) -> list[tuple[list[int], torch.Tensor]]:
    """transformers' greedy continuation of each prompt, recomputing the whole sequence at
    every step (no KV cache): per prompt, the new tokens and each step's float32 logits
    [new_tokens, vocab]. ``attn_implementation``: one registered with transformers'
    AttentionInterface (None: its default)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=dtype, attn_implementation=attn_implementation
    )
    model = model.to(device).eval()
    results = []
    with torch.no_grad():
        for prompt in prompts:
            ids, rows = list(prompt), []
            for _ in range(new_tokens):
                logits = model(torch.tensor([ids], device=device)).logits[0, -1].float().cpu()
                rows.append(logits)
                ids.append(int(logits.argmax()))
            results.append((ids[len(prompt) :], torch.stack(rows)))
    return results


def hf_router_noise_deviation(
    directory: pathlib.Path,
    prompts: list[list[int]],
    continuations: list[list[int]],
    reference: list[torch.Tensor],
    *,
    noise: float,
    draws: int,
    device: str = "cpu",
) -> list[torch.Tensor]:
    """How far transformers' float32 logits move when every router's input is multiplied by
    (1 + ``noise`` x a normal draw), at the scale of a bf16 run's error, in ``draws`` draws:
    per prompt, each step's largest absolute logit change against ``reference`` [steps, vocab],
    along the given continuation. A token near a tie between experts moves by a router's flip."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).to(device).eval()
    gates = [m for name, m in model.named_modules() if name.endswith(".gate")]
    if not gates:
        raise ValueError(f"no router (a module named '*.gate') in {type(model).__name__}")
    generator = torch.Generator(device=device)

    def perturb(module, args):
        x = args[0]
        return (x * (1 + noise * torch.randn(x.shape, generator=generator, device=x.device)),) + args[1:]

    hooks = [g.register_forward_pre_hook(perturb) for g in gates]
    deviations = [torch.zeros(len(c)) for c in continuations]
    try:
        with torch.no_grad():
            for draw in range(draws):
                generator.manual_seed(draw)
                for prompt, tokens, ref, dev in zip(prompts, continuations, reference, deviations):
                    ids = torch.tensor([prompt + tokens[:-1]], device=device)
                    logits = model(ids).logits[0, len(prompt) - 1 :].float().cpu()
                    torch.maximum(dev, (logits - ref).abs().amax(dim=-1), out=dev)
    finally:
        for h in hooks:
            h.remove()
    return deviations


def fp8_checkpoints(
    source: pathlib.Path, fp8_dir: pathlib.Path, reference_dir: pathlib.Path, block: tuple[int, int]
) -> None:
    """From ``source``, an FP8 checkpoint written as the Hub's are (every projection weight in
    float8_e4m3fn with a float32 ``weight_scale_inv`` per ``block``, config.json's
    quantization_config) and its reference: the same model with those weights dequantised."""
    import json

    from safetensors.torch import load_file, save_file

    tensors = {}
    for f in sorted(source.glob("*.safetensors")):
        tensors.update(load_file(f))
    quantised, reference = {}, {}
    for name, w in tensors.items():
        if not ("_proj" in name and name.endswith(".weight") and w.dim() == 2):  # DeepSeek's kv_a_proj_with_mqa too
            quantised[name] = reference[name] = w
            continue
        rows, cols = -(-w.shape[0] // block[0]), -(-w.shape[1] // block[1])
        padded = torch.zeros(rows * block[0], cols * block[1])
        padded[: w.shape[0], : w.shape[1]] = w.float()
        blocks = padded.view(rows, block[0], cols, block[1])
        scale = (blocks.abs().amax(dim=(1, 3)) / 448.0).clamp(min=1e-12)
        q = (blocks / scale[:, None, :, None]).view_as(padded)[: w.shape[0], : w.shape[1]].to(torch.float8_e4m3fn)
        full_scale = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
        quantised[name], quantised[name + "_scale_inv"] = q.contiguous(), scale.contiguous()
        reference[name] = (q.float() * full_scale[: w.shape[0], : w.shape[1]]).to(w.dtype)
    config = json.loads((source / "config.json").read_text())
    quant = {"quant_method": "fp8", "weight_block_size": list(block), "activation_scheme": "dynamic"}
    for directory, weights, cfg in (
        (fp8_dir, quantised, {**config, "quantization_config": quant}),
        (reference_dir, reference, config),
    ):
        directory.mkdir(parents=True, exist_ok=True)
        for f in source.iterdir():
            if ".safetensors" not in f.name and f.name != "config.json" and f.is_file():
                shutil.copy(f, directory / f.name)
        (directory / "config.json").write_text(json.dumps(cfg))
        save_file(weights, str(directory / "model.safetensors"))
