"""Small bf16 all-reduces through torch symmetric memory (one node, CUDA).

A decode step all-reduces a few [tokens, hidden] activations per layer (attention
output over tp, expert output over the world). At these sizes NCCL's ring costs
a fixed ~35 us whatever the size; a one-shot all-reduce, where every GPU reads its
peers' copies straight over NVLink, costs a fraction of that (BENCHMARKS.md,
"Communication"). torch's one-shot kernel copies the input into this
group's symmetric buffer, meets its peers at a barrier on the signal pads, sums,
and meets them again before returning, so the buffer can be reused by the next
call, and the whole thing can be captured in a CUDA graph.

The next RMSNorm can take the sum in the same step (``reduce_add_rms_norm``; of some rows
only, a reduce-scatter, in ``reduce_rows_add_rms_norm``; ``gather`` all-gathers): each
rank copies its partial into its half of a second, double-buffered symmetric
buffer, meets its peers at one barrier, and one Triton kernel sums every rank's
copy, adds the residual and normalises. That is one barrier where the one-shot
kernel meets its peers twice, and no separate add + norm kernel. One barrier is
enough because consecutive calls alternate halves: before a rank writes a half
again, it has passed the barrier of the call in between, which each peer enters
only after it finished reading that half (AlternatingHalves).

No multicast: only plain peer-to-peer loads and the signal-pad barrier are used
(multicast can take a shared host's GPUs out of service; the rank actors also
disable it).
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Optional

import torch
import torch.distributed as dist

# Larger all-reduces (prefill) stay on NCCL, whose ring reads each byte once
# where the one-shot reads it world-size times.
ONE_SHOT_MAX_BYTES = 2 << 20


class SymmetricAllReduce:
    """One-shot sum all-reduce of bf16 tensors up to ``max_bytes`` over ``group``, alone
    or fused with the residual add and RMSNorm after it.

    Construction is collective over the group (every member must build one).
    """

    dtype = torch.bfloat16

    def __init__(
        self, group: dist.ProcessGroup, device: torch.device, *, fused_norm: bool, max_bytes: int = ONE_SHOT_MAX_BYTES
    ) -> None:
        """``fused_norm``: also allocate the double buffer of ``reduce_add_rms_norm`` (only
        a group whose sums the next RMSNorm takes needs it; it needs Triton)."""
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = group.group_name
        self.max_numel = max_bytes // self.dtype.itemsize
        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # required before torch 2.8, deprecated since
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                symm_mem.enable_symm_mem_for_group(self.group_name)
        self.buffer = symm_mem.empty(self.max_numel, dtype=self.dtype, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)
        self.fused_norm = fused_norm
        self.halves: Optional[AlternatingHalves] = None
        if fused_norm:
            # the fused sum + add + norm: its own buffer (the one-shot kernel writes its
            # buffer before its first barrier), two halves of max_numel each
            halves = symm_mem.empty(2 * self.max_numel, dtype=self.dtype, device=device)
            handle = symm_mem.rendezvous(halves, self.group_name)
            # the kernel reads every rank's half at the addresses rendezvous mapped
            assert handle.buffer_ptrs[handle.rank] == halves.data_ptr()
            self.halves = AlternatingHalves(halves, lambda: handle.barrier(channel=0))
            self.peer_halves = torch.tensor(handle.buffer_ptrs, dtype=torch.int64, device=device)
            self._peer_subsets: dict[tuple[int, ...], torch.Tensor] = {}

    def eligible(self, x: torch.Tensor) -> bool:
        # the kernel moves 16 bytes per thread: 8 bf16 values
        return x.dtype == self.dtype and x.is_contiguous() and x.numel() <= self.max_numel and x.numel() % 8 == 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every member's ``x``, as a new tensor (``x`` is left as it was)."""
        out = torch.empty_like(x)
        flat = x.view(-1)
        torch.ops.symm_mem.one_shot_all_reduce_copy_out(
            self.buffer[: flat.numel()], flat, "sum", self.group_name, out.view(-1)
        )
        return out

    def fusable(self, residual: torch.Tensor) -> bool:
        """Whether a partial shaped like ``residual`` [T, H] can be summed, added and
        normalised in one step (reduce_add_rms_norm)."""
        return (
            self.fused_norm
            and residual.dtype == self.dtype
            and residual.dim() == 2
            and residual.is_contiguous()
            and residual.numel() <= self.max_numel
        )

    def next_partial(self, residual: torch.Tensor) -> torch.Tensor:
        """See AlternatingHalves.next_partial."""
        assert self.halves is not None, "built without fused_norm"
        return self.halves.next_partial(residual)

    def reduce_add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(residual + sum of every member's x) * weight, that residual), the
        residual updated in place. The sum is float32 rounded once, as a two-rank
        all-reduce rounds it; the add and norm round as ``ops.add_rms_norm``'s torch path."""
        from raymoe.comm.reduce_add_rms_norm_triton import reduce_add_rms_norm_

        assert self.halves is not None, "built without fused_norm"
        offset = self.halves.publish(x, residual)
        return reduce_add_rms_norm_(self.peer_halves, offset, residual, weight, eps=eps), residual

    def one_step(self, numel: int, dtype: torch.dtype) -> bool:
        """Whether ``numel`` values of ``dtype`` fit the one-step collectives below (the same
        answer on every member when theirs have one shape)."""
        return self.halves is not None and dtype == self.dtype and numel <= self.max_numel

    def reduce_rows_add_rms_norm(
        self, x: torch.Tensor, first_row: int, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``reduce_add_rms_norm`` with the sum of rows [first_row, first_row + T) of every
        member's ``x`` [R, H]: a reduce-scatter and the norm after it in one step (each
        member keeps its own rows: with data-parallel attention, its replica's)."""
        from raymoe.comm.reduce_add_rms_norm_triton import reduce_add_rms_norm_

        assert self.halves is not None, "built without fused_norm"
        assert x.shape[1] == residual.shape[1] and first_row + residual.shape[0] <= x.shape[0]
        offset = self.halves.publish(x.contiguous(), x)
        return reduce_add_rms_norm_(
            self.peer_halves, offset + first_row * x.shape[1], residual, weight, eps=eps
        ), residual

    def reduce_add_rms_norm_gather(
        self,
        x: torch.Tensor,
        residual: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        *,
        replicas: tuple[tuple[int, ...], ...],
        mine: int,
        rows: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Data-parallel attention's all-reduce over a replica's attention ranks, add + norm,
        and all-gather over the replicas, in one step: ``replicas`` holds each replica's
        attention ranks (group ranks), ``x`` [T, H] is this rank's partial of replica
        ``mine``, ``residual`` [T, H] that replica's residual (updated in place). -> (every
        replica's normed rows, each padded to ``rows``: [replicas * rows, H]; the residual)."""
        from raymoe.comm.reduce_add_rms_norm_triton import reduce_add_rms_norm_gather_

        assert self.halves is not None, "built without fused_norm"
        tokens, width = x.shape
        staged = x.new_zeros(2 * rows, width)  # padding rows: zeros, as the unfused path pads
        staged[:tokens] = x
        staged[rows : rows + tokens] = residual
        offset = self.halves.publish(staged, staged)
        table = self._addresses(tuple(r for replica in replicas for r in replica)).view(len(replicas), -1)
        out = reduce_add_rms_norm_gather_(table, offset, residual, weight, mine=mine, rows=rows, eps=eps)
        return out, residual

    def _addresses(self, members: tuple[int, ...]) -> torch.Tensor:
        """The halves' addresses of the members at these group ranks (kept: a CUDA graph
        replays the tensor its capture read)."""
        if members not in self._peer_subsets:
            self._peer_subsets[members] = self.peer_halves[list(members)].clone()
        return self._peer_subsets[members]

    def gather(self, x: torch.Tensor, members: tuple[int, ...]) -> torch.Tensor:
        """The ``x`` [T, H] of the members at these group ranks, stacked [len(members) * T, H]:
        an all-gather over them in one step. Every member of the group takes part (each
        with its own ``members``; all with one shape of ``x``)."""
        from raymoe.comm.gather_rows_triton import gather_rows

        assert self.halves is not None, "built without fused_norm"
        offset = self.halves.publish(x.contiguous(), x)
        return gather_rows(self._addresses(members), offset, x)

    def finish_pass(self) -> None:
        """See AlternatingHalves.finish_pass."""
        if self.halves is not None:
            self.halves.finish_pass()


class AlternatingHalves:
    """The double buffer of the fused sum on one rank: call n of a forward pass puts this
    rank's partial into half n % 2 and meets the peers at ``barrier``; afterwards every
    rank may read every rank's half n % 2 until it enters the barrier of call n + 1.
    A half is written again two calls later, after that barrier, so no peer is still
    reading it. ``finish_pass`` keeps this true from one pass to the next, and with CUDA
    graphs (which replay the halves their capture used): every pass starts on half 0,
    and one more barrier follows an odd number of calls."""

    def __init__(self, halves: torch.Tensor, barrier) -> None:
        self.halves = halves
        self.half_numel = halves.numel() // 2
        self.barrier = barrier
        self.calls = 0  # in this pass

    def next_partial(self, like: torch.Tensor) -> torch.Tensor:
        """Where the next call reads this rank's partial from, shaped like ``like``: a
        block that writes its output there saves the copy. Only the block right before
        that call may write it (its half is free from the previous call's barrier on)."""
        offset = (self.calls % 2) * self.half_numel
        return self.halves[offset : offset + like.numel()].view_as(like)

    def publish(self, x: torch.Tensor, like: torch.Tensor) -> int:
        """Put ``x`` (shaped like ``like``) into the next half unless it is there already,
        meet the peers; -> the element offset of that half in every rank's buffer."""
        assert x.shape == like.shape and x.dtype == like.dtype and like.numel() <= self.half_numel
        mine = self.next_partial(like)
        if x.data_ptr() != mine.data_ptr():
            mine.copy_(x)
        offset = (self.calls % 2) * self.half_numel
        self.calls += 1
        self.barrier()
        return offset

    def finish_pass(self) -> None:
        """End of a forward pass: the next call starts on half 0 again; after an odd
        number of calls one more barrier stands in for the call on half 1."""
        if self.calls % 2:
            self.barrier()
        self.calls = 0


def symmetric_memory_unavailable() -> Optional[str]:
    """Why this process cannot make a SymmetricAllReduce, found without touching its
    peers; None if it can try."""
    if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out"):
        return f"torch {torch.__version__} has no symm_mem.one_shot_all_reduce_copy_out"
    return None


def fused_norm_unavailable() -> Optional[str]:
    """Why this process cannot run ``reduce_add_rms_norm`` (its kernel is Triton); None if it can."""
    return None if importlib.util.find_spec("triton") is not None else "Triton is not installed"
