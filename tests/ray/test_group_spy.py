"""Every collective of a model served with context parallelism goes over the group it must.

A spy installed on every rank before generating records each GroupCoordinator collective
as (caller, method, group, group size, caller's file) and each torch.distributed call as
(caller, the GroupCoordinator method it runs for, the function, which group object it was
given, that group's backend and members). The caller is the first stack frame outside
comm/group.py; for a PartialSum's sum it is where the PartialSum was made, since that
decides what is summed. Then, for every layout:

1. CPU-side coordination (barrier, all_true, all_gather_object, gather_failures, and any
   torch.distributed object or barrier call raymoe makes itself) goes over a cpu group,
   which is gloo; tensor collectives go over the device group.
2. Each (caller, method) uses the group the table below gives it, and no collective is
   missing from the table: a new one must be added to it consciously. Attention-side
   code uses attention groups only.
3. Only the MoE groups reach past a rank's data-parallel replica.
"""

from __future__ import annotations

import functools
import inspect
import os
import random
import sys
import threading
import time
from typing import Any, Callable

import pytest
import ray
import torch
import torch.distributed as dist
from model_zoo import write_checkpoint

from raymoe.actors.models import layers
from raymoe.cluster.config import config_from_dict
from raymoe.cluster.layout import GROUP_KINDS, RankLayout
from raymoe.comm import group as group_module
from raymoe.comm.group import GroupCoordinator
from raymoe.deploy import LLM, SamplingParams

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

COORDINATOR_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "p2p_ops",
    "all_reduce_add_rms_norm",
    "barrier",
    "all_true",
    "all_gather_object",
    "gather_failures",
)
CPU_SIDE_METHODS = ("barrier", "all_true", "all_gather_object", "gather_failures")
OBJECT_AND_BARRIER_CALLS = (
    "barrier",
    "monitored_barrier",
    "all_gather_object",
    "broadcast_object_list",
    "gather_object",
    "scatter_object_list",
    "all_gather",
)
TORCH_CALLS = OBJECT_AND_BARRIER_CALLS + ("all_reduce", "broadcast", "batch_isend_irecv")
# the tensor-output collectives comm/group.py binds at import (torch renamed them)
GROUP_MODULE_CALLS = ("_all_gather_single", "_reduce_scatter_single")

MOE_KINDS = ("world", "dp", "ep", "moe_tp", "ep_moves")
ATTENTION_KINDS = ("tp", "cp", "attn")
ATTENTION_SIDE_FILES = (
    "actors/engine/attention_",
    "actors/models/decoder.py",
    "actors/models/latent_attention.py",
    "actors/models/layers.py",
)

# (caller, GroupCoordinator method) -> the group it must use (a tuple: the groups it uses in turn)
ATTENTION_GROUPS = {
    ("VocabParallelEmbedding.forward", "all_reduce"): "tp",  # vocabulary rows over tp
    ("TorchAttention._attend", "all_gather"): "cp",  # the step's queries, then the partial attentions
    ("ModelRunner.forward_eager", "all_gather"): "cp",  # the step's rows for sampling
    ("PartialSum from AttentionBlock.forward", "all_reduce_add_rms_norm"): "tp",  # o_proj: heads over tp
    ("PartialSum from LatentAttention.forward", "all_reduce_add_rms_norm"): "tp",
    ("PartialSum from DenseMLP.forward", "all_reduce_add_rms_norm"): "tp",
    ("ParallelLMHead.greedy", "all_gather"): "tp",
    ("ParallelLMHead.gather", "all_gather"): "tp",
}
# each cp rank runs its own tokens: the MoE gathers them over cp, sums over the replica's
# attention ranks, and keeps its own rows
MOE_GROUPS_ONE_REPLICA = {
    ("MoE._forward_split", "all_gather"): "cp",
    ("MoE._forward_split", "all_reduce"): "attn",
}
# dp > 1: then over dp too (gathered, and summed with a reduce-scatter); the replicas agree on
# their padding and real rows once a step
MOE_GROUPS_REPLICAS = {
    ("MoE._forward_split", "all_gather"): ("cp", "dp"),
    ("MoE._forward_split", "reduce_scatter"): "dp",
    ("MoE._forward_split", "all_reduce"): "attn",
    ("ModelRunner._token_split", "all_gather"): "dp",
}
EPLB_GROUPS = {
    ("ExpertMover.advance", "all_true"): "world",
    ("receive_expert_copies", "p2p_ops"): "ep_moves",
}
# Controller.barrier(kind), which the test calls for every kind
BARRIER_CALLER = ("RankWorker.barrier", "barrier")


