"""EngineCore: the engine's policy loop, independent of where steps run.

One Scheduler per DP replica. Each ``step``: every replica's scheduler picks
its chunks, an executor runs the step on the ranks (all replicas in lockstep:
MoE layers span the whole world), then sampled tokens are applied and the
token-level stop conditions checked (EOS, stop_token_ids, max_tokens, the
context). Text -- detokenisation and stop strings -- is the clients' work
(``output_text``); a client that finds a stop string aborts the request. No
torch, no ray here: executors (Ray rank actors, or an in-process runner) are
passed in.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import random
from typing import Iterable, Optional, Protocol, Sequence

import numpy as np

from raymoe.actors.engine.block_manager import BlockManager
from raymoe.actors.engine.delivery import TokenOutput
from raymoe.actors.engine.grammar import GrammarCompiler, GrammarMasks, GrammarMatcher, GrammarRows, fill_masks
from raymoe.actors.engine.messages import Finish
from raymoe.actors.engine.request import PENDING_TOKEN, Request, SamplingParams, first_invalid_token_id
from raymoe.actors.engine.scheduler import Scheduler
from raymoe.actors.engine.step import StepBuilder, StepInFlight, StepInput, StepOutput

_MAX_ROUTED_PREFIXES = 1 << 18  # block keys remembered for routing (~16 MiB)


class Executor(Protocol):
    """Runs one engine step to completion: each DP replica's input in, its output back
    (``LocalExecutor``; the step loop's asynchronous counterpart is ``AsyncExecutor``)."""

    def __call__(self, inputs: Sequence[StepInput]) -> Sequence[StepOutput]: ...


class EngineCore:
    def __init__(
        self,
        schedulers: Sequence[Scheduler],
        *,
        eos_token_ids: Iterable[int],
        vocab_size: int,
        executor: Optional[Executor] = None,
        seed: Optional[int] = None,
        collect_logits: bool = False,
        grammars: Optional[GrammarCompiler] = None,
    ) -> None:
        """``grammars``: compiles structured-output grammars (None: requests with one are refused)."""
        self.schedulers = list(schedulers)
        self.grammars = grammars
        self._matchers: dict[str, GrammarMatcher] = {}  # request id -> its grammar's state
        self.vocab_size = vocab_size
        self.block_size = self.schedulers[0].block_manager.block_size
        self.collect_logits = collect_logits  # tests compare logits with a reference
        self.eos_token_ids = frozenset(eos_token_ids)
        self.executor = executor
        self._rng = random.Random(seed)
        self._replica: dict[str, int] = {}  # request id -> DP replica
        self._arrivals = itertools.count()
        self.num_steps = 0
        self.num_preemptions = 0
        self._builder = self._new_builder(slot_rows=max(s.max_num_seqs for s in self.schedulers))
        # DP routing by prefix: block key -> the replica the last request with that prefix went to
        self._prefix_replica: collections.OrderedDict[bytes, int] = collections.OrderedDict()

    @property
    def has_unfinished(self) -> bool:
        return bool(self._replica)

    def add_request(self, request_id: str, prompt_token_ids: Sequence[int], sampling: SamplingParams) -> None:
        """Queue a request on the least-loaded DP replica. ValueError if it can never run (or
        its grammar is invalid: compiling it here may take a while; ``GrammarCompiler.compile``
        it beforehand, off the caller's loop, and this finds it cached)."""
        if request_id in self._replica:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        bad = first_invalid_token_id(prompt_token_ids, self.vocab_size)
        if bad is not None:
            raise ValueError(f"prompt_token_ids: token id {bad!r} is outside the vocabulary [0, {self.vocab_size})")
        bad = next((t for t, _ in sampling.logit_bias if t >= self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"logit_bias: token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        req = Request(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            sampling=sampling,
            seed=sampling.seed if sampling.seed is not None else self._rng.getrandbits(63),
            arrival=next(self._arrivals),
            eos_token_ids=frozenset() if sampling.ignore_eos else self.eos_token_ids,
        )
        matcher = self._matcher(sampling)
        keys = self._prompt_keys(req)
        replica = self._route(keys) if len(self.schedulers) > 1 else 0
        self.schedulers[replica].add(req)  # validates lengths against max_model_len and the cache
        self._replica[request_id] = replica
        if matcher is not None:
            self._matchers[request_id] = matcher
        for key in keys if len(self.schedulers) > 1 else ():
            self._prefix_replica[key] = replica
            self._prefix_replica.move_to_end(key)
        while len(self._prefix_replica) > _MAX_ROUTED_PREFIXES:
            self._prefix_replica.popitem(last=False)

    def abort(self, request_id: str) -> bool:
        """Drop a live request and free its blocks; False if it is not live."""
        replica = self._replica.pop(request_id, None)
        if replica is None:
            return False
        self._matchers.pop(request_id, None)
        self.schedulers[replica].abort(request_id)
        return True

    def drop_started(self) -> list[str]:
        """After a failed step: drop every request that has run (its KV, and any token of a step
        in flight, are lost); returns their ids. Requests that never ran stay queued."""
        dropped = [rid for sched in self.schedulers for rid in sched.started_requests()]
        for rid in dropped:
            self.abort(rid)
        return dropped

    def replace_cache(self, num_blocks: int) -> list[str]:
        """The ranks restarted with ``num_blocks`` KV blocks per replica: fresh block managers
        and step bookkeeping. Returns the queued requests too long for the new cache (dropped)."""
        caching = self.schedulers[0].block_manager.prefix_caching
        new_cache = lambda: BlockManager(num_blocks, self.block_size, prefix_caching=caching)  # noqa: E731
        too_long = [rid for sched in self.schedulers for rid in sched.replace_cache(new_cache())]
        self._prefix_replica.clear()
        for rid in too_long:
            del self._replica[rid]
            self._matchers.pop(rid, None)
        self._builder = self._new_builder(slot_rows=self._builder.slot_rows)
        return too_long

    def _new_builder(self, slot_rows: int) -> StepBuilder:
        """``slot_rows``: the ranks' rows per step of sampled tokens (engine.max_num_seqs), fixed
        for the engine's life even if a scheduler's limit changes."""
        return StepBuilder(
            len(self.schedulers), self.block_size, slot_rows=slot_rows, return_logits=self.collect_logits
        )

    def step(self) -> list[TokenOutput]:
        """Run one engine step over every DP replica; returns the requests that progressed."""
        assert self.executor is not None, "step() needs an executor; async callers use schedule() and apply()"
        planned = self.schedule()
        if planned is None:
            return []
        if planned.grammar_rows is not None:
            self.attach_grammar(planned, fill_masks(planned.grammar_rows, self.grammars.mask_vocab_size))
        return self.apply(planned, self.executor(planned.inputs))

    def schedule(self) -> Optional[StepInFlight]:
        """First half of a step: every replica's chunks, or None when there is nothing to run.

        The step counts as handed to the ranks (callers must run every step returned, in
        order): its sampled tokens are pending until ``apply``, and the next step may be
        scheduled before that (its decode chunks then read their token from the ranks'
        last sampling: ``StepInput.prev_rows``).
        """
        scheduled = [s.schedule() for s in self.schedulers]
        self.num_preemptions += sum(len(o.preempted) for o in scheduled)
        if not any(o.num_tokens for o in scheduled):
            return None
        planned = self._builder.build(scheduled, [s.advance(o) for s, o in zip(self.schedulers, scheduled)])
        if self._matchers:
            marked = [self._mark_grammars(step, out.chunks) for step, out in zip(planned.inputs, scheduled)]
            planned.inputs = [step for step, _ in marked]
            if any(rows is not None for _, rows in marked):
                planned.grammar_rows = [rows for _, rows in marked]
            planned.awaits_grammar = any(step.grammar_late for step in planned.inputs)
        return planned

    def attach_grammar(self, planned: StepInFlight, masks: Sequence[Optional[GrammarMasks]]) -> None:
        """Put the masks of ``planned.grammar_rows`` (``fill_masks``) on its steps, before they go out."""
        planned.inputs = [
            step if m is None else dataclasses.replace(step, grammar=m) for step, m in zip(planned.inputs, masks)
        ]
        planned.grammar_rows = None

    @property
    def max_steps_in_flight(self) -> int:
        """Steps the loop may keep in flight while it schedules the next: two (a decode row's
        token then comes from either of the two steps before; penalties read pending history
        tokens the same way), one while a request under a grammar is live (its masks need
        every token but the last, see ``late_grammar``)."""
        return 1 if self._matchers else 2

    def late_grammar(self, planned: StepInFlight) -> Optional[list[Optional[GrammarRows]]]:
        """The rows whose grammar masks ``planned`` still waits for (``StepInput.grammar_late``),
        one list per replica, for ``fill_masks`` now that the step before it is applied; None
        when it waits for none (or got them already). Rows whose request has ended since get no
        mask."""
        if not planned.awaits_grammar:
            return None
        planned.awaits_grammar = False
        late: list[Optional[GrammarRows]] = []
        for step, pending in zip(planned.inputs, planned.pending):
            rows = [(row, self._matchers.get(entry[0].request_id)) for row, entry in enumerate(pending) if entry]
            late.append([(row, m) for row, m in rows if m is not None] if step.grammar_late else None)
        return late

    def request_of(self, matcher: GrammarMatcher) -> Optional[str]:
        """The live request whose grammar state ``matcher`` is."""
        return next((rid for rid, m in self._matchers.items() if m is matcher), None)

    def apply(self, planned: StepInFlight, results: Sequence[StepOutput]) -> list[TokenOutput]:
        """Second half: the ranks' sampled tokens replace the pending ones; token stop checks."""
        self.num_steps += 1
        outputs = []
        for replica, (sched, pending, result) in enumerate(zip(self.schedulers, planned.pending, results)):
            if planned.prompt_logprobs is not None:
                self._gather_prompt_logprobs(sched, planned.prompt_logprobs[replica], result)
            step = planned.inputs[replica]
            # sampled row -> its row of result.logprobs
            logprob_rows = {}
            if step.logprobs is not None:
                logprob_rows = {int(r): i for i, r in enumerate(np.flatnonzero(step.logprobs[step.sample] >= 0))}
            for req, index, row in sched.fill(pending, result.tokens.tolist()):
                matcher = self._matchers.get(req.request_id)
                ended = matcher is not None and not self._advance_grammar(matcher, req.output_token_ids[index])
                finish = self._finish_after(sched, req, index, grammar_ended=ended)
                out = TokenOutput(req.request_id, req.output_token_ids[index], finish)
                if result.logits is not None:
                    out.logits = result.logits[row]
                if row in logprob_rows:
                    out.logprob = result.logprobs.entry(logprob_rows[row], req.sampling.logprobs)
                if index == 0:
                    out.cached_tokens = req.num_cached_prompt_tokens
                if index == 0 and req.sampling.prompt_logprobs is not None:
                    out.prompt_logprobs, req.prompt_logprobs = [None] + req.prompt_logprobs, []
                outputs.append(out)
        return outputs

    def _gather_prompt_logprobs(self, sched: Scheduler, chunks: list[tuple[str, int]], result: StepOutput) -> None:
        """Keep each live request's prompt logprobs until its first output token goes out."""
        start = 0
        for request_id, rows in chunks:
            req = sched.live_request(request_id)
            if req is not None:
                k = req.sampling.prompt_logprobs
                req.prompt_logprobs += [result.prompt_logprobs.entry(start + j, k) for j in range(rows)]
            start += rows

    def _finish_after(self, sched: Scheduler, req: Request, index: int, grammar_ended: bool = False) -> Finish:
        """Stop checks for output ``index`` of ``req`` (later outputs may still be pending);
        a request that ends here is finished in its scheduler."""
        token, num_outputs = req.output_token_ids[index], index + 1
        if grammar_ended or token in req.eos_token_ids or token in req.sampling.stop_token_ids:
            finish = Finish.STOP
        elif num_outputs >= req.sampling.max_tokens or req.num_prompt_tokens + num_outputs >= sched.max_model_len:
            finish = Finish.LENGTH
        else:
            return Finish.RUNNING
        sched.finish(req.request_id, finish.reason)
        del self._replica[req.request_id]
        self._matchers.pop(req.request_id, None)
        return finish

    # ---- structured output ------------------------------------------------------------------

    def _matcher(self, sampling: SamplingParams) -> Optional[GrammarMatcher]:
        if sampling.grammar is None:
            return None
        if self.grammars is None:
            raise ValueError(f"{sampling.grammar.field}: structured output is not available in this engine")
        return self.grammars.matcher(self.grammars.compile(sampling.grammar))

    def _mark_grammars(self, step: StepInput, chunks: Sequence) -> tuple[StepInput, Optional[GrammarRows]]:
        """(``step``, the sampled rows under a grammar whose masks it needs before it goes out);
        or, when one of them still waits for its last token (a step in flight), ``step`` marked
        to get its masks later (``late_grammar``), and None; None too where it has no such row.
        The masks are filled by the caller (``fill_masks``; the step loop off its event loop)."""
        constrained = [c for c in chunks if c.sample and c.request_id in self._matchers]
        if not constrained:
            return step, None
        if any(c.token_ids[-1] == PENDING_TOKEN for c in constrained):
            return dataclasses.replace(step, grammar_late=True), None
        sampled = [c.request_id for c in chunks if c.sample]
        return step, [(row, self._matchers[rid]) for row, rid in enumerate(sampled) if rid in self._matchers]

    @staticmethod
    def _advance_grammar(matcher: GrammarMatcher, token: int) -> bool:
        """Advance by the sampled token; False when the grammar is done (its stop token came)
        or refused the token (only possible when every allowed token was masked otherwise)."""
        return matcher.accept(token) and not matcher.terminated

    def _prompt_keys(self, req: Request) -> list[bytes]:
        """The prompt's block keys, for routing (DP replicas) and kept on the request: hashed
        here, as the request arrives (the device is busy with the step in flight), rather
        than when the step that admits it is scheduled (the device then waits for the host)."""
        bm = self.schedulers[0].block_manager
        return bm.keys_through(req, req.num_prompt_tokens - 1) if bm.prefix_caching else []

    def _route(self, keys: Sequence[bytes]) -> int:
        """The replica that got the longest prefix of these prompt block keys, unless it holds a
        full batch (max_num_seqs) more requests than the least loaded one; else the least loaded."""
        least = min(range(len(self.schedulers)), key=self._load)
        for key in reversed(keys):
            replica = self._prefix_replica.get(key)
            if replica is not None:
                slack = self.schedulers[replica].max_num_seqs
                return replica if self._load(replica) <= self._load(least) + slack else least
        return least

    def _load(self, replica: int) -> int:
        s = self.schedulers[replica]
        return s.num_waiting + s.num_running
