"""LocalExecutor: engine steps on an in-process ModelRunner (a world of one).

Its Ray counterpart, which fans each step out to the rank actors, is
``raymoe.actors.step_executor``.
"""

from __future__ import annotations

import asyncio
from typing import Optional, Sequence

from raymoe.actors.engine.grammar import GrammarMasks
from raymoe.actors.engine.runner import ModelRunner
from raymoe.actors.engine.step import StepInput, StepOutput


class LocalExecutor:
    """Run steps on an in-process ModelRunner (a world of one): tests and tools."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def __call__(self, inputs: Sequence[StepInput]) -> list[StepOutput]:
        assert len(inputs) == 1, "a local executor serves exactly one DP replica"
        assert self.runner.num_in_flight == 0, "steps in flight: a step run to completion cannot follow them"
        return self.runner.run_step(inputs[0], keep=0)

    async def run_step_async(
        self,
        inputs: Optional[Sequence[StepInput]],
        keep: int = 0,
        late_grammar: Optional[Sequence[Optional[GrammarMasks]]] = None,
    ) -> list[list[StepOutput]]:
        """RayStepExecutor.run_step_async's contract, in process. Yields to the event loop first,
        as a call to the ranks does, so the engine's clients run between steps."""
        await asyncio.sleep(0)
        assert inputs is None or len(inputs) == 1, "a local executor serves exactly one DP replica"
        step = None if inputs is None else inputs[0]
        late = None if late_grammar is None else late_grammar[0]
        return [[out] for out in self.runner.run_step(step, keep, late)]