def expected_groups(layout: RankLayout) -> dict[tuple[str, str], str]:
    moe = MOE_GROUPS_REPLICAS if layout.dp > 1 else MOE_GROUPS_ONE_REPLICA
    return {**ATTENTION_GROUPS, **moe, **EPLB_GROUPS}


# ---- the spy (runs on the ranks) ---------------------------------------------------


class GroupSpy:
    """What one rank's collectives used: ``calls`` (GroupCoordinator level) and
    ``torch_calls`` (torch.distributed level), sets of small tuples."""

    def __init__(self, ctx: Any) -> None:
        self.calls: set[tuple] = set()
        self.torch_calls: set[tuple] = set()
        self.coordinators = [ctx.groups[kind] for kind in GROUP_KINDS]
        if ctx.groups.ep_moves is not None:
            self.coordinators.append(ctx.groups.ep_moves)
        group_file = GroupCoordinator.all_reduce.__code__.co_filename
        self.skip = {group_file, GroupSpy.caller.__code__.co_filename}
        self.repo = os.path.dirname(os.path.dirname(group_file))
        self._local = threading.local()

    def stack(self) -> list[tuple[str, GroupCoordinator]]:
        """The GroupCoordinator methods running in this thread, outermost first."""
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def caller(self) -> tuple[str, str]:
        """(qualname, file relative to the repository) of the first frame outside comm/group.py
        and the spy; a PartialSum's sum is named after where the PartialSum was made."""
        frame = sys._getframe(1)
        while frame.f_code.co_filename in self.skip:
            frame = frame.f_back
        code = frame.f_code
        if code.co_qualname == "PartialSum.add_rms_norm":
            return frame.f_locals["self"]._spy_made_in
        return code.co_qualname, os.path.relpath(code.co_filename, self.repo)

    def label(self, group: Any) -> str:
        """Which group object ``group`` is: "<kind>.cpu_group", "<kind>.device_group", "default"
        (the world's), or "<kind>.other" / "unknown" for one no coordinator of this rank holds."""
        if group is None:
            return "default"
        stack = self.stack()
        candidates = [stack[-1][1]] if stack else self.coordinators
        for c in candidates:
            if group is c.cpu_group:
                return f"{c.name}.cpu_group"
            if group is c.device_group:
                return f"{c.name}.device_group"
        return f"{stack[-1][1].name}.other" if stack else "unknown"


def spy_method(spy: GroupSpy, name: str, original: Callable) -> Callable:
    @functools.wraps(original)
    def spied(coordinator: GroupCoordinator, *args: Any, **kwargs: Any) -> Any:
        stack = spy.stack()
        if not stack:  # an inner call (gather_failures -> all_gather_object) has the same caller
            caller, where = spy.caller()
            spy.calls.add((caller, name, coordinator.name, coordinator.world_size, where))
        stack.append((name, coordinator))
        try:
            return original(coordinator, *args, **kwargs)
        finally:
            stack.pop()

    return spied


def spy_torch_call(spy: GroupSpy, name: str, original: Callable) -> Callable:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def spied(*args: Any, **kwargs: Any) -> Any:
        if name == "batch_isend_irecv":
            group = args[0][0].group if args and args[0] else None
        else:
            group = signature.bind_partial(*args, **kwargs).arguments.get("group")
        stack = spy.stack()
        via = stack[0][0] if stack else ""
        caller, where = spy.caller()
        members = (
            tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(dist.get_world_size()))
        )
        spy.torch_calls.add((caller, where, via, name, spy.label(group), dist.get_backend(group), members))
        return original(*args, **kwargs)

    return spied


def spy_partial_sums(spy: GroupSpy) -> None:
    original = layers.PartialSum.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        made_in, where = spy.caller()
        object.__setattr__(self, "_spy_made_in", (f"PartialSum from {made_in}", where))  # a frozen dataclass

    layers.PartialSum.__init__ = init


