"""EngineCore: the engine's policy loop, independent of where steps run.

One Scheduler per DP replica. Each ``step``: every replica's scheduler picks
its chunks, an executor runs the step on the ranks (all replicas in lockstep:
MoE layers span the whole world), then sampled tokens are applied, stop
conditions checked and text detokenised. No torch, no ray here: executors
(Ray rank actors, or an in-process runner) are passed in.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

from raymoe.actors.engine.detokenizer import IncrementalDetokenizer
from raymoe.actors.engine.request import PENDING_TOKEN, Request, SamplingParams
from raymoe.actors.engine.scheduler import Scheduler
from raymoe.actors.engine.step import StepInput, StepOutput, pack_step
from raymoe.actors.engine.tokenizer import Tokenizer

Executor = Callable[[Sequence[StepInput]], Sequence[StepOutput]]


@dataclass
class RequestOutput:
    """What changed for one request in one step (deltas), plus running totals."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: Optional[str]  # "stop" | "length" | "abort" once finished
    num_prompt_tokens: int
    num_output_tokens: int
    logits: Any = None  # this token's logits row [vocab], only when the core collects logits


@dataclass
class PlannedStep:
    inputs: list[StepInput]  # what each replica's ranks run
    pending: list[list]  # per replica: Scheduler.advance's (request, output index) per sampled row


class EngineCore:
    def __init__(
        self,
        schedulers: Sequence[Scheduler],
        tokenizer: Tokenizer,
        execute: Optional[Executor] = None,
        seed: Optional[int] = None,
        collect_logits: bool = False,
    ) -> None:
        self.schedulers = list(schedulers)
        self.block_size = self.schedulers[0].block_manager.block_size
        self.collect_logits = collect_logits  # tests compare logits with a reference
        self.tokenizer = tokenizer
        self.execute = execute
        self._rng = random.Random(seed)
        self._replica: dict[str, int] = {}  # request id -> DP replica
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._arrivals = itertools.count()
        self.num_steps = 0
        self.num_preemptions = 0
        self._last_rows: list[dict[str, int]] = [{} for _ in self.schedulers]  # request id -> sampled row, last step

    @property
    def has_unfinished(self) -> bool:
        return bool(self._replica)

    def add_request(self, request_id: str, prompt_token_ids: Sequence[int], sampling: SamplingParams) -> None:
        """Queue a request on the least-loaded DP replica. ValueError if it can never run."""
        if request_id in self._replica:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        req = Request(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            sampling=sampling,
            seed=sampling.seed if sampling.seed is not None else self._rng.getrandbits(63),
            arrival=next(self._arrivals),
            eos_token_ids=frozenset() if sampling.ignore_eos else self.tokenizer.eos_token_ids,
        )
        replica = min(range(len(self.schedulers)), key=lambda i: self._load(i))
        self.schedulers[replica].add(req)  # validates lengths against max_model_len and the cache
        self._replica[request_id] = replica
        self._detok[request_id] = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, sampling.stop)

    def abort(self, request_id: str) -> Optional[RequestOutput]:
        replica = self._replica.pop(request_id, None)
        if replica is None:
            return None
        req = self.schedulers[replica].abort(request_id)
        self._detok.pop(request_id, None)
        assert req is not None
        done = sum(t != PENDING_TOKEN for t in req.output_token_ids)
        return RequestOutput(request_id, [], "", True, "abort", req.num_prompt_tokens, done)

    def step(self) -> list[RequestOutput]:
        """Run one engine step over every DP replica; returns the requests that progressed."""
        assert self.execute is not None, "step() needs an executor; async callers use schedule() and apply()"
        planned = self.schedule()
        return self.apply(planned, self.execute(planned.inputs)) if planned else []

    def schedule(self) -> Optional["PlannedStep"]:
        """First half of a step: every replica's chunks, or None when there is nothing to run.

        The step counts as handed to the ranks (callers must run every step returned, in
        order): its sampled tokens are pending until ``apply``, and the next step may be
        scheduled before that (its decode chunks then read their token from the ranks'
        last sampling: ``StepInput.prev_rows``).
        """
        scheduled = [s.schedule() for s in self.schedulers]
        self.num_preemptions += sum(len(o.preempted) for o in scheduled)
        counts = tuple(o.num_tokens for o in scheduled)
        if not any(counts):
            return None
        all_decode = all(len(c.token_ids) == 1 and c.sample for o in scheduled for c in o.chunks)
        inputs, pending = [], []
        for replica, (sched, out) in enumerate(zip(self.schedulers, scheduled)):
            last_rows = self._last_rows[replica]
            # a pending token is always a decode chunk's one token, sampled by the step before
            assert all(PENDING_TOKEN not in c.token_ids[:-1] for c in out.chunks)
            prev_rows = [last_rows[c.request_id] if c.token_ids[-1] == PENDING_TOKEN else -1 for c in out.chunks]
            inputs.append(pack_step(out.chunks, counts, self.block_size, self.collect_logits, all_decode, prev_rows))
            pending.append(sched.advance(out))
            sampled = [c.request_id for c in out.chunks if c.sample]
            self._last_rows[replica] = {rid: row for row, rid in enumerate(sampled)}
        return PlannedStep(inputs, pending)

    def apply(self, planned: "PlannedStep", results: Sequence[StepOutput]) -> list[RequestOutput]:
        """Second half: the ranks' sampled tokens replace the pending ones; stop checks, detokenising."""
        self.num_steps += 1
        outputs = []
        for sched, pending, result in zip(self.schedulers, planned.pending, results):
            for req, index, row in sched.fill(pending, result.tokens.tolist()):
                output = self._apply_token(sched, req, index)
                if result.logits is not None:
                    output.logits = result.logits[row]
                outputs.append(output)
        return outputs

    def _apply_token(self, sched: Scheduler, req: Request, index: int) -> RequestOutput:
        """Stop checks for output ``index`` of ``req`` (later outputs may still be pending)."""
        token, num_outputs = req.output_token_ids[index], index + 1
        detok = self._detok[req.request_id]
        reason = None
        if token in req.eos_token_ids or token in req.sampling.stop_token_ids:
            reason, text = "stop", ""
        else:
            text = detok.add(token)
            if detok.stopped:
                reason = "stop"
            elif num_outputs >= req.sampling.max_tokens or req.num_prompt_tokens + num_outputs >= sched.max_model_len:
                reason = "length"
        if reason is not None:
            if not detok.stopped:
                text += detok.flush()
            sched.finish(req.request_id, reason)
            del self._replica[req.request_id], self._detok[req.request_id]
        return RequestOutput(req.request_id, [token], text, reason is not None, reason, req.num_prompt_tokens, num_outputs)

    def _load(self, replica: int) -> int:
        s = self.schedulers[replica]
        return s.num_waiting + s.num_running


def run_to_completion(core: EngineCore) -> Iterator[RequestOutput]:
    """Step until no request is left (offline generation), yielding every output."""
    while core.has_unfinished:
        before = core.num_steps
        yield from core.step()
        if core.num_steps == before:
            raise RuntimeError("engine scheduled nothing with requests pending (scheduler stuck)")
