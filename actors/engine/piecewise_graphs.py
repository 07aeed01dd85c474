"""CUDA graphs of the steps the decode graphs do not take (prefill, and prefill mixed with
decode rows), captured in pieces cut at each layer's attention.

An eager step pays the host's Python for every kernel it launches, about 0.7 ms a layer
whatever its size, so small and mid-sized prefills wait on the host, not the device
(BENCHMARKS.md, issue 20). A graph replays without that. Attention cannot sit inside a
graph here: its plan (FlashInfer's work split over the step's sequences) changes with
every step. So each forward is captured as L + 1 pieces; between piece i and i + 1 the
step's eager attention for layer i runs on static buffers: the pieces leave the query,
key and value in them and read its output from one.

One set of pieces per token bucket (``mixed_step_buckets``). A step of T tokens replays the
smallest bucket >= T; its rows past T are padding (token 0 at position 0): the attention
sees only the first T rows, and the padding rows' outputs are never read. Every rank of the
world captures the same buckets in the same order, so the collectives the pieces hold line
up, and every rank of a step picks the same bucket (from the largest replica's count).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional, Sequence

import torch

from raymoe.actors.engine.cuda_graphs import StaticStepInputs, stage_step
from raymoe.actors.engine.step import StepLayout, resolve_pending_tokens
from raymoe.actors.models.batch import ForwardBatch, LatentPair

log = logging.getLogger(__name__)


def mixed_step_buckets(max_tokens: int) -> list[int]:
    """Token counts to capture, up to ``max_tokens`` (included): powers of two from 16 to 512,
    then every 256 to 2048 and every 512 beyond. Small steps are host-bound, so padding them
    costs little; past 512 a step pads by at most half (at most a quarter past 1024)."""
    sizes = [16, 32, 64, 128, 256] + list(range(512, 2048, 256)) + list(range(2048, max_tokens + 1, 512))
    return sorted({s for s in sizes if s < max_tokens} | {max_tokens}) if max_tokens > 0 else []


class _Pieces:
    """One forward captured as a list of graphs, cut where the forward calls ``cut``; each
    cut leaves a gap, a callable the replay runs between the pieces around it."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.gaps: list[Callable[[], None]] = []

    def begin(self) -> None:
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=self.pool)
        self.graphs.append(graph)

    def cut(self, gap: Callable[[], None]) -> None:
        self.graphs[-1].capture_end()
        self.gaps.append(gap)
        self.begin()

    def end(self) -> None:
        self.graphs[-1].capture_end()

    def abandon(self) -> None:
        """After a failure mid-capture: end the capture still open, so the stream leaves
        capture mode and the original error is the one that surfaces."""
        try:
            self.graphs[-1].capture_end()
        except Exception:  # the capture had ended, or cannot end cleanly: nothing more to undo
            pass
        self.graphs.clear()

    def replay(self) -> None:
        for graph, gap in zip(self.graphs, self.gaps):
            graph.replay()
            gap()
        self.graphs[-1].replay()


