"""Rank layout, exhaustively over small worlds.

Expectations come from enumerating coordinates with itertools.product (attention
side: dp, cp, tp with tp fastest; MoE side: ep, moe_tp; nodes: node, local rank),
never from the layout's own helpers.
"""

from __future__ import annotations

import itertools

import pytest

from raymoe.cluster.layout import GROUP_KINDS, RankLayout

DEGREES = range(1, 5)
TRIPLES = [(tp, dp, cp) for tp, dp, cp in itertools.product(DEGREES, DEGREES, DEGREES) if tp * dp * cp <= 16]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _expected(tp: int, dp: int, cp: int, ep: int, nodes: int) -> dict[str, dict]:
    """Per rank: coordinates and the key shared by the members of each group kind."""
    world = tp * dp * cp
    moe_tp = world // ep
    rpn = world // nodes
    attn = list(itertools.product(range(dp), range(cp), range(tp)))  # index = rank
    moe = list(itertools.product(range(ep), range(moe_tp)))
    node = list(itertools.product(range(nodes), range(rpn)))
    out = {}
    for rank in range(world):
        d, c, t = attn[rank]
        e, m = moe[rank]
        n, lr = node[rank]
        out[rank] = {
            "coord": dict(dp=d, cp=c, tp=t, ep=e, moe_tp=m, node=n, local_rank=lr),
            "keys": {
                "world": (),
                "tp": (d, c),
                "cp": (d, t),
                "attn": (d,),
                "dp": (c, t),
                "ep": (m,),
                "moe_tp": (e,),
            },
        }
    return out


def _expected_groups(exp: dict[int, dict], kind: str) -> list[list[int]]:
    by_key: dict[tuple, list[int]] = {}
    for rank in sorted(exp):
        by_key.setdefault(exp[rank]["keys"][kind], []).append(rank)
    return sorted(by_key.values())


def _layouts(tp: int, dp: int, cp: int):
    world = tp * dp * cp
    for ep in _divisors(world):
        for nodes in _divisors(world):
            yield ep, nodes, RankLayout(tp=tp, dp=dp, cp=cp, ep=ep, nodes=nodes)


@pytest.mark.parametrize("tp, dp, cp", TRIPLES, ids=[f"tp{t}dp{d}cp{c}" for t, d, c in TRIPLES])
def test_coordinates_round_trip(tp, dp, cp):
    for ep, nodes, layout in _layouts(tp, dp, cp):
        world = tp * dp * cp
        exp = _expected(tp, dp, cp, ep, nodes)
        assert layout.world_size == world
        assert layout.moe_tp * ep == world
        assert layout.ranks_per_node * nodes == world
        for rank in range(world):
            c = layout.coord(rank)
            assert c.rank == rank
            got = dict(dp=c.dp, cp=c.cp, tp=c.tp, ep=c.ep, moe_tp=c.moe_tp, node=c.node, local_rank=c.local_rank)
            assert got == exp[rank]["coord"], (layout, rank)
            assert layout.rank_of(c.dp, c.cp, c.tp) == rank


