"""The pre-norm decoder every supported architecture is built from, already sharded.

Attention: heads over ``tp``; dense MLPs over ``tp``; vocabulary (embedding and
LM head) over ``tp``; MoE layers over the whole world (see moe.py).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from raymoe.actors.models import ops
from raymoe.actors.models.batch import ForwardBatch
from raymoe.actors.models.checkpoint import CheckpointReader
from raymoe.actors.models.expert_map import ExpertMap
from raymoe.actors.models.latent_attention import LatentAttention
from raymoe.actors.models.layers import (
    BlockOutput,
    DenseMLP,
    ParallelLMHead,
    PartialSum,
    QKVProjection,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from raymoe.actors.models.moe import MoE
from raymoe.actors.models.registry import architecture_traits
from raymoe.actors.models.spec import ModelSpec
from raymoe.comm.groups import Groups


class AttentionBlock(nn.Module):
    def __init__(
        self, spec: ModelSpec, layer: int, groups: Groups, rotary: RotaryEmbedding, *, dtype, device, fp8_block=None
    ) -> None:
        super().__init__()
        self.layer = layer
        self.rotary = rotary
        self.qkv = QKVProjection(spec, groups.tp, dtype, device, fp8_block=fp8_block)
        self.heads = self.qkv.heads
        self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, dtype, device) if spec.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, dtype, device) if spec.qk_norm else None
        self.o_proj = RowParallelLinear(
            self.qkv.heads * spec.head_dim,
            spec.hidden_size,
            groups.tp,
            bias=spec.o_proj_bias,
            dtype=dtype,
            device=device,
            fp8_block=fp8_block,
        )

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> PartialSum:
        q, k, v = self.qkv(x)
        if self.q_norm is not None:  # per-head norms and rotary in one kernel on GPU
            q, k = ops.qk_norm_rotary_(
                batch.positions,
                q,
                k,
                q_weight=self.q_norm.weight,
                k_weight=self.k_norm.weight,
                eps=self.q_norm.eps,
                cos_sin=self.rotary.cos_sin,
            )
        else:
            q, k = self.rotary(batch.positions, q, k)
        out = batch.attention.forward(self.layer, q, k, v)
        return PartialSum(self.o_proj(out.reshape(x.shape[0], self.qkv.heads * self.qkv.head_dim)), self.o_proj.group)

    def load(self, reader: CheckpointReader, prefix: str) -> None:
        self.qkv.load(reader, prefix)
        if self.q_norm is not None:
            self.q_norm.load(reader, prefix + "q_norm.weight")
            self.k_norm.load(reader, prefix + "k_norm.weight")
        self.o_proj.load(reader, prefix + "o_proj.", self.qkv.q_start * self.qkv.head_dim)


class DecoderLayer(nn.Module):
    def __init__(
        self, spec: ModelSpec, layer: int, attn: AttentionBlock | LatentAttention, mlp: nn.Module, *, dtype, device
    ) -> None:
        super().__init__()
        self.layer = layer
        self.input_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, device)
        self.attn = attn
        self.post_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, device)
        self.mlp = mlp

    def forward(
        self, x: torch.Tensor | BlockOutput, residual: torch.Tensor | None, batch: ForwardBatch
    ) -> tuple[BlockOutput | torch.Tensor, torch.Tensor]:
        """Pre-norm block, with the residual stream carried separately so each norm fuses
        with the add before it, and with what is left of the block before it (see
        BlockOutput): returns (this block's output, the residual before it)."""
        if residual is None:
            assert isinstance(x, torch.Tensor)
            h, residual = self.input_norm(x), x
        else:
            h, residual = self.input_norm.add_forward(x, residual)
        attn = self.attn(h, batch)
        if not isinstance(self.mlp, MoE):
            h, residual = self.post_norm.add_forward(attn, residual)
            return self.mlp(h), residual
        gather = self.mlp.input_gather(batch)
        if gather is None:
            h, residual = self.post_norm.add_forward(attn, residual)
            return self.mlp(h, batch), residual
        # data-parallel attention: the norm hands the MoE every replica's rows
        n = self.post_norm
        h_all, residual = attn.add_rms_norm_gather(residual, n.weight, n.eps, gather)
        return self.mlp(h_all, batch), residual


class CausalLM(nn.Module):
    def __init__(
        self,
        spec: ModelSpec,
        groups: Groups,
        expert_map: ExpertMap | None,
        *,
        dtype,
        device,
        router_skew: float = 0.0,
        fp8_block: tuple[int, int] | None = None,
    ) -> None:
        """fp8_block: the projections' weights in FP8 with scales per such block (fp8.py)."""
        super().__init__()
        self.spec = spec
        self.traits = architecture_traits(spec.architecture)
        self.embed = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, groups.tp, dtype=dtype, device=device)
        rotary = RotaryEmbedding(spec.head_dim, spec.rope, spec.max_position, device)
        moe_index = {layer: i for i, layer in enumerate(spec.moe_layers)}
        layers = []
        for i in range(spec.num_layers):
            if i in moe_index:
                assert expert_map is not None
                mlp: nn.Module = MoE(
                    spec,
                    i,
                    moe_index[i],
                    groups,
                    expert_map=expert_map,
                    dtype=dtype,
                    device=device,
                    router_skew=router_skew,
                    fp8_block=fp8_block,
                )
            else:
                mlp = DenseMLP(
                    spec.hidden_size, spec.intermediate_size, groups.tp, dtype=dtype, device=device, fp8_block=fp8_block
                )
            attention = LatentAttention if spec.mla is not None else AttentionBlock
            attn = attention(spec, i, groups, rotary, dtype=dtype, device=device, fp8_block=fp8_block)
            layers.append(DecoderLayer(spec, i, attn, mlp, dtype=dtype, device=device))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, device)
        self.lm_head = ParallelLMHead(self.embed, spec.tie_word_embeddings, dtype, device)

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """This rank's KV cache of ``num_blocks`` blocks: FlashInfer's paged NHD layout
        [layers, blocks, 2 (k, v), block_size, kv_heads, head_dim], or with latent attention
        [layers, blocks, block_size, kv_lora_rank + qk_rope_head_dim] (one entry per token
        that every head reads)."""
        layers, attn = self.spec.num_layers, self.layers[0].attn
        if isinstance(attn, LatentAttention):
            return (layers, num_blocks, block_size, attn.latent_width)
        return (layers, num_blocks, 2, block_size, attn.qkv.kv_heads, attn.qkv.head_dim)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """-> final hidden states [T, H] (normed); logits come from compute_logits. The
        caller ends the pass (Groups.finish_pass) before the next one."""
        x, residual = self.embed(batch.input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, batch)
        return self.norm.add_forward(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> this rank's logits shard (see ParallelLMHead): ``full_logits``
        or ``greedy_tokens`` turn the shards into what sampling needs."""
        return self.lm_head(hidden)

    def full_logits(self, shard: torch.Tensor) -> torch.Tensor:
        """-> logits [N, vocab], float32 (a collective over tp)."""
        return self.lm_head.gather(shard)

    def greedy_tokens(self, shard: torch.Tensor) -> torch.Tensor:
        """-> argmax tokens [N] int64, without gathering the logits over tp."""
        return self.lm_head.greedy(shard)

    @torch.no_grad()
    def load(self, reader: CheckpointReader, show_progress: bool = True) -> list[str]:
        """Read this rank's share of every tensor; a missing tensor raises ValueError naming
        it, and so does a tensor the model has no place for. -> the checkpoint's tensors
        that transformers ignores too (rotary tables, a tied LM head, multi-token-prediction
        layers), for the caller to name in a warning."""
        self.embed.load(reader, "model.embed_tokens.weight")
        for layer in tqdm(self.layers, desc="loading layers", unit="layer", disable=not show_progress):
            prefix = f"model.layers.{layer.layer}."
            layer.input_norm.load(reader, prefix + "input_layernorm.weight")
            layer.post_norm.load(reader, prefix + "post_attention_layernorm.weight")
            layer.attn.load(reader, prefix + "self_attn.")
            if isinstance(layer.mlp, MoE):
                layer.mlp.load(reader, self.traits.experts)
            else:
                mlp = prefix + "mlp."
                layer.mlp.load(reader, mlp + "gate_proj.weight", mlp + "up_proj.weight", mlp + "down_proj.")
        self.norm.load(reader, "model.norm.weight")
        self.lm_head.load(reader, "lm_head.weight")
        return reader.check_all_used(known_unused_tensors(self.spec))


def known_unused_tensors(spec: ModelSpec) -> list[str]:
    """Regular expressions of checkpoint tensors that no forward pass reads."""
    patterns = [r"\.rotary_emb\.inv_freq$"]
    if spec.tie_word_embeddings:
        patterns.append(r"^lm_head\.weight$")
    patterns += [rf"^model\.layers\.{spec.num_layers + i}\." for i in range(spec.num_mtp_layers)]
    return patterns
