"""The sums that the next RMSNorm takes, behind GroupCoordinator (partial_buffer,
all_reduce_add_rms_norm, finish_pass, Groups.finish_pass), and the agreement of the
members on symmetric-memory setup (symmetric_all_reduce_for), on real gloo groups.

Symmetric memory needs CUDA. Here a SymmetricAllReduce keeps its own bookkeeping
(fusable, the alternating halves, the end of a pass) and only its cross-rank read is
replaced: the members' halves are all-gathered over gloo instead of read through mapped
addresses (tests/gpu covers the real one).
"""
from __future__ import annotations

import datetime
import logging

import torch

from raymoe.actors.models import ops
from raymoe.cluster.layout import GROUP_KINDS, RankLayout
from raymoe.comm import groups as groups_module
from raymoe.comm.group import GroupCoordinator
from raymoe.comm.groups import build_groups, destroy_distributed, init_distributed, symmetric_all_reduce_for
from raymoe.comm.symm_all_reduce import AlternatingHalves, SymmetricAllReduce

WORLD = 2
EPS = 1e-6
HALF = 24  # elements of one half: a [T, 8] residual fuses up to T = 3


class GlooSymmetricAllReduce(SymmetricAllReduce):
    """SymmetricAllReduce's own fusable / next_partial / finish_pass and AlternatingHalves,
    with the read of every member's half done by an all-gather over gloo."""

    dtype = torch.float32

    def __init__(self, group: GroupCoordinator) -> None:
        self.group = group
        self.fused_norm, self.max_numel = True, HALF
        self.barriers = 0
        self.halves = AlternatingHalves(torch.zeros(2 * HALF), self._barrier)
        self.fused_calls = 0

    def _barrier(self) -> None:
        self.barriers += 1
        self.group.barrier()

    def reduce_add_rms_norm(self, x, residual, weight, eps):
        offset = self.halves.publish(x, residual)
        mine = self.halves.halves[offset : offset + residual.numel()].view_as(residual)
        summed = self.group.all_gather(mine.unsqueeze(0)).sum(0)
        self.fused_calls += 1
        return ops.add_rms_norm(summed, residual, weight, eps)


def _partial(rank: int, tokens: int, salt: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * salt + rank)
    return torch.randn(tokens, 8, generator=g).to(dtype)