class _AttentionCut:
    """The attention a captured forward sees. It copies the attention's inputs into static
    buffers, cuts the capture there (when capturing) and returns a static output; at replay
    the gap runs the step's eager attention from and into those buffers. The buffers are
    allocated outside the graphs' pool, at the warm-up of the largest bucket, and shared by
    every bucket (one step runs at a time)."""

    def __init__(self, eager: Any) -> None:
        self.eager = eager
        self.buffers: dict[str, torch.Tensor] = {}
        self.pieces: Optional[_Pieces] = None  # set while capturing
        self.tokens = 0  # this replica's real rows in the step being replayed

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self._stage(q=q, k=k, v=v)
        return self._cut(lambda: self._attend(layer), like=q)

    def forward_latent(self, layer: int, q: LatentPair, kv: LatentPair) -> torch.Tensor:
        """Latent attention (MLA): the output is [T, heads, latent], shaped as the query's latent."""
        self._stage(q_latent=q.latent, q_rope=q.rope, kv_latent=kv.latent, k_rope=kv.rope)
        return self._cut(lambda: self._attend_latent(layer), like=q.latent)

    def _static(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The first len(like) rows of the buffer ``name``; zeros at first (the warm-up reads them)."""
        if name not in self.buffers:
            self.buffers[name] = torch.zeros(like.shape, dtype=like.dtype, device=like.device)
        return self.buffers[name][: like.shape[0]]

    def _stage(self, **inputs: torch.Tensor) -> None:
        for name, t in inputs.items():
            self._static(name, t).copy_(t)

    def _cut(self, gap: Callable[[], None], like: torch.Tensor) -> torch.Tensor:
        if self.pieces is not None:
            self.pieces.cut(gap)
        return self._static("out", like)

    def _attend(self, layer: int) -> None:
        n, b = self.tokens, self.buffers
        self._into_out(self.eager.forward(layer, b["q"][:n], b["k"][:n], b["v"][:n], out=b["out"][:n]))

    def _attend_latent(self, layer: int) -> None:
        n, b = self.tokens, self.buffers
        q = LatentPair(b["q_latent"][:n], b["q_rope"][:n])
        kv = LatentPair(b["kv_latent"][:n], b["k_rope"][:n])
        self._into_out(self.eager.forward_latent(layer, q, kv, out=b["out"][:n]))

    def _into_out(self, result: torch.Tensor) -> None:
        """The backends write into ``out=``; one that answered a tensor of its own is copied."""
        out = self.buffers["out"]
        if result.shape[0] and result.data_ptr() != out.data_ptr():
            out[: result.shape[0]].copy_(result)


class _Bucket(StaticStepInputs):
    """One captured token count: its static inputs and its pieces."""

    def __init__(self, size: int, dp: int, device: torch.device) -> None:
        super().__init__(size, dp, device)
        self.pieces: Optional[_Pieces] = None


class MixedStepGraphs:
    def __init__(
        self,
        run_model: Callable[[ForwardBatch], torch.Tensor],
        attention: Any,
        *,
        sizes: Sequence[int],
        dp: int,
        last_sampled: torch.Tensor,
        expert_load=None,
    ) -> None:
        """``run_model``: one whole forward pass (its end included, see ModelRunner.run_model)
        -> final hidden states of every row. ``attention``: the eager attention backend, whose
        ``plan(layout)`` the caller runs before ``run`` and whose ``forward`` takes ``out=``.
        ``last_sampled``: where pending input tokens come from (inside the pieces)."""
        t0 = time.perf_counter()
        device = last_sampled.device
        self.attention = attention
        self.cut = _AttentionCut(attention)
        self.buckets: dict[int, _Bucket] = {}
        self.inputs_copied = torch.cuda.Event()
        # the last piece leaves the final hidden states here (outside the graphs' pool, shared
        # by the buckets): no bucket keeps memory of its own past its capture
        self.hidden: Optional[torch.Tensor] = None
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device)
        for size in sorted(sizes, reverse=True):  # largest first: its warm-up sizes the buffers
            bucket = _Bucket(size, dp, device)
            bucket.load(None, [size] * dp)

            def forward(b=bucket) -> None:
                ids = resolve_pending_tokens(b.input_ids, b.prev_rows, last_sampled)
                batch = ForwardBatch(
                    ids, b.positions, self.cut, dp_pad=b.size, dp_counts=b.dp_counts, expert_load=expert_load
                )
                hidden = run_model(batch)
                if self.hidden is None:
                    self.hidden = torch.zeros_like(hidden)
                self.hidden[: b.size].copy_(hidden)

            with torch.inference_mode():
                forward()  # warm-up: lazy init and kernel compiles outside the capture
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()  # the warm-up's cached blocks: a capture cannot release them
                stream.wait_stream(torch.cuda.current_stream(device))
                bucket.pieces = self.cut.pieces = _Pieces(pool)
                try:
                    with torch.cuda.stream(stream):
                        bucket.pieces.begin()
                        forward()
                        bucket.pieces.end()
                except Exception as e:
                    bucket.pieces.abandon()
                    raise RuntimeError(
                        f"capturing the piecewise CUDA graphs of {size}-token steps failed ({type(e).__name__}: "
                        f"{e}); engine.mixed_step_graph_tokens: 0 runs such steps eagerly"
                    ) from e
                finally:
                    self.cut.pieces = None
                torch.cuda.current_stream(device).wait_stream(stream)
            self.buckets[size] = bucket
        if expert_load is not None:
            expert_load.take()  # what the warm-ups recorded is no one's load
        self.sizes = sorted(self.buckets)
        log.info(
            "captured %d mixed-step CUDA graphs (token counts %s, %d pieces each) in %.1f s",
            len(self.sizes),
            self.sizes,
            len(self.buckets[self.sizes[-1]].pieces.graphs) if self.sizes else 0,
            time.perf_counter() - t0,
        )

    def size_for(self, tokens: int) -> int | None:
        return next((s for s in self.sizes if s >= tokens), None)

    def run(self, layout: StepLayout, dp_token_counts: Sequence[int]) -> torch.Tensor:
        """Replay for this step; returns the final hidden states of this replica's rows [T, H]."""
        size = self.size_for(max(dp_token_counts))
        assert size is not None
        bucket = self.buckets[size]
        stage_step(bucket, self.attention, layout, dp_token_counts, self.inputs_copied)
        self.cut.tokens = int(layout.input_ids.shape[0])
        bucket.pieces.replay()
        assert self.hidden is not None
        return self.hidden[: self.cut.tokens]
