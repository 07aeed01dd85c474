"""The controller's EPLB generator against fake ranks: a rebalance is planned and its
moves proceed over several steps, a request during one is refused, and no plan is ever
made on a window with no routed tokens (it says "not enough load recorded")."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from raymoe.actors.engine.eplb import (
    GAVE_UP,
    NOT_ENOUGH_LOAD,
    EplbManager,
    RebalanceRefused,
    logical_load_tensor,
    plan_in_thread,
)
from raymoe.cluster.config import EplbConfig
from raymoe.cluster.expert_slots import default_expert_slots
from raymoe.cluster.layout import RankLayout

EP, LAYERS, EXPERTS, SLOTS = 2, 3, 8, 10


class FakeRanks:
    """Every rank's calls answered by one object: recorded load, moves that land after
    ``steps_to_land`` polls."""

    def __init__(self, steps_to_land: int) -> None:
        self.load = torch.zeros(LAYERS, SLOTS)
        self.steps_to_land, self.polls = steps_to_land, 0
        self.calls: list[str] = []
        self.moved_layers: list[int] = []

    def call_async(self, method: str, *args):
        self.calls.append(method)
        result = getattr(self, method)(*args)

        async def answer():
            return result

        return [answer() for _ in range(EP)]

    def take_expert_load(self) -> torch.Tensor:
        out, self.load = self.load, torch.zeros(LAYERS, SLOTS)
        return out

    def start_expert_moves(self, chunks) -> None:
        self.chunks, self.done, self.polls = list(chunks), 0, 0

    def advance_expert_moves(self) -> None:
        pass

    def expert_moves_progress(self) -> tuple[int, bool]:
        """A chunk lands every ``steps_to_land`` polls."""
        self.polls += 1
        if self.chunks and self.polls > self.steps_to_land:
            self.moved_layers += self.chunks.pop(0).moe_layers
            self.polls = 0
        return len(self.moved_layers), bool(self.chunks)


def _manager(ranks: FakeRanks, planner=plan_in_thread, call_timeout_s=None, **config) -> EplbManager:
    return EplbManager(
        EplbConfig(enabled=True, num_redundant_experts=SLOTS - EXPERTS, **config),
        RankLayout(dp=EP, ep=EP),
        ranks,
        physical_to_logical=default_expert_slots(LAYERS, EXPERTS, SLOTS),
        num_logical=EXPERTS,
        bytes_per_expert=1,
        planner=planner,
        call_timeout_s=call_timeout_s,
    )


def _skewed_physical_load() -> torch.Tensor:
    """A window of ~59k routed tokens per layer."""
    load = torch.full((LAYERS, SLOTS), 1000.0)
    load[:, 2] = 50_000.0  # slot 2 holds expert 2 (its only copy) in the default slots: hot in every layer
    return load


async def _steps_until(manager: EplbManager, done, limit: int = 2000) -> int:
    for n in range(limit):
        if done():
            return n
        await asyncio.sleep(0.001)  # the step itself (the planner thread runs meanwhile)
        await manager.on_step()
    raise AssertionError("never happened")


def test_a_rebalance_plans_on_the_recorded_load_and_moves_over_several_steps():
    async def main():
        ranks = FakeRanks(steps_to_land=3)
        manager = _manager(ranks, layers_per_chunk=1)
        await manager.on_step()  # opens the window
        ranks.load = _skewed_physical_load()
        planned = manager.request()
        with pytest.raises(RebalanceRefused, match="under way"):
            manager.request()  # one at a time
        await _steps_until(manager, planned.done)
        assert planned.result() is None and manager.status["state"] == "moving"
        with pytest.raises(RebalanceRefused, match="under way"):
            manager.request()
        steps = await _steps_until(manager, lambda: manager.status["rebalances"] == 1)
        status = manager.status
        assert status["rebalances"] == 1 and status["balancedness_after"] > status["balancedness_before"]
        assert sorted(ranks.moved_layers) == list(range(LAYERS)) and status["layers_done"] == LAYERS
        assert steps >= LAYERS * ranks.steps_to_land  # each chunk's copies took steps to land
        assert status["rebalance_steps"] >= LAYERS * ranks.steps_to_land
        assert torch.equal(manager.physical_to_logical, manager.last_plan.physical_to_logical)

    asyncio.run(main())


def test_no_plan_on_a_window_without_tokens():
    async def main():
        ranks = FakeRanks(steps_to_land=0)
        manager = _manager(ranks)
        await manager.on_step()
        ranks.load = _skewed_physical_load()
        first = manager.request()
        await _steps_until(manager, lambda: manager.status["rebalances"] == 1)
        assert first.done() and manager.status["rebalances"] == 1
        plan = manager.last_plan
        # right after it: the new window is empty
        again = manager.request()
        await _steps_until(manager, again.done)
        with pytest.raises(RebalanceRefused, match="not enough load recorded"):
            again.result()
        assert manager.status["rebalances"] == 1 and manager.last_plan is plan
        assert manager.status["skipped"] == NOT_ENOUGH_LOAD and not manager.busy
        # a load given with the request needs no window
        explicit = manager.request(torch.rand(LAYERS, EXPERTS) + 1)
        await _steps_until(manager, explicit.done)
        assert explicit.exception() is None and "skipped" not in manager.status

    asyncio.run(main())


def test_periodic_rebalances_skip_empty_windows():
    async def main():
        ranks = FakeRanks(steps_to_land=0)
        manager = _manager(ranks, rebalance_every_steps=2)
        for _ in range(10):
            await asyncio.sleep(0.001)
            await manager.on_step()
        assert ranks.calls.count("take_expert_load") >= 4  # windows opened and read
        assert manager.last_plan is None and manager.status["rebalances"] == 0
        assert manager.status["skipped"] == NOT_ENOUGH_LOAD and "start_expert_moves" not in ranks.calls

    asyncio.run(main())


def test_a_wrongly_shaped_load_is_refused_naming_it():
    async def main():
        manager = _manager(FakeRanks(steps_to_land=0))
        with pytest.raises(ValueError, match=r"logical_load: expected shape \[3, 8\]"):
            manager.request(torch.ones(3, 7))

    asyncio.run(main())


@pytest.mark.parametrize(
    "load",
    ["abc", {}, [], [[]], [[None]], [[True, 1]], [[1, 2], [3]], [[10**400]], [[1e308]], [[float("nan")]], [[-1]]],
)
def test_a_load_that_is_not_counts_is_refused_naming_it(load):
    with pytest.raises(ValueError, match=r"^logical_load: "):
        logical_load_tensor(load)


def test_a_load_of_counts_becomes_float64_layers_by_experts():
    load = logical_load_tensor([[0, 1.5, 2**53], [3, 4, 5]])
    assert load.dtype == torch.float64 and load.tolist() == [[0, 1.5, 2.0**53], [3, 4, 5]]


def test_close_cancels_calls_the_ranks_never_answer(caplog):
    """Shutdown during a rebalance: the calls still out to the ranks are cancelled, so no
    "exception was never retrieved" when the ranks go away."""

    class Hanging(FakeRanks):
        def call_async(self, method: str, *args):
            if method == "expert_moves_progress":
                self.calls.append(method)
                return [asyncio.get_running_loop().create_future() for _ in range(EP)]  # never answered
            return super().call_async(method, *args)

    async def main():
        ranks = Hanging(steps_to_land=0)
        manager = _manager(ranks)
        await manager.on_step()
        ranks.load = _skewed_physical_load()
        planned = manager.request()
        await _steps_until(manager, lambda: planned.done() and "expert_moves_progress" in ranks.calls)
        assert manager._calls and manager.status["state"] == "moving"
        manager.close()
        await asyncio.sleep(0.01)
        assert not manager._calls

    with caplog.at_level("ERROR"):
        asyncio.run(main())
    assert "never retrieved" not in caplog.text


def test_a_planner_that_fails_ends_its_rebalance_not_the_engine():
    """The planner raises (its worker died, or a bug): the steps go on, the request is refused
    naming the failure, the experts stay put, and the next rebalance plans and moves."""
    failures = [RuntimeError("planner worker gone")]

    async def planner(*args, **kwargs):
        if failures:
            raise failures.pop()
        return await plan_in_thread(*args, **kwargs)

    async def main():
        ranks = FakeRanks(steps_to_land=0)
        manager = _manager(ranks, planner=planner)
        await manager.on_step()
        before = manager.physical_to_logical.clone()
        ranks.load = _skewed_physical_load()
        failed = manager.request()
        await _steps_until(manager, failed.done)  # on_step raising would fail the engine's loop
        with pytest.raises(RebalanceRefused, match=r"planning failed \(RuntimeError"):
            failed.result()
        assert "planning failed" in manager.status["skipped"] and not manager.busy
        assert "start_expert_moves" not in ranks.calls and torch.equal(manager.physical_to_logical, before)
        await _next_rebalance_moves(manager, before)

    asyncio.run(main())


def test_a_plan_made_after_its_request_gave_up_is_dropped():
    """The caller stops waiting while the planner thinks (the controller's wait timed out, so it
    told its client the rebalance did not start): when the plan comes, nothing moves, the
    status says why, and the next request plans and moves."""
    release = asyncio.Event()

    async def slow_planner(*args, **kwargs):
        if not release.is_set():
            await release.wait()
        return await plan_in_thread(*args, **kwargs)

    async def main():
        ranks = FakeRanks(steps_to_land=0)
        manager = _manager(ranks, planner=slow_planner)
        await manager.on_step()
        before = manager.physical_to_logical.clone()
        ranks.load = _skewed_physical_load()
        planned = manager.request()
        await _steps_until(manager, lambda: manager.status["state"] == "planning")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(planned, 0.01)  # what Controller.rebalance does, at a short timeout
        release.set()
        await _steps_until(manager, lambda: not manager.busy)
        assert manager.status["skipped"] == GAVE_UP and manager.last_plan is None
        assert "start_expert_moves" not in ranks.calls and torch.equal(manager.physical_to_logical, before)
        await _next_rebalance_moves(manager, before)

    asyncio.run(main())


def test_close_stops_the_planning():
    """Shutdown while the planner thinks: its call is cancelled (PlannerClient's timeout, firing
    later, would kill the worker and start a new one for an engine that is gone)."""
    cancelled = asyncio.Event()

    async def hung_planner(*args, **kwargs):
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def main():
        ranks = FakeRanks(steps_to_land=0)
        manager = _manager(ranks, planner=hung_planner)
        await manager.on_step()
        ranks.load = _skewed_physical_load()
        manager.request()
        await _steps_until(manager, lambda: manager._planning is not None)
        await asyncio.sleep(0.01)  # the planner is waiting
        manager.close()
        await asyncio.wait_for(cancelled.wait(), 5)

    asyncio.run(main())


def test_a_rank_hung_during_moves_while_idle_is_a_step_timeout():
    """No step runs, so the manager drives the moves itself: a rank that never answers was
    waited on for good (requests then hung with /health ok). Past call_timeout_s it raises
    StepTimeoutError, which the engine's loop recovers from as from a hung step."""
    from raymoe.actors.engine.failures import StepTimeoutError

    class Hung(FakeRanks):
        def call_async(self, method, *args):
            if method != "advance_expert_moves":
                return super().call_async(method, *args)
            self.calls.append(method)
            return [asyncio.get_running_loop().create_future() for _ in range(EP)]  # never answered

    async def main():
        ranks = Hung(steps_to_land=0)
        manager = _manager(ranks, call_timeout_s=0.2)
        await manager.on_step()
        manager.request(_skewed_physical_load()[:, :EXPERTS])
        t0 = time.monotonic()
        with pytest.raises(StepTimeoutError, match="advance_expert_moves took over 0.2 s"):
            for _ in range(2000):
                await manager.on_step(after_step=False)
        assert time.monotonic() - t0 < 10 and manager.status["state"] == "moving"
        manager.close()

    asyncio.run(main())