def install_spy(ctx: Any) -> None:
    """Wrap, in this rank's process, GroupCoordinator's collectives and torch.distributed's calls."""
    assert "group_spy" not in ctx.state, "spy installed twice"
    spy = ctx.state["group_spy"] = GroupSpy(ctx)
    for name in COORDINATOR_COLLECTIVES:
        setattr(GroupCoordinator, name, spy_method(spy, name, getattr(GroupCoordinator, name)))
    for name in TORCH_CALLS:
        setattr(dist, name, spy_torch_call(spy, name, getattr(dist, name)))
    for name in GROUP_MODULE_CALLS:
        setattr(group_module, name, spy_torch_call(spy, name, getattr(group_module, name)))
    spy_partial_sums(spy)


def take_records(ctx: Any) -> dict[str, Any]:
    spy = ctx.state["group_spy"]
    members = {c.name: tuple(c.ranks) for c in spy.coordinators}
    return {"rank": ctx.rank, "calls": set(spy.calls), "torch_calls": set(spy.torch_calls), "members": members}


# ---- the checks (run in the test) ------------------------------------------------------


def cpu_side_failures(torch_calls: set[tuple]) -> list[str]:
    """Check 1: CPU-side coordination over gloo cpu groups; tensor collectives over device groups."""
    failures = []
    for caller, where, via, name, label, backend, _ in sorted(torch_calls):
        what = f"{caller} ({where}) -> {via or 'torch.distributed'}: {name} over {label} ({backend})"
        if via in CPU_SIDE_METHODS or (not via and name in OBJECT_AND_BARRIER_CALLS):
            if not label.endswith(".cpu_group") or backend != "gloo":
                failures.append(f"CPU-side call not over a gloo cpu group: {what}")
        elif via and not label.endswith(".device_group"):
            failures.append(f"tensor collective not over its device group: {what}")
    return failures


def group_failures(calls: set[tuple], layout: RankLayout) -> list[str]:
    """Check 2: each (caller, method) uses the table's group; attention-side code attention groups."""
    expected = expected_groups(layout)
    failures = []
    for caller, method, group, size, where in sorted(calls):
        if (caller, method) == BARRIER_CALLER:
            continue  # the kind the test asked for
        want = expected.get((caller, method))
        if want is None:
            failures.append(f"not in the table: ({caller!r}, {method!r}) over {group!r} ({where})")
        elif group not in (want if isinstance(want, tuple) else (want,)):
            failures.append(f"wrong group: {caller} ({where}) {method} over {group!r} (size {size}), want {want!r}")
        if where.startswith(ATTENTION_SIDE_FILES) and group not in ATTENTION_KINDS:
            failures.append(f"attention-side {caller} ({where}) {method} over {group!r}, not an attention group")
    return failures


def replica_failures(records: dict[str, Any], layout: RankLayout) -> list[str]:
    """Check 3: only the MoE groups reach past this rank's replica, and every group has the
    layout's members for its kind."""
    me = layout.coord(records["rank"])
    replica = {layout.rank_of(me.dp, c, t) for c in range(layout.cp) for t in range(layout.tp)}
    failures = []
    for name, members in sorted(records["members"].items()):
        kind = "ep" if name == "ep_moves" else name
        mine = next(g for g in layout.groups(kind) if me.rank in g)
        if list(members) != mine:
            failures.append(f"group {name} has members {list(members)}, the layout says {mine}")
    used = {group for _, _, group, _, _ in records["calls"]}
    for name in sorted(used - set(MOE_KINDS)):
        if not set(records["members"][name]) <= replica:
            failures.append(f"{name} {list(records['members'][name])} reaches past replica {sorted(replica)}")
    for caller, where, via, name, label, _, members in sorted(records["torch_calls"]):
        if label.split(".")[0] not in MOE_KINDS and not set(members) <= replica:
            failures.append(
                f"{caller} ({where}) {via} {name} over {label} {list(members)} reaches past {sorted(replica)}"
            )
    return failures


# ---- serving ------------------------------------------------------------------------------

