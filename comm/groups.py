"""Initialise torch.distributed in one rank and build every group of the layout.

Every rank calls ``build_groups`` with the same layout; groups are created in
one global order (kind by kind, group by group, device group then cpu group),
which torch.distributed requires of every rank, member or not.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from raymoe.cluster.layout import GROUP_KINDS, RankLayout
from raymoe.comm.group import GroupCoordinator
from raymoe.comm.symm_all_reduce import try_symmetric_all_reduce

DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass
class Groups:
    """All groups one rank belongs to, by kind (see raymoe.cluster.layout)."""

    world: GroupCoordinator
    tp: GroupCoordinator
    cp: GroupCoordinator
    attn: GroupCoordinator
    dp: GroupCoordinator
    ep: GroupCoordinator
    moe_tp: GroupCoordinator

    def __getitem__(self, kind: str) -> GroupCoordinator:
        if kind not in GROUP_KINDS:
            raise ValueError(f"unknown group {kind!r}; groups are {', '.join(GROUP_KINDS)}")
        return getattr(self, kind)


def init_distributed(
    rank: int,
    world_size: int,
    init_method: str,
    device: torch.device,
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
    layout: RankLayout, rank: int, device: torch.device, node_id: str = "", symmetric_memory: bool = False
) -> Groups:
    """Create the device and cpu process groups of every kind; return this rank's.

    With ``symmetric_memory`` on CUDA, every group whose members all report the same
    ``node_id`` also gets a symmetric-memory buffer for small all-reduces.
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
                groups.append((kind, members, dist.new_group(members, backend=device_backend),
                               dist.new_group(members, backend="gloo")))  # fmt: skip
    mine: dict[str, GroupCoordinator] = {}
    for kind, members, device_group, cpu_group in groups:  # in the same global order on every rank
        if rank not in members:
            continue
        group = GroupCoordinator(kind, members, rank, device_group, cpu_group, device)
        if symmetric_memory and device.type == "cuda" and len(members) > 1:
            if len(set(group.all_gather_object(node_id))) == 1:
                group.symmetric = try_symmetric_all_reduce(device_group, device)
        mine[kind] = group
    return Groups(**mine)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def single_process_groups(device: torch.device) -> Groups:
    """Groups of a world of one (no torch.distributed needed): every call short-circuits."""
    return Groups(**{kind: GroupCoordinator(kind, [0], 0, None, None, device) for kind in GROUP_KINDS})
