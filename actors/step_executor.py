"""RayStepExecutor: one engine step fanned out to the rank actors, each DP replica's
outputs collected from its first rank."""

from __future__ import annotations

import asyncio
import pickle
from typing import Any, Optional, Sequence

import ray
from ray.actor import ActorHandle

from raymoe.actors.engine.failures import StepTimeoutError
from raymoe.actors.engine.grammar import GrammarMasks
from raymoe.actors.engine.step import StepInput, StepOutput
from raymoe.cluster.layout import RankLayout

# The first steps on new ranks get this long, whatever engine.step_timeout_s says: GPU ranks
# compile kernels then (Triton, FlashInfer's JIT on a fresh host); CPU ranks compile nothing,
# but their first calls still warm up (lazy imports, first allocations) on a busy host.
WARMUP_STEPS = 10
WARMUP_TIMEOUT_S = {"cuda": 900.0, "cpu": 60.0}


class RayStepExecutor:
    """Fans each step out to every rank actor and collects each DP replica's result
    from its first rank. Each replica's input is put in the object store once.

    Steps travel as pickled bytes both ways: Ray passes bytes through as they are, which
    costs ~0.15 ms less per hop than its own serialization of a dataclass of numpy arrays.

    Not a Ray Compiled Graph: its channel readers busy-poll, which starves the ranks
    on a host with few cores (BENCHMARKS.md). Steps are columns of numpy arrays, so
    what each call pickles is small.
    """

    def __init__(
        self,
        layout: RankLayout,
        actors: Sequence[ActorHandle],
        step_timeout_s: float = 60.0,
        *,
        warmup_timeout_s: float = WARMUP_TIMEOUT_S["cuda"],
    ) -> None:
        """warmup_timeout_s: what the first WARMUP_STEPS steps get, if longer than step_timeout_s."""
        self.layout = layout
        self.actors = list(actors)
        self.step_timeout_s = step_timeout_s
        self.warmup_timeout_s = max(step_timeout_s, warmup_timeout_s)
        self.num_calls = 0
        self.replica_of = [layout.coord(r).dp for r in range(layout.world_size)]
        self.leaders = [layout.rank_of(d, 0, 0) for d in range(layout.dp)]

    async def run_step_async(
        self,
        inputs: Optional[Sequence[StepInput]],
        keep: int = 0,
        late_grammar: Optional[Sequence[Optional[GrammarMasks]]] = None,
    ) -> list[list[StepOutput]]:
        """Launch ``inputs`` (one per DP replica; None: no new step) on every rank, after
        handing the step launched last its grammar masks if it waits for them
        (``late_grammar``, one per replica). Returns, for each step this call completes
        (oldest first), each replica's output: every launched step but the ``keep`` newest,
        which stay in flight."""
        assert inputs is None or len(inputs) == self.layout.dp
        steps = self._per_replica(inputs)
        masks = self._per_replica(late_grammar)
        calls = [
            a.run_step.remote(steps[self.replica_of[r]], keep, masks[self.replica_of[r]])
            for r, a in enumerate(self.actors)
        ]
        self.num_calls += 1
        timeout = self.warmup_timeout_s if self.num_calls <= WARMUP_STEPS else self.step_timeout_s
        futures = [asyncio.ensure_future(c) for c in calls]
        try:  # every rank, so a failure anywhere surfaces here
            results = await asyncio.wait_for(asyncio.gather(*futures), timeout)
        except asyncio.TimeoutError:
            raise StepTimeoutError(
                f"a step took longer than {timeout:.0f} s (engine.step_timeout_s): a rank is hung"
            ) from None
        except Exception as e:
            raise await _rank_death_or(e, futures) from None
        per_replica = [pickle.loads(results[r]) for r in self.leaders]
        assert len({len(outputs) for outputs in per_replica}) == 1, "replicas completed different steps"
        return [list(outputs) for outputs in zip(*per_replica)]

    def _per_replica(self, items: Optional[Sequence[Any]]) -> list[Any]:
        """Each replica's item pickled (None stays None), in the object store once when
        several ranks read it."""
        if items is None:
            return [None] * self.layout.dp
        payloads = [None if x is None else pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL) for x in items]
        if len(self.actors) == 1:
            return payloads
        return [None if p is None else ray.put(p) for p in payloads]


async def _rank_death_or(error: BaseException, futures: list[asyncio.Future], grace_s: float = 5.0) -> BaseException:
    """A rank that died takes its peers' collectives down with it, and their errors may come
    back first: the death, if one of the step's calls reports it within ``grace_s``, else ``error``."""
    done, _ = await asyncio.wait(futures, timeout=grace_s)
    for f in done:
        cause = None if f.cancelled() else f.exception()
        if isinstance(cause, ray.exceptions.RayActorError):
            return cause
    return error
