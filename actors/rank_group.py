"""Bring up the rank actors of one layout: placement group, actors, torch.distributed.

Used by the controller actor. Fails within a bounded time, saying what the
cluster lacks, when Ray cannot place the layout.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raymoe.actors.rank import RankWorker
from raymoe.cluster.config import ParallelConfig
from raymoe.cluster.layout import RankLayout
from raymoe.cluster.placement import (
    ActorLocation,
    ClusterCapacityError,
    PlacementPlan,
    assign_ranks,
    describe_shortfall,
    plan_placement,
)

log = logging.getLogger(__name__)

# GPU rank processes only (CPU ranks keep Ray's default environment, so Ray can hand
# them its prestarted workers):
# - every GPU of the node visible: symmetric memory and CUDA IPC fail when Ray
#   narrows CUDA_VISIBLE_DEVICES to one GPU per actor;
# - NVLink multicast (NVLS) off: raymoe never uses it, and on shared hosts a
#   multicast object can take GPUs out of service.
GPU_RANK_ENV = {
    "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1",
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


@dataclass(kw_only=True)
class RankGroup:
    layout: RankLayout
    device: str
    placement_group: Any
    actors: list[Any]  # Ray actor handles, index = global rank
    infos: list[dict[str, Any]]  # what each rank reported after joining

    def call(
        self,
        method: str,
        *args: Any,
        ranks: Sequence[int] | None = None,
        timeout_s: float | None = None,
        **kwargs: Any,
    ) -> list[Any]:
        """Call ``method`` on the given ranks (default: all) at once; results in rank order.
        With ``timeout_s``: the first rank's error raises at once, and TimeoutError when some
        have not answered within it (hung)."""
        refs = self.call_async(method, *args, ranks=ranks, **kwargs)
        return ray.get(refs) if timeout_s is None else _wait_all(refs, timeout_s, method)

    def call_async(self, method: str, *args: Any, ranks: Sequence[int] | None = None, **kwargs: Any) -> list[Any]:
        targets = range(len(self.actors)) if ranks is None else ranks
        return [getattr(self.actors[r], method).remote(*args, **kwargs) for r in targets]

    def kill(self) -> None:
        """Kill every rank at once (some may be dead or hung in a collective) and free the
        placement group."""
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception as e:  # already gone
                log.warning("killing a rank: %r", e)
        remove_placement_group(self.placement_group)

    def shutdown(self) -> None:
        try:
            ray.get([a.shutdown.remote() for a in self.actors], timeout=30)
        except Exception as e:  # a dead rank cannot shut down; killing it below is enough
            log.warning("rank shutdown: %s", e)
        for a in self.actors:
            ray.kill(a)
        remove_placement_group(self.placement_group)


def start_rank_group(
    layout: RankLayout, parallel: ParallelConfig, *, name: str = "", expert_moves: bool = False
) -> RankGroup:
    """``name``: the placement group's, so that whoever outlives the controller can free it
    should the controller die (Ray keeps a dead actor's placement groups). ``expert_moves``:
    build the EP moves groups (EPLB on; see comm/groups.py)."""
    device, timeout_s = parallel.device, parallel.placement_timeout_s
    plan = plan_placement(layout, device)
    pg = _reserve(plan, timeout_s, name)
    try:
        actors = _start_actors(layout, device, plan, pg)
        located = [
            ActorLocation(actor_index=i, bundle=layout.coord(i).node, **info)
            for i, info in enumerate(
                _wait_all([a.location.remote() for a in actors], timeout_s, what="rank actor start")
            )
        ]
        order = assign_ranks(layout, located)
        ranked = [actors[p.actor_index] for p in order]
        port = ray.get(ranked[0].free_port.remote())
        init_method = f"tcp://{order[0].ip}:{port}"
        symmetric = parallel.symmetric_memory and device == "cuda"
        refs = [
            a.init_distributed.remote(layout, rank, init_method, symmetric_memory=symmetric, expert_moves=expert_moves)
            for rank, a in enumerate(ranked)
        ]
        infos = _wait_all(refs, timeout_s=max(timeout_s, 120.0), what="torch.distributed init")
    except BaseException:
        remove_placement_group(pg)
        raise
    log.info("rank group up: %s", layout.describe())
    return RankGroup(layout=layout, device=device, placement_group=pg, actors=ranked, infos=infos)


def remove_named_placement_group(name: str) -> None:
    """Free the placement group called ``name``, if there is one."""
    try:
        remove_placement_group(ray.util.get_placement_group(name))
    except ValueError:  # no such group
        pass


def _reserve(plan: PlacementPlan, timeout_s: float, name: str) -> Any:
    pg = placement_group(list(plan.bundles), strategy=plan.strategy, name=name)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        nodes = [
            {"ip": n["NodeManagerAddress"], "resources": n.get("Resources", {})} for n in ray.nodes() if n.get("Alive")
        ]
        raise ClusterCapacityError(
            f"Ray could not place the rank actors within {timeout_s:.0f} s "
            f"(parallel.placement_timeout_s): {describe_shortfall(plan, nodes)}"
        )
    return pg


def _start_actors(layout: RankLayout, device: str, plan: PlacementPlan, pg: Any) -> list[Any]:
    runtime_env = {"env_vars": GPU_RANK_ENV} if device == "cuda" else None
    cls = ray.remote(RankWorker)
    actors = []
    for rank in range(layout.world_size):
        actors.append(
            cls.options(
                num_cpus=plan.num_cpus_per_rank,
                num_gpus=plan.num_gpus_per_rank,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=layout.coord(rank).node
                ),
                runtime_env=runtime_env,
            ).remote(device, int(plan.num_cpus_per_rank))
        )
    return actors


def _wait_all(refs: list[Any], timeout_s: float, what: str) -> list[Any]:
    """ray.get of all refs, but fail fast: the first error raises at once (a rank
    that died leaves the others blocked in a rendezvous), and a hang raises after
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{what}: {len(pending)} of {len(refs)} ranks did not answer within {timeout_s:.0f} s")
        done, pending = ray.wait(pending, num_returns=1, timeout=left)
        for ref in done:
            ray.get(ref)  # raises the rank's error
    return ray.get(refs)