@pytest.mark.parametrize("hung_at", ["window", "reading"])
def test_a_rank_hung_before_planning_while_idle_is_a_step_timeout(hung_at):
    """A rebalance on the recorded load while no step runs: a rank that never answers the
    window's load (or the read of it) was waited on for good, holding the engine's loop (no
    request ran again, /health ok). Past call_timeout_s it raises StepTimeoutError."""
    from raymoe.actors.engine.failures import StepTimeoutError

    class Hung(FakeRanks):
        reads = 0

        def call_async(self, method, *args):
            self.reads += method == "take_expert_load"
            # the window opens with the first read; the rebalance reads it with the second
            if method != "take_expert_load" or (hung_at == "reading") != (self.reads == 2):
                return super().call_async(method, *args)
            self.calls.append(method)
            return [asyncio.get_running_loop().create_future() for _ in range(EP)]  # never answered

    async def main():
        manager = _manager(Hung(steps_to_land=0), call_timeout_s=0.2)
        await manager.on_step(after_step=False)
        asked = manager.request()
        t0 = time.monotonic()
        with pytest.raises(StepTimeoutError, match="take_expert_load took over 0.2 s"):
            for _ in range(2000):
                await asyncio.wait_for(manager.on_step(after_step=False), 5)
        assert time.monotonic() - t0 < 5 and manager.status["state"] == "planning"
        manager.close("the rank group restarted")
        with pytest.raises(RebalanceRefused, match="the rank group restarted"):
            asked.result()

    asyncio.run(main())


