"""Real gloo process groups: every group of a layout has the right members, and every
GroupCoordinator collective gives the result computed here independently.

All layouts of one world size run in one spawn of ``world`` processes, which
inits torch.distributed once per layout (a spawn costs seconds on a 2-core machine). Expected members come from enumerating
coordinates (itertools.product), not from the layout code.
"""
from __future__ import annotations

import datetime
import itertools
import time

import pytest
import torch
import torch.distributed as dist

from raymoe.cluster.layout import GROUP_KINDS, RankLayout
from raymoe.comm.group import GroupCoordinator
from raymoe.comm.groups import Groups, build_groups, destroy_distributed, init_distributed

LAYOUTS = {
    "tp2": dict(tp=2),
    "dp2tp2ep2": dict(dp=2, tp=2, ep=2),
    "cp2tp2": dict(cp=2, tp=2),
    "dp2cp2tp2": dict(dp=2, cp=2, tp=2),
    "tp4ep2": dict(tp=4, ep=2),
    "dp4ep4": dict(dp=4, ep=4),
    "tp2dp4ep8": dict(tp=2, dp=4, ep=8),
}


def expected_members(kind: str, rank: int, tp: int = 1, dp: int = 1, cp: int = 1, ep: int = 1) -> list[int]:
    world = tp * dp * cp
    attn = list(itertools.product(range(dp), range(cp), range(tp)))  # index = rank, tp fastest
    moe = list(itertools.product(range(ep), range(world // ep)))
    key = {
        "world": lambda r: 0,
        "tp": lambda r: attn[r][:2],
        "cp": lambda r: (attn[r][0], attn[r][2]),
        "attn": lambda r: attn[r][0],
        "dp": lambda r: attn[r][1:],
        "ep": lambda r: moe[r][1],
        "moe_tp": lambda r: moe[r][0],
    }[kind]
    return [r for r in range(world) if key(r) == key(rank)]


def _data(rank: int, shape: tuple[int, ...], salt: int) -> torch.Tensor:
    """A tensor only ``rank`` holds for check ``salt`` (small integers: exact in float32)."""
    n = 1
    for s in shape:
        n *= s
    return (torch.arange(n, dtype=torch.float32) * (rank + 1) + 100 * salt + rank).reshape(shape)


# ---- checks run inside each rank --------------------------------------------------------


def _check_membership(g: GroupCoordinator, kind: str, rank: int, degrees: dict) -> None:
    want = expected_members(kind, rank, **degrees)
    assert g.ranks == want, (kind, rank, g.ranks, want)
    assert g.rank_in_group == want.index(rank)
    gathered = g.all_gather(torch.tensor([rank], dtype=torch.int64)).tolist()
    assert gathered == want, f"{kind}: device group holds {gathered}, layout says {want}"
    via_cpu = g.all_gather_object(rank)
    assert via_cpu == want, f"{kind}: cpu group holds {via_cpu}, layout says {want}"


def _check_tensor_collectives(g: GroupCoordinator, rank: int) -> None:
    members, n, me = g.ranks, g.world_size, g.rank_in_group

    x = _data(rank, (3, 2), 1)
    assert g.all_reduce(x) is x
    assert torch.equal(x, sum(_data(m, (3, 2), 1) for m in members))
    x = _data(rank, (4,), 2)
    g.all_reduce(x, op=dist.ReduceOp.MAX)
    assert torch.equal(x, torch.stack([_data(m, (4,), 2) for m in members]).amax(0))

    for dim in (0, 1):
        out = g.all_gather(_data(rank, (2, 3), 3), dim=dim)
        assert torch.equal(out, torch.cat([_data(m, (2, 3), 3) for m in members], dim=dim)), dim

    total = sum(_data(m, (2 * n, 3), 4) for m in members)
    assert torch.equal(g.reduce_scatter(_data(rank, (2 * n, 3), 4), dim=0), total[2 * me : 2 * me + 2])
    total = sum(_data(m, (3, 2 * n), 5) for m in members)
    assert torch.equal(g.reduce_scatter(_data(rank, (3, 2 * n), 5), dim=1), total[:, 2 * me : 2 * me + 2])
    try:
        g.reduce_scatter(torch.zeros(n + 1, 2))
        raise AssertionError("reduce_scatter accepted a dim not divisible by the group size")
    except ValueError:
        pass


def _check_point_to_point(g: GroupCoordinator, rank: int) -> None:
    members, n, me = g.ranks, g.world_size, g.rank_in_group
    nxt, prev = (me + 1) % n, (me - 1) % n
    got_a, got_b = torch.empty(3), torch.empty(2, 2)
    g.p2p_ops(
        sends=[(_data(rank, (3,), 21), nxt), (_data(rank, (2, 2), 22), prev)],
        recvs=[(got_a, prev), (got_b, nxt)],
    )
    assert torch.equal(got_a, _data(members[prev], (3,), 21))
    assert torch.equal(got_b, _data(members[nxt], (2, 2), 22))


def _check_objects(g: GroupCoordinator, rank: int, kind: str) -> None:
    members = g.ranks
    assert g.all_gather_object(("r", rank, kind)) == [("r", m, kind) for m in members]
    g.barrier()


def _check_barrier_waits(g: GroupCoordinator) -> None:
    """The cpu-group barrier really holds the others until the last member arrives."""
    g.barrier()
    t0 = time.perf_counter()
    if g.is_first:
        time.sleep(0.5)
    g.barrier()
    if not g.is_first:
        waited = time.perf_counter() - t0
        assert waited > 0.3, f"barrier returned after {waited:.3f} s while a member slept 0.5 s"


def _check_layout(rank: int, init_method: str, degrees: dict) -> None:
    layout = RankLayout(**degrees)
    init_distributed(rank, layout.world_size, init_method, torch.device("cpu"), timeout=datetime.timedelta(seconds=60))
    try:
        groups = build_groups(layout, rank, torch.device("cpu"))
        for kind in GROUP_KINDS:
            g = groups[kind]
            _check_membership(g, kind, rank, degrees)
            if g.world_size == 1:
                assert g.device_group is None and g.cpu_group is None
                continue
            _check_tensor_collectives(g, rank)
            _check_point_to_point(g, rank)
            _check_objects(g, rank, kind)
        _check_barrier_waits(groups.world)
    finally:
        destroy_distributed()


def _layouts_worker(rank: int, world: int, init_methods: list[str], names: list[str]) -> None:
    """Every layout of this world size in turn, one torch.distributed init each."""
    torch.set_num_threads(1)
    for name, init_method in zip(names, init_methods):
        try:
            _check_layout(rank, init_method, LAYOUTS[name])
        except Exception as e:
            raise AssertionError(f"layout {name}, rank {rank}: {type(e).__name__}: {e}") from e


WORLDS = sorted({RankLayout(**d).world_size for d in LAYOUTS.values()})


@pytest.mark.parametrize("world", WORLDS, ids=[f"world{w}" for w in WORLDS])
def test_groups_and_collectives(world, run_world):
    names = [n for n, d in LAYOUTS.items() if RankLayout(**d).world_size == world]
    run_world(_layouts_worker, world, names, inits=len(names))


# ---- no process group needed --------------------------------------------------------------


def test_size_one_group_short_circuits_without_torch_distributed():
    assert not dist.is_initialized()  # any real collective would raise
    g = GroupCoordinator("tp", [3], 3, device=torch.device("cpu"))
    x = torch.arange(6.0).reshape(2, 3)
    assert g.all_reduce(x) is x and g.all_gather(x, dim=1) is x and g.reduce_scatter(x) is x
    assert torch.equal(x, torch.arange(6.0).reshape(2, 3))
    g.barrier()
    assert g.all_gather_object("me") == ["me"]
    assert g.is_first and g.rank_in_group == 0


def test_groups_lookup_rejects_unknown_kind():
    g = GroupCoordinator("x", [0], 0, device=torch.device("cpu"))
    groups = Groups(**{k: g for k in GROUP_KINDS})
    assert groups["ep"] is g
    with pytest.raises(ValueError, match="unknown group 'pp'"):
        groups["pp"]
