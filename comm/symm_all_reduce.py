"""Small bf16 all-reduces through torch symmetric memory (one node, CUDA).

A decode step all-reduces a few [tokens, hidden] activations per layer (attention
output over tp, expert output over the world). At these sizes NCCL's ring costs
~35 us whatever the size; a one-shot all-reduce, where every GPU reads its peers'
copies straight over NVLink, costs 8.5-15 us for 16 KiB-1 MiB on 2 x H200
(shared/gpu/README.md). torch's one-shot kernel copies the input into this
group's symmetric buffer, meets its peers at a barrier on the signal pads, sums,
and meets them again before returning, so the buffer can be reused by the next
call, and the whole thing can be captured in a CUDA graph.

No multicast: only the plain peer-to-peer one-shot kernel is used (multicast can
take a shared host's GPUs out of service; the rank actors also disable it).
"""
from __future__ import annotations

import logging
import warnings
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Larger all-reduces (prefill) stay on NCCL, whose ring reads each byte once
# where the one-shot reads it world-size times.
ONE_SHOT_MAX_BYTES = 2 << 20


class SymmetricAllReduce:
    """One-shot sum all-reduce of bf16 tensors up to ``max_bytes`` over ``group``.

    Construction is collective over the group (every member must build one).
    """

    dtype = torch.bfloat16

    def __init__(self, group: dist.ProcessGroup, device: torch.device, max_bytes: int = ONE_SHOT_MAX_BYTES) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = group.group_name
        self.max_numel = max_bytes // self.dtype.itemsize
        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # required before torch 2.8, deprecated since
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                symm_mem.enable_symm_mem_for_group(self.group_name)
        self.buffer = symm_mem.empty(self.max_numel, dtype=self.dtype, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)

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


def try_symmetric_all_reduce(group: dist.ProcessGroup, device: torch.device) -> Optional[SymmetricAllReduce]:
    """A SymmetricAllReduce for ``group``, or None (with a warning) where torch cannot make one.

    Collective: every member must call it, and all get the same outcome only if the
    failure is shared (it is: a missing op or failed peer mapping fails everywhere).
    """
    if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out"):
        log.warning("torch %s has no symm_mem.one_shot_all_reduce_copy_out: small all-reduces use NCCL",
                    torch.__version__)  # fmt: skip
        return None
    try:
        return SymmetricAllReduce(group, device)
    except Exception as e:  # e.g. no peer access between the GPUs
        log.warning("symmetric memory unavailable for group %s (%s: %s): small all-reduces use NCCL",
                    group.group_name, type(e).__name__, e)  # fmt: skip
        return None