def _shared(tokens: int, salt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual and weight every member holds."""
    g = torch.Generator().manual_seed(10_000 + salt)
    return torch.randn(tokens, 8, generator=g), 1 + 0.1 * torch.randn(8, generator=g)


def _expected(tokens: int, salt: int) -> tuple[torch.Tensor, torch.Tensor]:
    residual, weight = _shared(tokens, salt)
    summed = sum(_partial(r, tokens, salt).double() for r in range(WORLD)).float()
    return ops.add_rms_norm(summed, residual, weight, EPS)


def _sum_add_norm(group: GroupCoordinator, rank: int, tokens: int, salt: int, into_buffer: bool):
    """One sum that a norm takes; the partial written into partial_buffer when asked and given."""
    residual, weight = _shared(tokens, salt)
    x = _partial(rank, tokens, salt)
    buffer = group.partial_buffer(residual) if into_buffer else None
    if buffer is not None:
        x = buffer.copy_(x)
    normed, total = group.all_reduce_add_rms_norm(x, residual, weight, EPS, add_rms_norm=ops.add_rms_norm)
    want_normed, want_total = _expected(tokens, salt)
    torch.testing.assert_close(total, want_total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(normed, want_normed, rtol=1e-5, atol=1e-5)
    return buffer


def _check_plain_path(rank: int) -> None:
    """Without symmetric memory: no buffer to write into; all-reduce, then add + norm."""
    tp = build_groups(RankLayout(tp=WORLD), rank, torch.device("cpu")).tp
    assert tp.symmetric is None
    assert tp.partial_buffer(torch.zeros(2, 8)) is None
    _sum_add_norm(tp, rank, tokens=2, salt=1, into_buffer=True)
    tp.finish_pass()


def _check_fused_path(rank: int) -> None:
    groups = build_groups(RankLayout(tp=WORLD), rank, torch.device("cpu"))
    tp, world = groups.tp, groups.world
    tp.symmetric, world.symmetric = GlooSymmetricAllReduce(tp), GlooSymmetricAllReduce(world)
    tp_halves, world_halves = tp.symmetric.halves.halves, world.symmetric.halves.halves

    # call 0 (half 0): the partial copied in
    _sum_add_norm(tp, rank, tokens=2, salt=2, into_buffer=False)
    # call 1 (half 1): the partial written straight where the call reads it
    buffer = _sum_add_norm(tp, rank, tokens=3, salt=3, into_buffer=True)
    assert buffer is not None and buffer.data_ptr() == tp_halves[HALF:].data_ptr()
    assert tp.symmetric.fused_calls == 2 and tp.symmetric.barriers == 2
    # too large to fuse, or not of the buffer's dtype: the plain path, no buffer
    assert tp.partial_buffer(torch.zeros(4, 8)) is None
    _sum_add_norm(tp, rank, tokens=4, salt=4, into_buffer=True)
    assert tp.partial_buffer(torch.zeros(2, 8, dtype=torch.float64)) is None
    assert tp.symmetric.fused_calls == 2
    # one fused call on the world: half 0
    buffer = _sum_add_norm(world, rank, tokens=1, salt=5, into_buffer=True)
    assert buffer is not None and buffer.data_ptr() == world_halves.data_ptr()
    assert world.symmetric.fused_calls == 1 and world.symmetric.barriers == 1

    groups.finish_pass()
    assert tp.symmetric.barriers == 2, "an even pass ends without a barrier"
    assert world.symmetric.barriers == 2, "an odd pass ends with one more barrier"
    for g, halves in ((tp, tp_halves), (world, world_halves)):
        assert g.partial_buffer(torch.zeros(1, 8)).data_ptr() == halves.data_ptr(), f"{g.name}: a pass starts on half 0"
    _sum_add_norm(world, rank, tokens=1, salt=6, into_buffer=True)


def _check_gather_failures(rank: int) -> None:
    world = build_groups(RankLayout(tp=WORLD), rank, torch.device("cpu")).world
    assert world.gather_failures(None) == []
    assert world.gather_failures("boom" if rank == 1 else None) == ["rank 1: boom"]
    assert world.gather_failures(f"no {rank}") == ["rank 0: no 0", "rank 1: no 1"]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _setup(group: GroupCoordinator, node: str, unavailable=None, no_triton=None, fails=None):
    """symmetric_all_reduce_for with this rank's failures staged -> (its result, what the
    constructor was called with, the messages logged)."""
    made: list[bool] = []

    def construct(device_group, device, *, fused_norm):
        made.append(fused_norm)
        if fails:
            raise RuntimeError(fails)
        return f"symmetric, fused_norm={fused_norm}"

    staged = {
        "SymmetricAllReduce": construct,
        "symmetric_memory_unavailable": lambda: unavailable,
        "fused_norm_unavailable": lambda: no_triton,
    }
    saved = {name: getattr(groups_module, name) for name in staged}
    for name, value in staged.items():
        setattr(groups_module, name, value)
    records = _Records()
    groups_module.log.addHandler(records)
    try:
        return symmetric_all_reduce_for(group, node, fused_norm=True), made, records.messages
    finally:
        groups_module.log.removeHandler(records)
        for name, value in saved.items():
            setattr(groups_module, name, value)


def _check_setup_agreement(rank: int) -> None:
    """A failure on one member leaves every member without symmetric memory, logged."""
    groups_module.log.setLevel(logging.INFO)
    tp = build_groups(RankLayout(tp=WORLD), rank, torch.device("cpu")).tp
    other = rank == 1

    got, made, logged = _setup(tp, "node")
    assert got == "symmetric, fused_norm=True" and made == [True] and logged == []

    got, made, logged = _setup(tp, f"node{rank}")
    assert got is None and made == [] and logged == ["group tp spans 2 nodes: its small all-reduces use NCCL"]

    got, made, logged = _setup(tp, "node", unavailable="old torch" if other else None)
    assert got is None and made == [], "no member may enter the collective setup"
    assert logged == ["symmetric memory unavailable for group tp (rank 1: old torch): its small all-reduces use NCCL"]

    got, made, logged = _setup(tp, "node", fails="no peer access" if other else None)
    assert got is None and made == [True], "a member that succeeded gives its buffer up too"
    assert logged == [
        "symmetric memory unavailable for group tp (rank 1: RuntimeError: no peer access): "
        "its small all-reduces use NCCL"
    ]

    got, made, logged = _setup(tp, "node", no_triton="no Triton" if other else None)
    assert got == "symmetric, fused_norm=False" and made == [False], "every member without the fused norm"
    assert logged == ["group tp: its sums before a norm are not fused (rank 1: no Triton): all-reduce, then add + norm"]


CHECKS = (_check_plain_path, _check_fused_path, _check_gather_failures, _check_setup_agreement)


def _worker(rank: int, world: int, init_methods: list[str]) -> None:
    torch.set_num_threads(1)
    init_distributed(rank, world, init_methods[0], torch.device("cpu"), timeout=datetime.timedelta(seconds=60))
    try:
        for check in CHECKS:
            try:
                check(rank)
            except Exception as e:
                raise AssertionError(f"{check.__name__}, rank {rank}: {type(e).__name__}: {e}") from e
    finally:
        destroy_distributed()


def test_sums_before_norms_and_setup_agreement(run_world):
    run_world(_worker, WORLD)

