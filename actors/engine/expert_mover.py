"""A rank's side of EPLB's weight moves, running while the engine's steps go on.

``start`` hands one chunk of layers to a background thread (on GPU, on a side CUDA
stream). It sends and receives the expert copies the new slots need over the EP moves
group, a process group of its own, so its transfers never interleave with the steps'
collectives on the EP group. The copies land in buffers: steps keep reading the old
slots meanwhile. ``landed`` says whether they have all arrived. ``finish``, which the
controller calls on every rank between the same two steps, writes them into the expert
tensors and switches the layers' maps, in place (CUDA graphs stay valid) and queued on
the step stream behind any step in flight.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from raymoe.actors.models.expert_map import ExpertMap
from raymoe.cluster.expert_moves import plan_layer_moves
from raymoe.comm.expert_transfer import ExpertArrival, receive_expert_copies, write_arrivals
from raymoe.comm.group import GroupCoordinator


@dataclass(frozen=True)
class _LandedLayer:
    moe_layer: int
    physical_to_logical: torch.Tensor  # the new slots [P], CPU
    arrivals: list[ExpertArrival]


class ExpertMover:
    def __init__(
        self,
        *,
        group: GroupCoordinator,
        expert_map: ExpertMap,
        layer_weights: Sequence[Sequence[torch.Tensor]],
        slots_per_rank: int,
        ranks_per_node: Optional[int],
    ) -> None:
        """``group``: the EP moves group; ``layer_weights[moe_layer]``: that layer's expert
        tensors on this rank, each [slots_per_rank, ...]; ``ranks_per_node``: EP ranks per
        node (None: one node), so that copies come from the same node where they can."""
        self.group, self.expert_map = group, expert_map
        self.layer_weights, self.slots_per_rank, self.ranks_per_node = layer_weights, slots_per_rank, ranks_per_node
        self.device = group.device
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="expert-moves")
        self._pending: Optional[concurrent.futures.Future[list[_LandedLayer]]] = None

    def start(self, moe_layers: Sequence[int], new_physical_to_logical: torch.Tensor) -> None:
        """Begin moving ``moe_layers`` to the new slot rows [len, P] in the background."""
        if self._pending is not None:
            raise RuntimeError("expert moves are already under way (finish them first)")
        after: Optional[torch.cuda.Event] = None
        if self.stream is not None:  # the side stream reads weights only once the steps queued so far have
            after = torch.cuda.Event()
            after.record(torch.cuda.current_stream(self.device))
        rows = new_physical_to_logical.to("cpu", torch.int64).clone()
        self._pending = self._thread.submit(self._receive, list(moe_layers), rows, after)

    def landed(self) -> bool:
        """Every copy of the moves under way has arrived (or the moves failed: ``finish`` raises)."""
        return self._pending is not None and self._pending.done()

    def finish(self) -> None:
        """Wait for the moves under way, then write them into the slots and switch the maps."""
        if self._pending is None:
            raise RuntimeError("no expert moves under way (start them first)")
        pending, self._pending = self._pending, None
        step_stream = torch.cuda.current_stream(self.device) if self.stream is not None else None
        for layer in pending.result():
            write_arrivals(self.layer_weights[layer.moe_layer], layer.arrivals)
            if step_stream is not None:  # the buffers are the side stream's: free them only after these copies
                for arrival in layer.arrivals:
                    for b in arrival.buffers:
                        b.record_stream(step_stream)
            self.expert_map.update_layer(layer.moe_layer, layer.physical_to_logical)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)

    @torch.inference_mode()
    def _receive(
        self, moe_layers: list[int], rows: torch.Tensor, after: Optional[torch.cuda.Event]
    ) -> list[_LandedLayer]:
        if self.stream is None:
            return [self._receive_layer(layer, row) for layer, row in zip(moe_layers, rows)]
        torch.cuda.set_device(self.device)
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(after)
            landed = [self._receive_layer(layer, row) for layer, row in zip(moe_layers, rows)]
        self.stream.synchronize()
        return landed

    def _receive_layer(self, moe_layer: int, row: torch.Tensor) -> _LandedLayer:
        moves = plan_layer_moves(
            self.expert_map.physical_to_logical_cpu[moe_layer].tolist(),
            row.tolist(),
            self.group.world_size,
        )
        arrivals = receive_expert_copies(self.group, self.layer_weights[moe_layer], moves, self.slots_per_rank)
        return _LandedLayer(moe_layer, row, arrivals)