@pytest.mark.parametrize("tp, dp, cp", TRIPLES, ids=[f"tp{t}dp{d}cp{c}" for t, d, c in TRIPLES])
def test_groups_partition_world_with_expected_members(tp, dp, cp):
    for ep, nodes, layout in _layouts(tp, dp, cp):
        world = tp * dp * cp
        exp = _expected(tp, dp, cp, ep, nodes)
        sizes = {"world": world, "tp": tp, "cp": cp, "attn": cp * tp, "dp": dp, "ep": ep, "moe_tp": world // ep}
        for kind in GROUP_KINDS:
            groups = layout.groups(kind)
            where = f"{layout} {kind}"
            # a partition: every rank in exactly one group
            flat = [r for g in groups for r in g]
            assert sorted(flat) == list(range(world)), where
            assert all(len(g) == sizes[kind] for g in groups), where
            assert len(groups) == world // sizes[kind], where
            assert all(g == sorted(g) for g in groups), where
            # one fixed global order (every rank creates the groups in it)
            assert groups == sorted(groups) == layout.groups(kind), where
            assert groups == _expected_groups(exp, kind), where


@pytest.mark.parametrize("tp, dp, cp", TRIPLES, ids=[f"tp{t}dp{d}cp{c}" for t, d, c in TRIPLES])
def test_members_share_and_differ_in_the_right_coordinates(tp, dp, cp):
    # kind -> (coordinates all members share, coordinate that takes every value once)
    rules = {
        "tp": (("dp", "cp"), "tp"),
        "cp": (("dp", "tp"), "cp"),
        "attn": (("dp",), None),
        "dp": (("cp", "tp"), "dp"),
        "ep": (("moe_tp",), "ep"),
        "moe_tp": (("ep",), "moe_tp"),
    }
    for ep, nodes, layout in _layouts(tp, dp, cp):
        exp = _expected(tp, dp, cp, ep, nodes)
        for kind, (shared, varying) in rules.items():
            for g in layout.groups(kind):
                coords = [exp[r]["coord"] for r in g]
                for name in shared:
                    assert len({c[name] for c in coords}) == 1, (layout, kind, g, name)
                if varying is not None:
                    assert sorted(c[varying] for c in coords) == list(range(len(g))), (layout, kind, g)
            for g in layout.groups("attn"):  # attn = every (cp, tp) of one dp replica
                coords = {(exp[r]["coord"]["cp"], exp[r]["coord"]["tp"]) for r in g}
                assert coords == set(itertools.product(range(cp), range(tp)))


@pytest.mark.parametrize("tp, dp, cp", TRIPLES, ids=[f"tp{t}dp{d}cp{c}" for t, d, c in TRIPLES])
def test_tp_groups_are_contiguous_and_local_ranks_follow_nodes(tp, dp, cp):
    for _ep, nodes, layout in _layouts(tp, dp, cp):
        for g in layout.groups("tp"):
            assert g == list(range(g[0], g[0] + tp))
        rpn = layout.ranks_per_node
        for rank in range(layout.world_size):
            c = layout.coord(rank)
            assert c.node * rpn + c.local_rank == rank
            assert 0 <= c.local_rank < rpn
        if (tp * dp * cp // nodes) % tp == 0:  # whole TP groups fit on a node: none spans two
            for g in layout.groups("tp"):
                assert len({layout.coord(r).node for r in g}) == 1


# ---- invalid layouts ----------------------------------------------------------------------


@pytest.mark.parametrize("tp, dp, cp", TRIPLES, ids=[f"tp{t}dp{d}cp{c}" for t, d, c in TRIPLES])
def test_ep_and_nodes_must_divide_world(tp, dp, cp):
    world = tp * dp * cp
    for bad in (k for k in range(2, world + 3) if world % k):
        with pytest.raises(ValueError) as e:
            RankLayout(tp=tp, dp=dp, cp=cp, ep=bad)
        assert str(e.value).startswith("parallel.ep:")
        assert str(_divisors(world)) in str(e.value)
        with pytest.raises(ValueError) as e:
            RankLayout(tp=tp, dp=dp, cp=cp, nodes=bad)
        assert str(e.value).startswith("parallel.nodes:")


@pytest.mark.parametrize("field", ["tp", "dp", "cp", "ep", "nodes"])
@pytest.mark.parametrize("value", [0, -1, -4, 1.0, True, "2", None])
def test_degrees_must_be_integers_ge_1(field, value):
    with pytest.raises(ValueError) as e:
        RankLayout(**{field: value})
    assert str(e.value).startswith(f"parallel.{field}:"), str(e.value)


def test_unknown_group_kind_and_rank_out_of_range():
    layout = RankLayout(tp=2, dp=2)
    with pytest.raises(ValueError, match="unknown group kind"):
        layout.groups("pp")
    for rank in (-1, 4):
        with pytest.raises(ValueError, match="outside world"):
            layout.coord(rank)


def test_from_config_reads_the_parallel_section():
    from raymoe.cluster.config import ParallelConfig

    p = ParallelConfig(tp=2, dp=3, cp=2, ep=4, nodes=2)
    assert RankLayout.from_config(p) == RankLayout(tp=2, dp=3, cp=2, ep=4, nodes=2)
