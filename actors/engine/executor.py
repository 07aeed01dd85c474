"""Executors run one engine step on the ranks: inputs per DP replica -> outputs per replica."""
from __future__ import annotations

import asyncio
from typing import Any, Sequence

import ray

from raymoe.actors.engine.step import StepInput, StepOutput
from raymoe.cluster.layout import RankLayout


class RayStepExecutor:
    """Fans each step out to every rank actor and collects each DP replica's result
    from its first rank. Each replica's input is put in the object store once.

    (A Ray Compiled Graph moves a step in tens of microseconds instead of an actor
    call's ~1 ms each way, and was tried: its channel readers busy-poll, which on a
    2-core machine starved the ranks until a step stalled for minutes, and it could
    not be verified on a GPU host. Steps are columns of numpy arrays, so what each
    call pickles is small.)
    """

    def __init__(self, layout: RankLayout, actors: Sequence[Any]) -> None:
        self.layout = layout
        self.actors = list(actors)
        self.replica_of = [layout.coord(r).dp for r in range(layout.world_size)]
        self.leaders = [layout.rank_of(d, 0, 0) for d in range(layout.dp)]

    async def run_async(self, inputs: Sequence[StepInput]) -> list[StepOutput]:
        assert len(inputs) == self.layout.dp
        refs = [ray.put(x) for x in inputs] if len(self.actors) > 1 else list(inputs)
        calls = [a.execute_step.remote(refs[self.replica_of[r]]) for r, a in enumerate(self.actors)]
        results = await asyncio.gather(*calls)  # every rank, so a failure anywhere surfaces here
        return [results[r] for r in self.leaders]


class LocalExecutor:
    """Run steps on an in-process ModelRunner (a world of one): tests and tools."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner

    def __call__(self, inputs: Sequence[StepInput]) -> list[StepOutput]:
        assert len(inputs) == 1, "a local executor serves exactly one DP replica"
        return [self.runner.execute(inputs[0])]
