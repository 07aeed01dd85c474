"""CUDA graphs of the decode step (forward + this rank's logits shard), one per batch size.

A decode step of B sequences replays the graph of the smallest captured size
>= B, with rows past B as padding (token 0, KV written to a scratch block,
outputs ignored). A pending input token (see StepInput.prev_rows) is read from
the previous step's sampled tokens inside the graph. Every rank of the world
captures the same sizes in the same order, so the collectives recorded in the
graphs line up across ranks.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

import torch

from raymoe.actors.engine.step import StepLayout, resolve_pending_tokens
from raymoe.actors.models.batch import ForwardBatch

log = logging.getLogger(__name__)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to 64 and every 32 beyond, capped at max_num_seqs (included)."""
    sizes = [1, 2, 4, 8] + list(range(16, 65, 16)) + list(range(96, 1025, 32))
    return sorted({s for s in sizes if s < max_num_seqs} | {max_num_seqs})


class StaticStepInputs:
    """A captured step size's inputs: rows of one device buffer (token ids, positions, pending
    rows, then each replica's token count), filled from one pinned host buffer by a single copy
    per step."""

    ROWS = ("input_ids", "positions", "prev_rows")

    def __init__(self, size: int, dp: int, device: torch.device) -> None:
        self.size = size
        self.host = torch.zeros(len(self.ROWS) * size + dp, dtype=torch.int64, pin_memory=True)
        self.device_buffer = torch.zeros_like(self.host, device=device)
        rows = self.device_buffer[: len(self.ROWS) * size].view(len(self.ROWS), size)
        self.input_ids, self.positions, self.prev_rows = rows
        self.dp_counts = self.device_buffer[len(self.ROWS) * size :]

    def load(self, layout: StepLayout | None, dp_token_counts: Sequence[int]) -> None:
        """This step's inputs, padded (token 0 at position 0, no pending token); the
        attention's plan fills the KV write slots."""
        n = 0 if layout is None else int(layout.input_ids.shape[0])
        rows = self.host[: len(self.ROWS) * self.size].view(len(self.ROWS), self.size).numpy()
        rows[:, n:] = 0
        rows[2, n:] = -1
        if n:
            for i, name in enumerate(self.ROWS):
                rows[i, :n] = getattr(layout, name).numpy()
        self.host[len(self.ROWS) * self.size :] = torch.tensor(dp_token_counts)
        self.device_buffer.copy_(self.host, non_blocking=True)  # pinned: truly asynchronous


def stage_step(
    inputs: StaticStepInputs, attention: Any, layout: StepLayout, dp_token_counts: Sequence[int], copied: Any
) -> None:
    """Before a replay: the attention's plan and the step's inputs into their static buffers.
    Both write pinned host buffers that feed copies queued at the step before: ``copied`` (an
    event recorded after those) says they ran (they precede its replay, so this rarely waits)."""
    copied.synchronize()
    attention.plan(layout)
    inputs.load(layout, dp_token_counts)
    copied.record(torch.cuda.current_stream(inputs.device_buffer.device))


class _Graph(StaticStepInputs):
    """One captured decode batch size: its static inputs, graph, attention and logits."""

    def __init__(self, size: int, dp: int, device: torch.device) -> None:
        super().__init__(size, dp, device)
        self.graph = torch.cuda.CUDAGraph()
        self.attention: Any = None  # the attention backend for this size (its plan fills static buffers)
        self.logits: torch.Tensor | None = None


class DecodeGraphs:
    def __init__(
        self,
        forward_logits: Callable[[ForwardBatch], torch.Tensor],
        graph_attention: Callable[[int], Any],
        *,
        sizes: Sequence[int],
        dp: int,
        last_sampled: torch.Tensor,
        expert_load=None,
    ) -> None:
        """``forward_logits``: one whole forward pass (its end included, see
        ModelRunner.run_model) -> this rank's logits shard of every row; captured once per
        size. ``graph_attention``: batch size -> an attention backend for that size whose
        ``plan(layout | None)`` only refills static buffers (e.g. the eager FlashInfer
        backend's ``for_graph``). ``last_sampled``: the runner's buffer of the previous
        step's sampled tokens, where pending input tokens come from (inside the graph)."""
        t0 = time.perf_counter()
        device = last_sampled.device
        self.graphs: dict[int, _Graph] = {}
        self.inputs_copied = torch.cuda.Event()
        pool = None
        for size in sorted(sizes, reverse=True):  # largest first: smaller ones reuse its pool
            g = _Graph(size, dp, device)
            g.attention = graph_attention(size)
            g.attention.plan(None)
            g.load(None, [size] * dp)

            def forward(g=g):
                ids = resolve_pending_tokens(g.input_ids, g.prev_rows, last_sampled)
                batch = ForwardBatch(
                    ids, g.positions, g.attention, dp_pad=g.size, dp_counts=g.dp_counts, expert_load=expert_load
                )
                return forward_logits(batch)

            with torch.inference_mode():
                forward()  # warm-up: lazy init outside capture
                torch.cuda.synchronize(device)
                with torch.cuda.graph(g.graph, pool=pool):
                    g.logits = forward()
            pool = g.graph.pool()
            self.graphs[size] = g
        self.sizes = sorted(self.graphs)
        log.info(
            "captured %d decode CUDA graphs (sizes %s) in %.1f s", len(self.sizes), self.sizes, time.perf_counter() - t0
        )

    def size_for(self, batch: int) -> int | None:
        return next((s for s in self.sizes if s >= batch), None)

    def run(self, layout: StepLayout, dp_token_counts: Sequence[int]) -> torch.Tensor:
        """Replay for this decode step; returns this rank's logits shard [B, its vocabulary
        share] of this replica's B rows (the runner turns shards into tokens)."""
        size = self.size_for(max(dp_token_counts))
        assert size is not None
        g = self.graphs[size]
        stage_step(g, g.attention, layout, dp_token_counts, self.inputs_copied)
        g.graph.replay()
        return g.logits[: layout.num_seqs]