# (kind, tp, cp, dp, ep, eplb): every cp > 1 layout of 4 ranks at most
LAYOUTS = [
    ("qwen3_moe", 1, 2, 1, 2, False),
    ("qwen3_moe", 2, 2, 1, 4, False),
    ("qwen3_moe", 2, 2, 1, 2, False),  # ep < world: moe_tp 2
    ("qwen3_moe", 1, 4, 1, 4, False),
    ("qwen3_moe", 1, 2, 2, 2, True),  # ep < world, dp > 1, experts moving (all_true, p2p)
    ("deepseek_v3", 1, 2, 2, 4, False),  # latent attention
]
PROMPT_LENGTHS = (3, 19, 30)  # up to four blocks of 8: every cp rank holds keys of each
SAMPLING = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    made = {}

    def checkpoint(kind: str):
        if kind not in made:
            made[kind] = write_checkpoint(kind, root / kind)
        return made[kind]

    return checkpoint


def serve_and_record(path, tp: int, cp: int, dp: int, ep: int, eplb: bool) -> list[dict[str, Any]]:
    """Generate with the spy on every rank, barrier over every group kind; each rank's records."""
    config = config_from_dict(
        {
            "model": {"path": str(path), "dtype": "float32"},
            "parallel": {"tp": tp, "cp": cp, "dp": dp, "ep": ep, "device": "cpu"},
            "engine": {"block_size": 8, "num_kv_blocks": 32},
            "eplb": {"enabled": eplb, "num_redundant_experts": ep if eplb else 0, "rebalance_every_steps": 10**6},
        }
    )
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in PROMPT_LENGTHS]
    with LLM(config) as llm:
        controller = llm.controller
        ray.get(controller.run_on_ranks.remote(install_spy))
        if eplb:
            moe_layers = len(
                ray.get(controller.run_on_ranks.remote(lambda ctx: ctx.state["runner"].spec.moe_layers))[0]
            )
            hot = torch.ones(8)
            hot[0], hot[5] = 60.0, 25.0
            ray.get(controller.rebalance.remote(((torch.rand(moe_layers, 8) + hot) * 1000).tolist()))
        llm.generate(prompts, SAMPLING)
        for kind in GROUP_KINDS:
            ray.get(controller.barrier.remote(kind))
        if eplb:  # the moves finish while the engine idles
            deadline = time.monotonic() + 30
            while ray.get(controller.eplb_status.remote())["rebalances"] < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert ray.get(controller.eplb_status.remote())["rebalances"] == 1, "the experts did not move"
        return ray.get(controller.run_on_ranks.remote(take_records))


@pytest.mark.parametrize(
    "kind,tp,cp,dp,ep,eplb",
    LAYOUTS,
    ids=[f"{k}-tp{t}-cp{c}-dp{d}-ep{e}" + ("-eplb" if m else "") for k, t, c, d, e, m in LAYOUTS],
)
def test_every_collective_uses_the_right_group(ray_session, checkpoints, kind, tp, cp, dp, ep, eplb):
    layout = RankLayout(tp=tp, cp=cp, dp=dp, ep=ep)
    everyone = serve_and_record(checkpoints(kind), tp, cp, dp, ep, eplb)
    failures = []
    for records in everyone:
        rank_failures = (
            cpu_side_failures(records["torch_calls"])
            + group_failures(records["calls"], layout)
            + replica_failures(records, layout)
        )
        failures += [f"rank {records['rank']}: {f}" for f in rank_failures]
    assert not failures, f"{layout.describe()}:\n" + "\n".join(failures)

    # the spy saw what it checks: the cp merge, the head sums, the MoE sums, a barrier per kind
    seen = set().union(*({(c, m, g) for c, m, g, _, _ in r["calls"]} for r in everyone))
    attention = "LatentAttention" if kind.startswith("deepseek") else "AttentionBlock"
    must = {
        ("TorchAttention._attend", "all_gather", "cp"),
        (f"PartialSum from {attention}.forward", "all_reduce_add_rms_norm", "tp"),
        *(
            (c, m, g)
            for (c, m), want in (MOE_GROUPS_REPLICAS if dp > 1 else MOE_GROUPS_ONE_REPLICA).items()
            for g in (want if isinstance(want, tuple) else (want,))
        ),
        *(("RankWorker.barrier", "barrier", kind) for kind in GROUP_KINDS),
    }
    if eplb:
        must |= {(c, m, g) for (c, m), g in EPLB_GROUPS.items()}
    assert must <= seen, f"{layout.describe()}: never seen: {sorted(must - seen)}"
    cpu_calls = {r for records in everyone for r in records["torch_calls"] if r[2] in CPU_SIDE_METHODS}
    assert cpu_calls, "no CPU-side call reached torch.distributed"
