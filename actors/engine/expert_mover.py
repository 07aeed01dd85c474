"""A rank's side of EPLB's weight moves, running while the engine's steps go on.

``start`` takes a rebalance's chunks of layers. Each chunk's copies travel in a
background thread (on GPU, on a side CUDA stream) over the EP moves group, a process
group of its own, so they never interleave with the steps' collectives on the EP
group; they land in buffers while steps keep reading the old slots. At the start of
every step, ``advance`` asks every rank (one all-reduce over the world's cpu group)
whether the chunk has landed everywhere. Once it has, every rank writes it into its
expert tensors and switches the chunk's layer maps before that same step, in place
(CUDA graphs stay valid) and queued on the step stream behind any step in flight;
then the next chunk starts travelling. The agreement spans the world, not one EP
group: every rank runs every MoE layer, so all must switch a layer at the same step.
"""

from __future__ import annotations

import collections
import concurrent.futures
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from raymoe.actors.models.expert_map import ExpertMap, LayerTables
from raymoe.cluster.expert_moves import plan_layer_moves
from raymoe.comm.expert_transfer import ExpertArrival, receive_expert_copies, write_arrivals
from raymoe.comm.group import GroupCoordinator


@dataclass(frozen=True)
class MoveChunk:
    moe_layers: list[int]
    physical_to_logical: torch.Tensor  # the layers' new slot rows [len, P], CPU


@dataclass(frozen=True)
class _LandedLayer:
    moe_layer: int
    tables: LayerTables  # the layer's new expert map
    arrivals: list[ExpertArrival]


class ExpertMover:
    def __init__(
        self,
        *,
        moves_group: GroupCoordinator,
        agreement_group: GroupCoordinator,
        expert_map: ExpertMap,
        layer_weights: Sequence[Sequence[torch.Tensor]],
        slots_per_rank: int,
        ranks_per_node: Optional[int],
    ) -> None:
        """``moves_group``: the EP moves group; ``agreement_group``: every rank that runs the
        MoE layers (the world); ``layer_weights[moe_layer]``: that layer's expert tensors on
        this rank, each [slots_per_rank, ...]; ``ranks_per_node``: EP ranks per node (None:
        one node), so that copies come from the same node where they can."""
        self.moves_group, self.agreement_group, self.expert_map = moves_group, agreement_group, expert_map
        self.layer_weights, self.slots_per_rank, self.ranks_per_node = layer_weights, slots_per_rank, ranks_per_node
        self.device = moves_group.device
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="expert-moves")
        self._chunks: collections.deque[MoveChunk] = collections.deque()
        self._travelling: Optional[concurrent.futures.Future[list[_LandedLayer]]] = None
        self.layers_done = 0  # layers switched since the last start

    def start(self, chunks: Sequence[MoveChunk]) -> None:
        """Queue a rebalance's chunks and send the first one on its way. Every rank calls it
        between the same two steps."""
        if self.busy:
            raise RuntimeError("expert moves are already under way")
        self._chunks.extend(chunks)
        self.layers_done = 0
        self._send_next()

    @property
    def busy(self) -> bool:
        return self._travelling is not None

    def advance(self) -> None:
        """At the start of every step, on every rank: switch the chunk under way if it has
        landed on every rank, then send the next one."""
        if self._travelling is None:
            return
        if not self.agreement_group.all_true(self._travelling.done()):
            return
        travelling, self._travelling = self._travelling, None
        step_stream = torch.cuda.current_stream(self.device) if self.stream is not None else None
        for layer in travelling.result():
            write_arrivals(self.layer_weights[layer.moe_layer], layer.arrivals)
            self.expert_map.update_layer(layer.moe_layer, layer.tables)
            if step_stream is not None:  # side-stream memory: free it only after these copies
                for t in [b for a in layer.arrivals for b in a.buffers] + list(layer.tables.device_tensors()):
                    t.record_stream(step_stream)
            self.layers_done += 1
        self._send_next()

    def _send_next(self) -> None:
        if not self._chunks:
            return
        chunk = self._chunks.popleft()
        after: Optional[torch.cuda.Event] = None
        if self.stream is not None:  # the side stream reads weights only once the steps queued so far have
            after = torch.cuda.Event()
            after.record(torch.cuda.current_stream(self.device))
        self._travelling = self._thread.submit(self._receive, chunk, after)

    @torch.inference_mode()
    def _receive(self, chunk: MoveChunk, after: Optional[torch.cuda.Event]) -> list[_LandedLayer]:
        layers = list(zip(chunk.moe_layers, chunk.physical_to_logical))
        if self.stream is None:
            return [self._receive_layer(layer, row) for layer, row in layers]
        torch.cuda.set_device(self.device)
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(after)
            landed = [self._receive_layer(layer, row) for layer, row in layers]
        self.stream.synchronize()
        return landed

    def _receive_layer(self, moe_layer: int, row: torch.Tensor) -> _LandedLayer:
        moves = plan_layer_moves(
            self.expert_map.physical_to_logical_cpu[moe_layer].tolist(),
            row.tolist(),
            self.moves_group.world_size,
            ranks_per_node=self.ranks_per_node,
        )
        arrivals = receive_expert_copies(self.moves_group, self.layer_weights[moe_layer], moves, self.slots_per_rank)
        return _LandedLayer(moe_layer, self.expert_map.layer_tables(row), arrivals)
