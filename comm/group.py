"""GroupCoordinator: one process group, as a device group plus a gloo cpu group.

Tensor collectives go over the device group (NCCL on GPU, gloo on CPU).
CPU-side coordination -- barrier, all_gather_object -- goes
over the gloo cpu group, never the device group: a device barrier waits behind
all queued GPU work (tens of milliseconds behind a busy step, against well under one
for gloo: BENCHMARKS.md, "Communication").

A group of size 1 short-circuits every call (no process group is touched).
Ranks passed to and returned from methods are *group* ranks (0..size-1)
unless a name says ``global``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from raymoe.comm.symm_all_reduce import SymmetricAllReduce

# torch 2.13 renamed the tensor-output collectives; older torch has only the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class GroupCoordinator:
    def __init__(
        self,
        name: str,
        ranks: Sequence[int],
        global_rank: int,
        *,
        device: torch.device,
        device_group: Optional[dist.ProcessGroup] = None,
        cpu_group: Optional[dist.ProcessGroup] = None,
        symmetric: Optional[SymmetricAllReduce] = None,
    ) -> None:
        """``device_group``, ``cpu_group``: the group's process groups (None for a group of one)."""
        assert global_rank in ranks, f"rank {global_rank} not in group {name} {list(ranks)}"
        self.name = name
        self.ranks = list(ranks)
        self.global_rank = global_rank
        self.rank_in_group = self.ranks.index(global_rank)
        self.world_size = len(self.ranks)
        self.device_group = device_group
        self.cpu_group = cpu_group
        self.device = device
        self.symmetric = symmetric  # small bf16 sums on one node's GPUs (see symm_all_reduce)
        if self.world_size > 1:
            assert device_group is not None and cpu_group is not None

    def __repr__(self) -> str:
        return f"GroupCoordinator({self.name}, ranks={self.ranks}, me={self.rank_in_group})"

    @property
    def is_first(self) -> bool:
        return self.rank_in_group == 0

    # ---- tensor collectives (device group) --------------------------------------

    def all_reduce(self, x: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
        """All-reduce of ``x`` over the group; returns the result: ``x`` itself, reduced in
        place, or a new tensor when the symmetric-memory path took it (use the return value)."""
        if self.world_size == 1:
            return x
        if self.symmetric is not None and op == dist.ReduceOp.SUM and self.symmetric.eligible(x):
            return self.symmetric(x)
        dist.all_reduce(x, op=op, group=self.device_group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Concatenate every member's ``x`` (same shape on all) along ``dim``, in group-rank order."""
        if self.world_size == 1:
            return x
        x = x.movedim(dim, 0).contiguous()
        out = torch.empty((self.world_size * x.shape[0],) + x.shape[1:], dtype=x.dtype, device=x.device)
        _all_gather_single(out, x, group=self.device_group)
        return out.movedim(0, dim)

    def reduce_scatter(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Sum ``x`` over the group and return this member's 1/size slice along ``dim``.

        ``x.shape[dim]`` must be divisible by the group size.
        """
        if self.world_size == 1:
            return x
        if x.shape[dim] % self.world_size:
            raise ValueError(f"reduce_scatter: dim {dim} of size {x.shape[dim]} not divisible by {self.world_size}")
        x = x.movedim(dim, 0).contiguous()
        out = torch.empty((x.shape[0] // self.world_size,) + x.shape[1:], dtype=x.dtype, device=x.device)
        _reduce_scatter_single(out, x, group=self.device_group)
        return out.movedim(0, dim)

    def p2p_ops(self, sends: Sequence[tuple[torch.Tensor, int]], recvs: Sequence[tuple[torch.Tensor, int]]) -> None:
        """Batched point-to-point: post every send and recv at once, wait for all.

        ``sends``/``recvs``: (tensor, group rank of the peer).
        """
        ops = [dist.P2POp(dist.isend, _as_bytes(t), group=self.device_group, group_peer=p) for t, p in sends]
        ops += [dist.P2POp(dist.irecv, _as_bytes(t), group=self.device_group, group_peer=p) for t, p in recvs]
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()

    # ---- sums that the next RMSNorm takes (symmetric memory where it can) ------------

    def partial_buffer(self, residual: torch.Tensor) -> Optional[torch.Tensor]:
        """Where this rank may write its partial for the next ``all_reduce_add_rms_norm``
        with ``residual`` [T, H], shaped like it: the buffer that call reads it from (a
        block that writes its output there saves a copy), or None when that call reads it
        from anywhere. Only the block right before that call may write it."""
        fused = self._fused_norm(residual)
        return fused.next_partial(residual) if fused is not None else None

    def all_reduce_add_rms_norm(
        self,
        x: torch.Tensor,
        residual: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        *,
        add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(residual + s) * weight, residual + s) with s the sum of every member's
        ``x`` [T, H]: one step from symmetric memory where it allows (see
        SymmetricAllReduce.reduce_add_rms_norm), else ``all_reduce`` and then
        ``add_rms_norm(s, residual, weight, eps)``, the unfused add + norm. May reuse the
        inputs' storage. Every member calls it in the same order, and ``finish_pass``
        after each forward pass."""
        fused = self._fused_norm(residual)
        if fused is not None and x.shape == residual.shape and x.dtype == residual.dtype:
            return fused.reduce_add_rms_norm(x, residual, weight, eps)
        return add_rms_norm(self.all_reduce(x), residual, weight, eps)

    def gather_over(self, sub: "GroupCoordinator", x: torch.Tensor) -> torch.Tensor:
        """``sub.all_gather(x)`` for a group ``sub`` inside this one: in one step through this
        group's symmetric buffer where it allows (then every member of this group calls it
        together, each for its own ``sub``, all with one shape of ``x``), else over ``sub``."""
        if sub.world_size == 1:
            return x
        if self.symmetric is not None and x.dim() == 2 and self.symmetric.one_step(x.numel(), x.dtype):
            return self.symmetric.gather(x, tuple(self.ranks.index(r) for r in sub.ranks))
        return sub.all_gather(x)

    def all_reduce_add_rms_norm_gather(
        self,
        x: torch.Tensor,
        residual: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        *,
        attn: "GroupCoordinator",
        dp: "GroupCoordinator",
        rows: int,
        add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Data-parallel attention's norm before the MoE layer, on this group (the world, of
        ``dp`` replicas of ``attn`` ranks each): ``attn.all_reduce_add_rms_norm`` of ``x``
        [T, H] and ``residual``, then every replica's normed rows (each padded to ``rows``)
        gathered over ``dp`` -> ([dp * rows, H], the residual). In one step through this
        group's symmetric buffer where it allows (decided on shapes every member shares)."""
        width = residual.shape[1]
        sym = self.symmetric
        if sym is not None and residual.dtype == x.dtype and sym.one_step(2 * rows * width, x.dtype):
            replicas = tuple(
                tuple(self.ranks.index(first + member - attn.global_rank) for member in attn.ranks)
                for first in dp.ranks
            )
            return sym.reduce_add_rms_norm_gather(
                x, residual.contiguous(), weight, eps, replicas=replicas, mine=dp.rank_in_group, rows=rows
            )
        h, residual = attn.all_reduce_add_rms_norm(x, residual, weight, eps, add_rms_norm=add_rms_norm)
        return self.gather_over(dp, torch.nn.functional.pad(h, (0, 0, 0, rows - h.shape[0]))), residual

    def reduce_rows_add_rms_norm(
        self,
        x: torch.Tensor,
        first_row: int,
        residual: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        *,
        reduce_rows: Callable[[torch.Tensor], torch.Tensor],
        add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``all_reduce_add_rms_norm`` with s the sum over every member of rows
        [first_row, first_row + T) of ``x`` [R, H]: in one step from symmetric memory where it
        allows, else ``reduce_rows(x)`` (the same sum by other collectives) and then the
        unfused add + norm."""
        # decided on x alone, whose shape every member shares (the replicas' rows may differ)
        sym = self.symmetric
        if sym is not None and x.dim() == 2 and sym.one_step(x.numel(), x.dtype) and residual.dtype == x.dtype:
            return sym.reduce_rows_add_rms_norm(x, first_row, residual.contiguous(), weight, eps)
        return add_rms_norm(reduce_rows(x), residual, weight, eps)

    def finish_pass(self) -> None:
        """End of a forward pass of ``all_reduce_add_rms_norm`` calls: the next pass starts
        afresh (see AlternatingHalves). Every member calls it after every forward pass
        (through Groups.finish_pass)."""
        if self.symmetric is not None:
            self.symmetric.finish_pass()

    def _fused_norm(self, residual: torch.Tensor) -> Optional[SymmetricAllReduce]:
        if self.symmetric is not None and self.symmetric.fusable(residual):
            return self.symmetric
        return None

    # ---- CPU-side coordination (gloo cpu group) -------------------------------

    def barrier(self) -> None:
        """Wait until every member arrives. Uses the cpu group: never blocked by GPU queues."""
        if self.world_size > 1:
            dist.barrier(group=self.cpu_group)

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every member; the same answer on all."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return bool(t.item())

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every member's ``obj``, in group-rank order."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.cpu_group)
        return out

    def gather_failures(self, failure: Optional[str]) -> list[str]:
        """Every member's ``failure`` at a step that can fail on one member alone (None:
        it did not fail there), as "rank <global rank>: <failure>"; the same list on every
        member, empty when none failed, so that all fall back, or all go on, together."""
        everyone = self.all_gather_object(failure)
        return [f"rank {self.ranks[i]}: {f}" for i, f in enumerate(everyone) if f is not None]


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """FP8 tensors travel as bytes: gloo has no float8 types."""
    return t.view(torch.uint8) if t.is_floating_point() and t.element_size() == 1 else t
