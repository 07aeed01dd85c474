"""How many KV-cache blocks a rank holds: the bytes of one block, and what memory is left
for them once the model (and on GPU the CUDA graphs) has its share."""

from __future__ import annotations

import math

import torch

from raymoe.actors.models.decoder import CausalLM
from raymoe.cluster.config import EngineConfig

CPU_KV_BUDGET_BYTES = 2 * 2**30  # auto-sized CPU caches stop here
GRAPHS_RESERVE_BYTES = 2 * 2**30  # the decode graphs' pool, besides the piecewise graphs' estimate


def kv_block_bytes(model: CausalLM, block_slots: int, kv_dtype: torch.dtype) -> int:
    """Bytes of one block of ``block_slots`` tokens of this rank's cache, every layer."""
    elem = torch.empty((), dtype=kv_dtype).element_size()
    return math.prod(model.kv_cache_shape(1, block_slots)) * elem


def max_kv_blocks(
    model: CausalLM,
    engine: EngineConfig,
    *,
    device: torch.device,
    dtype: torch.dtype,
    kv_block_bytes: int,
    max_model_len: int,
) -> int:
    """``engine.num_kv_blocks`` if set; else on GPU what ``kv_memory_fraction`` of the device's
    memory leaves after what is in use and the graphs' reserve, and on CPU enough for
    ``max_num_seqs`` sequences of ``max_model_len`` tokens, up to ``CPU_KV_BUDGET_BYTES``."""
    if engine.num_kv_blocks is not None:
        return engine.num_kv_blocks
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        reserve = GRAPHS_RESERVE_BYTES + mixed_graph_bytes(model, engine, dtype) if engine.cuda_graphs else 0
        budget = int(total * engine.kv_memory_fraction) - (total - free) - reserve
        return max(0, budget // kv_block_bytes - 1)
    wanted = engine.max_num_seqs * -(-max_model_len // engine.block_size)
    return max(1, min(wanted, CPU_KV_BUDGET_BYTES // kv_block_bytes))


def mixed_graph_tokens(engine: EngineConfig) -> int:
    """The largest step the piecewise graphs take (0: none)."""
    return min(engine.mixed_step_graph_tokens, engine.max_num_batched_tokens)


def mixed_graph_bytes(model: CausalLM, engine: EngineConfig, dtype: torch.dtype) -> int:
    """Memory the piecewise graphs hold besides what eager steps need (an estimate): the
    attention's staged inputs and output at the largest bucket, and as much again for the
    graphs' pool, which keeps one step's activations of its own."""
    tokens = mixed_graph_tokens(engine)
    if not tokens or engine.attention_backend == "torch":
        return 0
    attn, mla = model.layers[0].attn, model.spec.mla
    if mla is not None:  # the query's latent and rotary parts, the output, the cache entry
        width = attn.heads * (2 * mla.kv_lora_rank + mla.qk_rope_head_dim) + attn.latent_width
    else:  # q, k, v and the output
        width = 2 * attn.heads * attn.qkv.head_dim + 2 * attn.qkv.kv_heads * attn.qkv.head_dim
    staged = tokens * (width + model.spec.hidden_size) * torch.empty((), dtype=dtype).element_size()
    return 2 * staged
