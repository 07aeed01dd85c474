"""Which attention backend a rank runs (``engine.attention_backend``), and the KV cache's dtype
(``engine.kv_cache_dtype``)."""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from raymoe.actors.engine.attention_torch import TorchAttention
from raymoe.actors.models.decoder import CausalLM
from raymoe.comm.group import GroupCoordinator

log = logging.getLogger(__name__)


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype, *, latent: bool) -> torch.dtype:
    """``engine.kv_cache_dtype`` -> the KV cache's torch dtype."""
    if name == "auto":
        return model_dtype
    if latent:
        raise ValueError(
            "engine.kv_cache_dtype: fp8 is not implemented for latent attention (DeepSeek's MLA cache); use auto"
        )
    return torch.float8_e4m3fn


def make_attention(
    kind: str,
    kv_cache: torch.Tensor,
    block_size: int,
    model: CausalLM,
    *,
    q_dtype: torch.dtype,
    step_tokens: int,
    max_seqs: int,
    cp: Optional[GroupCoordinator] = None,
) -> Any:
    """The attention backend for ``engine.attention_backend``: auto = FlashInfer on GPU, torch on
    CPU (and on GPU for what FlashInfer does not run here, with a warning). ``q_dtype``: the
    model's (the cache's may be FP8). ``step_tokens`` and ``max_seqs`` bound one step
    (FlashInfer MLA refuses budgets it could not plan)."""
    on_gpu = kv_cache.device.type == "cuda"
    if kind == "flashinfer" and not on_gpu:
        raise ValueError("engine.attention_backend: flashinfer needs parallel.device: cuda; use torch or auto")
    mla, heads = model.spec.mla, model.layers[0].attn.heads
    latent = dict(latent_dim=mla.kv_lora_rank, sm_scale=mla.softmax_scale) if mla is not None else {}
    if kind == "torch" or not on_gpu:
        return TorchAttention(kv_cache, block_size, cp=cp, **latent)
    try:
        from raymoe.actors.engine.attention_flashinfer import FlashInferAttention, check_head_dim
        from raymoe.actors.engine.attention_flashinfer_mla import (
            FlashInferLatentAttention,
            check_latent_dims,
            check_step_budget,
        )

        if cp is not None and cp.world_size > 1:
            raise ValueError("FlashInfer attention does not run context parallelism (parallel.cp > 1) yet")
        if q_dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"FlashInfer attention takes float16 or bfloat16, not model.dtype {q_dtype}")
        if mla is not None:
            check_latent_dims(mla.kv_lora_rank, mla.qk_rope_head_dim)
            attention = FlashInferLatentAttention(kv_cache, block_size, heads, **latent)
            num_sms = torch.cuda.get_device_properties(kv_cache.device).multi_processor_count
            check_step_budget(step_tokens, max_seqs, heads, num_sms)
            return attention
        check_head_dim(kv_cache.shape[-1])
        return FlashInferAttention(kv_cache, block_size, heads, q_dtype=q_dtype)
    except (ImportError, ValueError) as e:
        if kind == "flashinfer":
            fix = "pip install 'raymoe[gpu]'" if isinstance(e, ImportError) else "use torch or auto"
            raise ValueError(f"engine.attention_backend: flashinfer: {e}; {fix}") from e
        log.warning("%s: using torch attention, which is slow on GPU", e)
    return TorchAttention(kv_cache, block_size, cp=cp, **latent)
