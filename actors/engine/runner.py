"""ModelRunner: the one place that builds device tensors. Lives inside a rank actor.

It builds this rank's shard of the model, loads its slices of the checkpoint,
owns the KV cache, the attention backend and the decode CUDA graphs, and runs
one step: forward, logits of the rows that sample, sampling (on the first rank
of the DP replica's attention group, the one that reports to the controller).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Optional

import torch
import torch.nn.functional as F

from raymoe.actors.engine.attention_backend import make_attention, resolve_kv_cache_dtype
from raymoe.actors.engine.attention_torch import TorchAttention
from raymoe.actors.engine.context_split import ContextSplit, context_split
from raymoe.actors.engine.expert_load import ExpertLoadRecorder
from raymoe.actors.engine.expert_mover import ExpertMover
from raymoe.actors.engine.grammar import GrammarMasks
from raymoe.actors.engine.kv_cache_size import kv_block_bytes, max_kv_blocks, mixed_graph_tokens
from raymoe.actors.engine.logprobs import token_logprobs
from raymoe.actors.engine.pending_outputs import PendingOutputs
from raymoe.actors.engine.rank_context import RankContext
from raymoe.actors.engine.sampler import sample_step, sampled_logprobs
from raymoe.actors.engine.step import (
    StepInput,
    StepLayout,
    StepOutput,
    build_step_layout,
    resolve_pending_tokens,
    warmup_step,
    warmup_token_counts,
)
from raymoe.actors.engine.upload import to_device
from raymoe.actors.models.batch import ForwardBatch, TokenSplit
from raymoe.actors.models.checkpoint import CheckpointReader
from raymoe.actors.models.decoder import CausalLM
from raymoe.actors.models.expert_map import ExpertMap
from raymoe.actors.models.fp8 import resolve_fp8_block
from raymoe.actors.models.random_weights import init_random_weights
from raymoe.actors.models.spec import ModelSpec, resolve_dtype
from raymoe.cluster.config import Config
from raymoe.cluster.expert_slots import default_expert_slots, num_physical_experts

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self, ctx: RankContext, config: Config, spec: ModelSpec, *, max_model_len: int, checkpoint_dir: Optional[str]
    ) -> None:
        """``checkpoint_dir`` is read unless ``model.load_format`` is dummy (random weights)."""
        self.ctx, self.config, self.spec, self.device = ctx, config, spec, ctx.device
        self.dtype = resolve_dtype(config.model.dtype, spec, self.device)
        self.kv_dtype = resolve_kv_cache_dtype(config.engine.kv_cache_dtype, self.dtype, latent=spec.mla is not None)
        self.max_model_len = max_model_len
        self.block_size = config.engine.block_size
        # with context parallelism each rank holds 1/cp of every block (attention_torch.py)
        self.block_slots = self.block_size // ctx.groups.cp.world_size
        self.is_driver = ctx.groups.attn.rank_in_group == 0
        self.expert_map = self._initial_expert_map()
        t0 = time.perf_counter()
        self.fp8_block = resolve_fp8_block(
            config.model.quantization, spec.fp8_block, self.device.type == "cuda", spec.fp8_unconverted
        )
        self.model = CausalLM(
            spec,
            ctx.groups,
            self.expert_map,
            dtype=self.dtype,
            device=self.device,
            router_skew=config.eplb.router_skew,
            fp8_block=self.fp8_block,
        )
        if config.model.load_format == "dummy":
            init_random_weights(self.model, seed=config.model.seed + ctx.rank)
        else:
            assert checkpoint_dir is not None, "model.load_format auto reads a checkpoint"
            reader = CheckpointReader(checkpoint_dir, fp8_block=spec.fp8_block)
            unused = self.model.load(reader, show_progress=ctx.rank == 0)
            reader.close()
            if unused and ctx.rank == 0:
                shown = ", ".join(unused[:8]) + (", ..." if len(unused) > 8 else "")
                log.warning("%d checkpoint tensors not used (transformers ignores them too): %s", len(unused), shown)
        what = "random weights" if config.model.load_format == "dummy" else checkpoint_dir
        kept = f"FP8 with {self.fp8_block[0]} x {self.fp8_block[1]} block scales" if self.fp8_block else str(self.dtype)
        log.info("rank %d built %s (projections in %s) in %.1f s", ctx.rank, what, kept, time.perf_counter() - t0)
        self.attention: Any = None
        self.graphs: Any = None
        self.mixed_graphs: Any = None
        # the last two steps' sampled tokens, each in its half (StepInput.sample_slot): where a
        # step's pending input tokens come from (StepInput.prev_rows)
        self.slot_rows = config.engine.max_num_seqs
        self.recent_sampled = torch.zeros(2 * self.slot_rows, dtype=torch.int64, device=self.device)
        self._in_flight = PendingOutputs()  # launched, not yet collected
        self._awaiting_grammar: Optional[tuple] = None  # a grammar_late step's (step, logits, outputs so far)
        # expert load is recorded whenever EPLB is on (inside the CUDA graphs too)
        self.expert_load = (
            ExpertLoadRecorder(len(spec.moe_layers), self.expert_map.num_physical, self.device)
            if config.eplb.enabled and self.expert_map is not None
            else None
        )
        self._expert_mover = self._new_expert_mover()

    def _initial_expert_map(self) -> Optional[ExpertMap]:
        moe = self.spec.moe
        if moe is None:
            return None
        physical = num_physical_experts(
            moe.num_experts, self.config.eplb.num_redundant_experts, self.ctx.groups.ep.world_size
        )
        physical_to_logical = default_expert_slots(len(self.spec.moe_layers), moe.num_experts, physical)
        return ExpertMap(physical_to_logical, moe.num_experts, self.device)

    def kv_block_bytes(self) -> int:
        return kv_block_bytes(self.model, self.block_slots, self.kv_dtype)

    def max_kv_blocks(self) -> int:
        """How many KV blocks this rank can hold (the controller allocates the minimum over ranks)."""
        return max_kv_blocks(
            self.model,
            self.config.engine,
            device=self.device,
            dtype=self.dtype,
            kv_block_bytes=self.kv_block_bytes(),
            max_model_len=self.max_model_len,
        )

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """KV cache of ``num_blocks`` blocks plus one scratch block (CUDA-graph padding rows write there)."""
        shape = self.model.kv_cache_shape(num_blocks + 1, self.block_slots)
        kv_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        self.scratch_block = num_blocks
        engine = self.config.engine
        self.attention = make_attention(
            engine.attention_backend,
            kv_cache,
            self.block_size,
            self.model,
            q_dtype=self.dtype,
            step_tokens=engine.max_num_batched_tokens,
            max_seqs=engine.max_num_seqs,
            cp=self.ctx.groups.cp,
        )
        self.graphs = self._capture_graphs(scratch_block=num_blocks)
        if self.device.type == "cuda":
            self.compile_step_kernels()
        self.mixed_graphs = self._capture_mixed_graphs()

    def compile_step_kernels(self) -> int:
        """One eager step at each of ``warmup_token_counts`` sizes (up to the step's token
        budget), its KV in the scratch block and its expert load not recorded, so every kernel
        variant a step can pick is compiled before serving rather than mid-run, where a compile
        stalls every request in flight. Every rank runs the same sizes (collectives agree).
        Returns the steps run."""
        assert self.attention is not None, "allocate_kv_cache() first"
        engine = self.config.engine
        # no step holds more than max_num_seqs sequences of at most max_model_len tokens
        most = min(engine.max_num_batched_tokens, engine.max_num_seqs * self.max_model_len)
        counts = warmup_token_counts(most)
        recorder, self.expert_load = self.expert_load, None
        try:
            for n in counts:
                step = warmup_step(
                    n, self.block_size, self.scratch_block, self.ctx.groups.dp.world_size, max_len=self.max_model_len
                )
                self.forward_eager(build_step_layout(step, self.block_size), step.dp_token_counts)
        except Exception as e:
            if self.fp8_block is None:
                raise
            raise RuntimeError(
                f"a warm-up step failed with the weights kept in FP8 ({type(e).__name__}: {e}); if the FP8 "
                "kernels are at fault, model.quantization: none runs the weights dequantised"
            ) from e
        finally:
            self.expert_load = recorder
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return len(counts)

    def _capture_graphs(self, scratch_block: int) -> Any:
        if not self.config.engine.cuda_graphs or self.device.type != "cuda":
            return None
        from raymoe.actors.engine.cuda_graphs import DecodeGraphs, graph_batch_sizes

        if isinstance(self.attention, TorchAttention):
            log.warning("CUDA graphs disabled: they need the FlashInfer attention backend")
            return None
        pages = -(-self.max_model_len // self.block_size)
        return DecodeGraphs(
            lambda batch: self.model.compute_logits(self.run_model(batch)),
            lambda size: self.attention.for_graph(size, max_pages_per_seq=pages, scratch_block=scratch_block),
            sizes=graph_batch_sizes(self.config.engine.max_num_seqs),
            dp=self.ctx.groups.dp.world_size,
            last_sampled=self.recent_sampled,
            expert_load=self.expert_load,
        )

    def _capture_mixed_graphs(self) -> Any:
        """The piecewise graphs of prefill and mixed steps (piecewise_graphs.py), around the
        FlashInfer attention (the torch backend, which context parallelism needs, runs them
        eagerly)."""
        engine = self.config.engine
        if not engine.cuda_graphs or not engine.mixed_step_graph_tokens or self.device.type != "cuda":
            return None
        if isinstance(self.attention, TorchAttention):
            return None
        from raymoe.actors.engine.piecewise_graphs import MixedStepGraphs, mixed_step_buckets

        return MixedStepGraphs(
            self.run_model,
            self.attention,
            sizes=mixed_step_buckets(mixed_graph_tokens(self.config.engine)),
            dp=self.ctx.groups.dp.world_size,
            last_sampled=self.recent_sampled,
            expert_load=self.expert_load,
        )

    def _forward_mixed_graph(
        self, layout: StepLayout, dp_token_counts: tuple[int, ...], prompt_rows: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """forward_eager's result through the piecewise graphs: this rank's logits shard of the
        rows that sample, followed by the rows of ``prompt_rows`` if given."""
        return self._sampled_logits(self.mixed_graphs.run(layout, dp_token_counts), layout, prompt_rows)

    def _sampled_logits(
        self, hidden: torch.Tensor, layout: StepLayout, prompt_rows: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """This rank's logits shard of the step's rows that sample, then of ``prompt_rows``."""
        rows = layout.sample_rows if prompt_rows is None else torch.cat([layout.sample_rows, prompt_rows])
        return self.model.compute_logits(hidden[to_device(rows, self.device)])

    @torch.inference_mode()
    def run_step(
        self, step: Optional[StepInput], keep: int, late_grammar: Optional[GrammarMasks] = None
    ) -> list[Optional[StepOutput]]:
        """One call from the engine: sample the step launched last with ``grammar_late`` now
        that its masks came (``late_grammar``), launch ``step`` (None: no new step), and return
        the outputs of every launched step but the ``keep`` newest, which stay in flight,
        oldest first."""
        if late_grammar is not None:
            self._sample_late(late_grammar)
        if step is not None:
            self.launch(step)
        return self.collect(keep)

    @torch.inference_mode()
    def launch(self, step: StepInput) -> None:
        """Queue one step on the device and return without waiting for it (a step with
        ``grammar_late``: its forward pass; its sampling waits for the masks, ``run_step``).

        Every rank samples (the ranks of a DP replica get identical logits, gathered over
        tp, and draw identically on the same GPU model; when every row is greedy they
        gather only each shard's best token instead), so each keeps the tokens a next
        step's pending inputs come from; the replica's first rank also keeps them for
        ``collect``.
        """
        assert self.attention is not None, "allocate_kv_cache() first"
        assert self._awaiting_grammar is None, "the step before still waits for its grammar masks"
        self.advance_expert_moves()
        layout = build_step_layout(step, self.block_size)
        prompt_rows = None if step.prompt_logprob_rows is None else torch.from_numpy(step.prompt_logprob_rows)
        tokens = max(step.dp_token_counts)
        if self.graphs is not None and step.all_decode and self.graphs.size_for(tokens):
            assert prompt_rows is None, "a decode step has no prompt rows"
            shard = self.graphs.run(layout, step.dp_token_counts)
        elif self.mixed_graphs is not None and self.mixed_graphs.size_for(tokens):
            # every replica of a step takes the same path (their collectives must agree): prompt
            # rows, which only some replicas may have, go through the graphs too
            shard = self._forward_mixed_graph(layout, step.dp_token_counts, prompt_rows)
        else:
            shard = self.forward_eager(layout, step.dp_token_counts, prompt_rows)
        s = step.sample
        out: dict[str, Any] = {}
        plain = step.logprobs is None and step.controls is None and prompt_rows is None
        plain = plain and step.grammar is None and not step.grammar_late
        if plain and not step.return_logits and not (step.temperature[s] > 0).any():
            # all greedy: argmax over the vocabulary shards, no logits gathered over tp
            self._keep(step, out, self.model.greedy_tokens(shard))
            return
        logits = self.model.full_logits(shard)
        if prompt_rows is not None:  # the prompt rows follow the sampled rows
            logits, prompt_logits = logits[: int(s.sum())], logits[int(s.sum()) :]
            targets = to_device(step.prompt_logprob_targets, self.device)
            out["prompt"] = token_logprobs(prompt_logits, targets, step.prompt_logprob_top)
        if step.grammar_late:
            self._awaiting_grammar = (step, logits, out)
        else:
            self._sample(step, logits, out)

    def _sample_late(self, masks: GrammarMasks) -> None:
        assert self._awaiting_grammar is not None, "grammar masks came for no step"
        step, logits, out = self._awaiting_grammar
        self._awaiting_grammar = None
        self._sample(dataclasses.replace(step, grammar=masks, grammar_late=False), logits, out)

    def _sample(self, step: StepInput, logits: torch.Tensor, out: dict[str, Any]) -> None:
        tokens = sample_step(logits, step, self.recent_sampled)
        if step.return_logits:
            out["logits"] = logits
        lps = sampled_logprobs(logits, tokens, step)
        if lps is not None:
            out["sampled"] = lps
        self._keep(step, out, tokens)

    def _keep(self, step: StepInput, out: dict[str, Any], tokens: torch.Tensor) -> None:
        """The step's sampled ``tokens`` go to its half of the recent sampled tokens; the first
        rank of the replica queues its outputs' copy to the host."""
        out["tokens"] = tokens
        first = step.sample_slot * self.slot_rows
        self.recent_sampled[first : first + tokens.shape[0]].copy_(tokens)
        self._in_flight.push(out if self.is_driver else None)

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight) + (self._awaiting_grammar is not None)

    def collect(self, keep: int) -> list[Optional[StepOutput]]:
        """Wait for the launched steps but the ``keep`` newest, oldest first; their outputs,
        or None on ranks that do not report. A step waiting for its grammar masks is the
        newest and must be kept."""
        keep -= self._awaiting_grammar is not None
        assert keep >= 0, "a step waiting for its grammar masks cannot complete"
        return self._in_flight.collect(keep)

    def forward_eager(
        self, layout: StepLayout, dp_token_counts: tuple[int, ...], prompt_rows: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Forward without graphs; returns this rank's logits shard [sampled rows, its
        vocabulary share], followed by the rows of ``prompt_rows`` (token rows) if given."""
        dev = self.device
        self.attention.plan(layout)
        input_ids = to_device(layout.input_ids, dev)
        if bool((layout.prev_rows >= 0).any()):
            input_ids = resolve_pending_tokens(input_ids, to_device(layout.prev_rows, dev), self.recent_sampled)
        positions = to_device(layout.positions, dev)
        cp = self.ctx.groups.cp
        split = context_split(layout.positions.numpy(), cp.world_size, cp.rank_in_group) if cp.world_size > 1 else None
        if split is not None:  # this rank runs its own rows (context_split.py)
            own = to_device(split.own, dev)
            input_ids, positions = input_ids[own], positions[own]
        batch = ForwardBatch(
            input_ids=input_ids,
            positions=positions,
            attention=self.attention,
            dp_pad=max(dp_token_counts, default=0),
            dp_counts=to_device(dp_token_counts, dev) if self.ctx.groups.dp.world_size > 1 else None,
            expert_load=self.expert_load,
            split=None if split is None else self._token_split(split),
        )
        hidden = self.run_model(batch)
        if split is not None:  # every row of the step, for the rows that sample
            gathered = cp.all_gather(F.pad(hidden, (0, 0, 0, split.pad - hidden.shape[0])))
            hidden = gathered[to_device(split.gathered_row, dev)]
        return self._sampled_logits(hidden, layout, prompt_rows)

    def _token_split(self, split: ContextSplit) -> TokenSplit:
        """The MoE's view of this rank's rows: with dp > 1 the replicas agree on their padding
        and exchange which of their rows are real (two small collectives over dp)."""
        dev, dp, cp = self.device, self.ctx.groups.dp, self.ctx.groups.cp
        valid = torch.from_numpy(split.valid()).to(dev)
        replica_rows = cp.world_size * split.pad
        if dp.world_size > 1:
            replica_rows = int(dp.all_gather(torch.tensor([replica_rows], device=dev)).max())
            valid = dp.all_gather(F.pad(valid.to(torch.uint8), (0, replica_rows - valid.shape[0]))).bool()
        start = cp.rank_in_group * split.pad
        return TokenSplit(pad=split.pad, start=start, rows=split.rows, replica_rows=replica_rows, valid=valid)

    def run_model(self, batch: ForwardBatch) -> torch.Tensor:
        """One forward pass of the model -> final hidden states [T, H]. Every pass, eager or
        captured in a CUDA graph, runs here and ends the groups' pass (Groups.finish_pass),
        so the next pass, or replay, starts as the sums before norms expect."""
        hidden = self.model(batch)
        self.ctx.groups.finish_pass()
        return hidden

    # ---- expert-parallel load balancing ------------------------------------------

    def take_expert_load(self) -> torch.Tensor:
        """Tokens routed to each physical expert since the last call [moe_layers, P] (CPU), then reset."""
        assert self.expert_load is not None, "eplb.enabled is off"
        return self.expert_load.take().cpu()

    def physical_to_logical(self) -> torch.Tensor:
        assert self.expert_map is not None
        return self.expert_map.physical_to_logical_cpu.clone()

    def expert_mover(self) -> ExpertMover:
        assert self._expert_mover is not None, "eplb.enabled is off"
        return self._expert_mover

    @torch.inference_mode()
    def advance_expert_moves(self) -> None:
        """Switch the expert-move chunk under way once it has landed on every rank (every
        rank calls this at the start of every step, or all together while idle)."""
        if self._expert_mover is not None:
            self._expert_mover.advance()

    def _new_expert_mover(self) -> Optional[ExpertMover]:
        if self.expert_load is None or self.expert_map is None:
            return None
        moe_layers = [self.model.layers[i].mlp for i in self.spec.moe_layers]
        layout, ep = self.ctx.layout, self.ctx.groups.ep.world_size
        return ExpertMover(
            moves_group=self.ctx.groups.ep_moves or self.ctx.groups.ep,
            agreement_group=self.ctx.groups.world,
            expert_map=self.expert_map,
            layer_weights=[moe.expert_tensors() for moe in moe_layers],
            slots_per_rank=moe_layers[0].slots,
            ranks_per_node=ep // layout.nodes if layout.nodes > 1 and ep % layout.nodes == 0 else None,
        )
