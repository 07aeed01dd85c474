"""ModelRunner: the one place that builds device tensors. Lives inside a rank actor.

It builds this rank's shard of the model, loads its slices of the checkpoint,
owns the KV cache and the attention backend, and runs one step: forward,
logits of the rows that sample, sampling (on the first rank of the DP
replica's attention group, the one that reports to the controller).
"""
from __future__ import annotations

import logging
import time
from typing import Optional

import torch

from raymoe.actors.engine.attention_torch import TorchAttention
from raymoe.actors.engine.sampler import sample
from raymoe.actors.engine.step import StepInput, StepOutput, build_step_layout
from raymoe.actors.models.batch import ForwardBatch
from raymoe.actors.models.checkpoint import CheckpointReader
from raymoe.actors.models.decoder import CausalLM
from raymoe.actors.models.expert_map import ExpertMap
from raymoe.actors.models.spec import ModelSpec, load_spec
from raymoe.actors.rank import RankContext
from raymoe.cluster.config import Config
from raymoe.cluster.expert_placement import default_placement, num_physical_experts

log = logging.getLogger(__name__)

CPU_KV_BUDGET_BYTES = 2 * 2**30  # auto-sized CPU caches stop here


def resolve_dtype(requested: str, spec: ModelSpec, device: torch.device) -> torch.dtype:
    """``auto``: the checkpoint's dtype on GPU, float32 on CPU (CPU bf16 matmuls are slow and lossy)."""
    name = requested if requested != "auto" else (spec.torch_dtype if device.type == "cuda" else "float32")
    if name not in ("float32", "bfloat16", "float16"):
        name = "bfloat16"
    return getattr(torch, name)


class ModelRunner:
    def __init__(self, ctx: RankContext, config: Config, checkpoint_dir: str, max_model_len: int) -> None:
        self.ctx, self.config, self.device = ctx, config, ctx.device
        self.spec = load_spec(checkpoint_dir)
        self.dtype = resolve_dtype(config.model.dtype, self.spec, self.device)
        self.max_model_len = max_model_len
        self.is_driver = ctx.groups.attn.rank_in_group == 0
        self.expert_map = self._initial_expert_map()
        t0 = time.perf_counter()
        self.model = CausalLM(self.spec, ctx.groups, self.expert_map, self.dtype, self.device)
        reader = CheckpointReader(checkpoint_dir)
        self.model.load(reader, show_progress=ctx.rank == 0)
        reader.close()
        log.info("rank %d loaded %s in %.1f s", ctx.rank, checkpoint_dir, time.perf_counter() - t0)
        self.block_size = config.engine.block_size
        attn = self.model.layers[0].attn.qkv
        self.kv_heads, self.head_dim = attn.kv_heads, attn.head_dim
        self.attention: Optional[TorchAttention] = None

    def _initial_expert_map(self) -> Optional[ExpertMap]:
        moe = self.spec.moe
        if moe is None:
            return None
        physical = num_physical_experts(
            moe.num_experts, self.config.eplb.num_redundant_experts, self.ctx.groups.ep.world_size
        )
        placement = default_placement(len(self.spec.moe_layers), moe.num_experts, physical)
        return ExpertMap(placement, moe.num_experts, self.device)

    def kv_block_bytes(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return self.spec.num_layers * 2 * self.block_size * self.kv_heads * self.head_dim * elem

    def max_kv_blocks(self) -> int:
        """How many KV blocks this rank can hold (the controller allocates the minimum over ranks)."""
        if self.config.engine.num_kv_blocks is not None:
            return self.config.engine.num_kv_blocks
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            budget = int(total * self.config.engine.kv_memory_fraction) - used
            return max(0, budget // self.kv_block_bytes())
        wanted = self.config.engine.max_num_seqs * -(-self.max_model_len // self.block_size)
        return max(1, min(wanted, CPU_KV_BUDGET_BYTES // self.kv_block_bytes()))

    def allocate_kv_cache(self, num_blocks: int) -> None:
        shape = (self.spec.num_layers, num_blocks, 2, self.block_size, self.kv_heads, self.head_dim)
        kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.attention = TorchAttention(kv_cache, self.block_size)

    @torch.inference_mode()
    def execute(self, step: StepInput) -> Optional[StepOutput]:
        assert self.attention is not None, "allocate_kv_cache() first"
        layout = build_step_layout(step.chunks, self.block_size)
        self.attention.plan(layout)
        dev = self.device
        batch = ForwardBatch(
            input_ids=layout.input_ids.to(dev),
            positions=layout.positions.to(dev),
            attention=self.attention,
            dp_token_counts=step.dp_token_counts,
        )
        hidden = self.model(batch)
        logits = self.model.compute_logits(hidden[layout.sample_rows.to(dev)])
        if not self.is_driver:
            return None
        chunks = [step.chunks[i] for i in layout.sample_chunks]
        tokens = sample(
            logits,
            [c.sampling for c in chunks],
            [c.seed for c in chunks],
            [c.num_output_tokens for c in chunks],
        )
        return StepOutput(
            sampled={c.request_id: t for c, t in zip(chunks, tokens)},
            logits=logits.cpu() if step.return_logits else None,
        )
