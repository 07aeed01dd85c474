"""The rank actor: one process, one GPU (or a CPU slot), one global rank.

``RankWorker`` is a plain class; the controller starts it as a Ray actor with
``ray.remote(RankWorker)``. It stays a thin shell: it joins torch.distributed,
holds the rank's ``RankContext`` and hands work to code that takes the context
as an argument.
"""

from __future__ import annotations

import os
import pickle
import socket
from typing import Any, Callable, Optional

import ray
import torch

from raymoe.actors.engine.rank_context import RankContext
from raymoe.actors.engine.runner import ModelRunner
from raymoe.actors.models.spec import load_spec
from raymoe.cluster.layout import RankLayout
from raymoe.comm.groups import build_groups, destroy_distributed, init_distributed


def torch_device_for(gpu_ids: list[int], visible: Optional[str]) -> torch.device:
    """The CUDA device for a Ray-assigned GPU id, with every GPU of the node visible.

    Rank actors run with RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1 (symmetric
    memory and CUDA IPC need to see all GPUs of the node), so a Ray GPU id indexes
    the node's GPUs -- or, when the node itself was started with
    CUDA_VISIBLE_DEVICES set, the position of that id in it.
    """
    if not gpu_ids:
        return torch.device("cpu")
    assert len(gpu_ids) == 1, f"a rank owns exactly one GPU, Ray gave {gpu_ids}"
    gpu = int(gpu_ids[0])
    if visible:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if str(gpu) in ids:
            return torch.device("cuda", ids.index(str(gpu)))
    return torch.device("cuda", gpu)


class RankWorker:
    def __init__(self, device_kind: str, cpu_threads: int = 1) -> None:
        self.device_kind = device_kind
        if device_kind == "cpu":
            # one rank per logical CPU the placement group reserved: no oversubscription
            torch.set_num_threads(cpu_threads)
        self.ctx: Optional[RankContext] = None

    # ---- bring-up -------------------------------------------------------------

    def location(self) -> dict[str, Any]:
        """Where Ray put this actor: node id, IP and GPU ids."""
        rt = ray.get_runtime_context()
        gpu_ids = [int(g) for g in ray.get_gpu_ids()] if self.device_kind == "cuda" else []
        return {"node_id": rt.get_node_id(), "ip": ray.util.get_node_ip_address(), "gpu_ids": tuple(gpu_ids)}

    def free_port(self) -> int:
        """A TCP port free on this node now (for the torch.distributed rendezvous)."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def init_distributed(
        self, layout: RankLayout, rank: int, init_method: str, *, symmetric_memory: bool, expert_moves: bool
    ) -> dict[str, Any]:
        location = self.location()
        device = torch_device_for(list(location["gpu_ids"]), os.environ.get("CUDA_VISIBLE_DEVICES"))
        init_distributed(rank, layout.world_size, init_method, device)
        groups = build_groups(
            layout,
            rank,
            device,
            node_id=location["node_id"],
            symmetric_memory=symmetric_memory,
            expert_moves=expert_moves,
        )
        self.ctx = RankContext(layout=layout, coord=layout.coord(rank), device=device, groups=groups)
        return {"rank": rank, "device": str(device), **location}

    # ---- engine -----------------------------------------------------------------

    def load_model(self, config: Any, checkpoint_dir: str, max_model_len: int) -> int:
        """Build and load this rank's model shard; returns how many KV blocks it could hold."""
        spec = load_spec(checkpoint_dir)
        runner = ModelRunner(self._context(), config, spec, max_model_len=max_model_len, checkpoint_dir=checkpoint_dir)
        self._context().state["runner"] = runner
        return runner.max_kv_blocks()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self._runner().allocate_kv_cache(num_blocks)

    def run_step(self, step: Optional[bytes], keep: int = 0, late_grammar: Optional[bytes] = None) -> bytes:
        """``ModelRunner.run_step`` for pickled arguments: a StepInput (None: no new step),
        the grammar masks of the step launched last if it waits for them (pickled
        GrammarMasks), and the pickled list of outputs back. Pickled bytes: see RayStepExecutor."""
        outputs = self._runner().run_step(
            None if step is None else pickle.loads(step),
            keep,
            None if late_grammar is None else pickle.loads(late_grammar),
        )
        return pickle.dumps(outputs, protocol=pickle.HIGHEST_PROTOCOL)

    def take_expert_load(self) -> Any:
        return self._runner().take_expert_load()

    def physical_to_logical(self) -> Any:
        return self._runner().physical_to_logical()

    def start_expert_moves(self, chunks: list[Any]) -> None:
        self._runner().expert_mover().start(chunks)

    def advance_expert_moves(self) -> None:
        """While no step runs (a step's start does this itself): see ExpertMover.advance."""
        self._runner().advance_expert_moves()

    def expert_moves_progress(self) -> tuple[int, bool]:
        """(layers switched since the last start, moves still under way)."""
        mover = self._runner().expert_mover()
        return mover.layers_done, mover.busy

    def _runner(self) -> Any:
        runner = self._context().state.get("runner")
        if runner is None:
            raise RuntimeError("no model loaded on this rank (load_model)")
        return runner

    # ---- coordination and extension --------------------------------------------

    def barrier(self, group: str = "world") -> None:
        self._context().groups[group].barrier()

    def run_on_rank(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(ctx, *args, **kwargs)`` on this rank (tests, benchmarks, tools)."""
        return fn(self._context(), *args, **kwargs)

    def health(self) -> dict[str, Any]:
        ctx = self._context()
        info: dict[str, Any] = {"rank": ctx.rank, "device": str(ctx.device), "pid": os.getpid()}
        if ctx.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(ctx.device)
            info["gpu_free_gib"] = round(free / 2**30, 2)
            info["gpu_total_gib"] = round(total / 2**30, 2)
        return info

    def shutdown(self) -> None:
        self.ctx = None
        destroy_distributed()

    def _context(self) -> RankContext:
        if self.ctx is None:
            raise RuntimeError("rank actor has not joined torch.distributed yet (init_distributed)")
        return self.ctx