def test_a_load_read_behind_slow_steps_is_no_timeout():
    """While steps run, a read of the load waits behind the steps in flight, however long they
    take (the executor times those): only waiting with no step running counts as a hang."""

    class Slow(FakeRanks):
        def call_async(self, method, *args):
            if method != "take_expert_load":
                return super().call_async(method, *args)
            self.calls.append(method)
            load = self.take_expert_load()

            async def answer():
                await asyncio.sleep(0.3)  # behind two steps of 0.15 s
                return load

            return [answer() for _ in range(EP)]

    async def main():
        ranks = Slow(steps_to_land=0)
        manager = _manager(ranks, call_timeout_s=0.2)
        await manager.on_step()
        ranks.load = _skewed_physical_load()
        asked = manager.request()
        for _ in range(200):
            if asked.done():
                break
            await asyncio.sleep(0.05)
            await manager.on_step()
        asked.result()
        await _steps_until(manager, lambda: manager.status["rebalances"] == 1)

    asyncio.run(main())


def test_a_rebalance_asked_after_close_is_refused_at_once():
    """The controller keeps a closed manager while the rank group restarts (or for good once
    it is down): a rebalance asked of it then waited planning_timeout_s + 60 s for nothing."""

    async def main():
        manager = _manager(FakeRanks(steps_to_land=0))
        manager.close("the rank group is restarting")
        with pytest.raises(RebalanceRefused, match="the rank group is restarting: ask again"):
            manager.request(_skewed_physical_load()[:, :EXPERTS])

    asyncio.run(main())


