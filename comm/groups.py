"""Initialise torch.distributed in one rank and build every group of the layout.

Every rank calls ``build_groups`` with the same layout; groups are created in
one global order (kind by kind, group by group, device group then cpu group),
which torch.distributed requires of every rank, member or not.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from raymoe.cluster.layout import GROUP_KINDS, RankLayout
from raymoe.comm.group import GroupCoordinator
from raymoe.comm.symm_all_reduce import SymmetricAllReduce, fused_norm_unavailable, symmetric_memory_unavailable

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)

# The only groups a step all-reduces over (actors/models): tp (the embedding, and the
# attention and dense-MLP outputs, which the next RMSNorm takes) and the world (the MoE
# expert outputs, which the next RMSNorm takes; with dp > 1 each rank keeps its replica's
# rows of the sum, and the MoE layer gathers the replicas' tokens through the world's
# buffer too). Only these get symmetric memory, and in this order their passes end
# (Groups.finish_pass).
SYMMETRIC_KINDS = ("tp", "world")


@dataclass(kw_only=True)
class Groups:
    """All groups one rank belongs to, by kind (see raymoe.cluster.layout)."""

    world: GroupCoordinator
    tp: GroupCoordinator
    cp: GroupCoordinator
    attn: GroupCoordinator
    dp: GroupCoordinator
    ep: GroupCoordinator
    moe_tp: GroupCoordinator
    # the EP group's members again, for EPLB's weight moves only (a process group of its
    # own: they run in a background thread while steps use ``ep``); ``ep`` when it has one member
    ep_moves: Optional[GroupCoordinator] = None

    def __getitem__(self, kind: str) -> GroupCoordinator:
        if kind not in GROUP_KINDS:
            raise ValueError(f"unknown group {kind!r}; groups are {', '.join(GROUP_KINDS)}")
        return getattr(self, kind)

    def finish_pass(self) -> None:
        """End of a forward pass (GroupCoordinator.finish_pass of every group that may sum
        before a norm). Every rank calls it after every forward pass, inside a CUDA graph's
        capture too: the graph then holds the pass's closing barrier."""
        for kind in SYMMETRIC_KINDS:
            self[kind].finish_pass()


def init_distributed(
    rank: int,
    world_size: int,
    init_method: str,
    device: torch.device,
    *,
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
) -> None:
    """Join the world: NCCL (eagerly bound to ``device``) on GPU, gloo on CPU."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl", init_method=init_method, rank=rank, world_size=world_size, timeout=timeout, device_id=device
        )
    else:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size, timeout=timeout)


def build_groups(
    layout: RankLayout,
    rank: int,
    device: torch.device,
    *,
    node_id: str = "",
    symmetric_memory: bool = False,
    expert_moves: bool = False,
) -> Groups:
    """Create the device and cpu process groups of every kind; return this rank's.

    With ``symmetric_memory`` on CUDA, each of the SYMMETRIC_KINDS groups whose members
    all report the same ``node_id`` also gets a symmetric-memory buffer for small
    all-reduces (see symmetric_all_reduce_for). With ``expert_moves`` (EPLB on), each EP
    group gets a second device group for the weight moves (``Groups.ep_moves``).
    """
    assert dist.is_initialized() and dist.get_world_size() == layout.world_size
    device_backend = "nccl" if device.type == "cuda" else "gloo"
    groups: list[tuple[str, list[int], dist.ProcessGroup | None, dist.ProcessGroup | None]] = []
    for kind in GROUP_KINDS:
        for members in layout.groups(kind):
            if len(members) == 1:
                # torch needs no group for a single rank, and every rank sees the same
                # sizes for a kind, so skipping keeps the global creation order intact
                groups.append((kind, members, None, None))
            else:
                groups.append(
                    (
                        kind,
                        members,
                        dist.new_group(members, backend=device_backend),
                        dist.new_group(members, backend="gloo"),
                    )
                )
    mine: dict[str, GroupCoordinator] = {}
    for kind, members, device_group, cpu_group in groups:  # in the same global order on every rank
        if rank not in members:
            continue
        group = GroupCoordinator(kind, members, rank, device=device, device_group=device_group, cpu_group=cpu_group)
        if symmetric_memory and device.type == "cuda" and kind in SYMMETRIC_KINDS and len(members) > 1:
            group.symmetric = symmetric_all_reduce_for(group, node_id, fused_norm=True)
        mine[kind] = group
    if expert_moves:
        mine["ep_moves"] = _ep_moves_group(layout, mine["ep"], device_backend)
    return Groups(**mine)


def _ep_moves_group(layout: RankLayout, ep: GroupCoordinator, device_backend: str) -> GroupCoordinator:
    """A device group per EP group (created by every rank, in layout order), this rank's
    as a coordinator that shares the EP group's cpu group."""
    if ep.world_size == 1:
        return ep
    mine = None
    for members in layout.groups("ep"):
        device_group = dist.new_group(members, backend=device_backend)
        if members == ep.ranks:
            mine = device_group
    return GroupCoordinator(
        "ep_moves", ep.ranks, ep.global_rank, device=ep.device, device_group=mine, cpu_group=ep.cpu_group
    )


def symmetric_all_reduce_for(group: GroupCoordinator, node_id: str, fused_norm: bool) -> Optional[SymmetricAllReduce]:
    """A SymmetricAllReduce for ``group`` (with ``reduce_add_rms_norm`` if ``fused_norm``
    and every member can run it), or None, the same on every member, with the reason
    logged: the group spans nodes, or some member cannot make one.

    Collective over the group. The members agree over the cpu group before and after
    each step that can fail on one member alone, so none is left using a buffer its peers
    lack (a collective that would hang). A member that fails inside the rendezvous
    itself leaves its peers waiting there until the process group times out.
    """
    nodes = set(group.all_gather_object(node_id))
    if len(nodes) > 1:
        log.info("group %s spans %d nodes: its small all-reduces use NCCL", group.name, len(nodes))
        return None
    failures = group.gather_failures(symmetric_memory_unavailable())
    if failures:
        _log_no_symmetric_memory(group, failures)
        return None
    if fused_norm:
        no_fused = group.gather_failures(fused_norm_unavailable())
        if no_fused:
            log.warning(
                "group %s: its sums before a norm are not fused (%s): all-reduce, then add + norm",
                group.name,
                "; ".join(no_fused),
            )
            fused_norm = False
    try:
        symmetric, failure = SymmetricAllReduce(group.device_group, group.device, fused_norm=fused_norm), None
    except Exception as e:  # e.g. no peer access between the GPUs
        symmetric, failure = None, f"{type(e).__name__}: {e}"
    failures = group.gather_failures(failure)
    if failures:
        _log_no_symmetric_memory(group, failures)
        return None
    return symmetric


def _log_no_symmetric_memory(group: GroupCoordinator, failures: list[str]) -> None:
    log.warning(
        "symmetric memory unavailable for group %s (%s): its small all-reduces use NCCL",
        group.name,
        "; ".join(failures),
    )


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def single_process_groups(device: torch.device) -> Groups:
    """Groups of a world of one (no torch.distributed needed): every call short-circuits."""
    return Groups(**{kind: GroupCoordinator(kind, [0], 0, device=device) for kind in GROUP_KINDS})