def test_close_refuses_the_rebalance_asked_for_saying_why():
    """The rank group restarts while a rebalance waits for its plan (or has not started): its
    caller is told at once (it waited planning_timeout_s + 60 s for a future nobody resolved)."""
    release = asyncio.Event()

    async def slow_planner(*args, **kwargs):
        await release.wait()
        return await plan_in_thread(*args, **kwargs)

    async def main():
        ranks = FakeRanks(steps_to_land=0)
        planning = _manager(ranks, planner=slow_planner)
        await planning.on_step()
        ranks.load = _skewed_physical_load()
        under_way = planning.request()
        await _steps_until(planning, lambda: planning._planning is not None)
        idle = _manager(FakeRanks(steps_to_land=0))
        asked = idle.request(_skewed_physical_load()[:, :EXPERTS])  # no step has taken it yet
        for manager in (planning, idle):
            manager.close("the rank group restarted")
        for future in (under_way, asked):
            with pytest.raises(RebalanceRefused, match="the rank group restarted: ask again"):
                future.result()
        release.set()

    asyncio.run(main())


async def _next_rebalance_moves(manager: EplbManager, before: torch.Tensor) -> None:
    """After a skipped rebalance: the next request plans and moves the experts."""
    again = manager.request(_skewed_physical_load()[:, :EXPERTS])
    await _steps_until(manager, lambda: manager.status["rebalances"] == 1)
    assert again.exception() is None and "skipped" not in manager.status
    assert not torch.equal(manager.physical_to_logical, before)
