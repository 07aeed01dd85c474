"""Continuous batching with chunked prefill and recompute preemption, for one DP replica.

Pure policy: each `schedule()` picks which tokens of which requests get their KV computed
this step and reserves the cache blocks for them; `advance()` records that the step was
handed to the ranks and `fill()` brings its sampled tokens. The engine loop is:
schedule -> advance -> run the model -> fill -> stop checks -> finish().
Between advance and fill the next step may already be scheduled (pipelined steps): its
decode chunks carry PENDING_TOKEN, which the ranks resolve from their last sampling.

Order of one step:
1. Running requests, oldest arrival first, each get their uncomputed tokens (1 for a
   decode, the rest of the prompt for a partial prefill) up to the remaining token budget;
   a request whose pending token ends it (by length) gets none. A request short of blocks
   preempts such ending requests first, then running requests from the newest arrival
   backwards, itself last. A preempted request drops its cache and goes back to waiting; on resume it
   recomputes prompt + outputs so far.
2. Waiting requests, FCFS, while budget, sequence limit and free blocks allow; a prompt
   longer than the budget left is chunked. A request starts only when the blocks for all
   its tokens so far (prompt, and outputs of a preempted one) are free, not just those of
   its first chunk: one that started on a chunk's blocks was preempted at its next chunk
   (it is the newest) and started again a step later, over and over, recomputing its
   prompt each time unless the prefix cache still held it. Admission is skipped in a step
   that preempted (it would only admit the victim again and thrash).
3. Bounded overtaking: when the oldest waiting request (the head) does not fit, a later one
   may start before it if the blocks it can ever need (prompt + max_tokens) are free now,
   so a short request does not wait behind a long one (a preempted one, say) until enough
   of the cache frees for that. At most MAX_OVERTAKES requests overtake one head; then
   admission waits for the head, as plain FCFS does. An overtaker is the newest running
   request, so it is the first preempted should the cache run short after all.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Optional, Sequence

from raymoe.actors.engine.admission import blocks_to_fit, check_fits_alone, max_cached_tokens
from raymoe.actors.engine.block_manager import BlockManager
from raymoe.actors.engine.request import FINISH_REASONS, PENDING_TOKEN, Request, RequestStatus, SamplingParams

MAX_OVERTAKES = 16  # requests that may start before one waiting request that does not fit


@dataclass(frozen=True, kw_only=True)
class ScheduledChunk:
    """Tokens of one request whose KV the runner computes this step."""

    request_id: str
    token_ids: tuple[int, ...]  # a prompt chunk, or the last sampled token (PENDING_TOKEN if not back yet)
    start_pos: int  # position of token_ids[0] (= num_computed_tokens before the step)
    block_ids: tuple[int, ...]  # the request's whole block table after allocation
    sample: bool  # the chunk ends at the request's last token: sample one token after it
    sampling: SamplingParams
    seed: int
    num_output_tokens: int  # outputs so far (mixed into the per-request RNG)
    # the request's tokens so far (prompt + outputs, the last maybe pending): a chunk that
    # samples for a request with penalties, else empty
    history: Sequence[int] = ()  # an int64 array from the scheduler
    banned: tuple[int, ...] = ()  # token ids masked in this sampling (min_tokens not reached)
    # prompt logprobs: the chunk's tokens from ``prompt_logprob_offset`` on give the
    # logprobs of these next prompt tokens (one each)
    prompt_logprob_offset: int = 0
    prompt_logprob_targets: tuple[int, ...] = ()


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[str, ...]  # request ids preempted this step

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


class Scheduler:
    """Owns the waiting and running queues of one replica; both stay sorted by arrival."""

    def __init__(
        self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int
    ) -> None:
        for name, value in (
            ("max_num_seqs", max_num_seqs),
            ("max_num_batched_tokens", max_num_batched_tokens),
            ("max_model_len", max_model_len),
        ):
            if value < 1:
                raise ValueError(f"{name}: must be >= 1, got {value}")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self._waiting: list[Request] = []
        self._running: list[Request] = []
        self._requests: dict[str, Request] = {}  # live (waiting or running) requests
        self._order: dict[str, tuple[float, int]] = {}  # (arrival, add count): total order
        self._num_added = 0

    @property
    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def live_request(self, request_id: str) -> Optional[Request]:
        """The waiting or running request of that id, None when it is not live."""
        return self._requests.get(request_id)

    def add(self, req: Request) -> None:
        """Queue a new request; ValueError if it could never run to max_tokens (see admission)."""
        if req.request_id in self._requests:
            raise ValueError(f"request_id: {req.request_id!r} is already queued or running; use a unique id")
        assert req.status is RequestStatus.WAITING and not req.block_ids and req.num_computed_tokens == 0
        bm = self.block_manager
        check_fits_alone(
            req.num_prompt_tokens,
            req.sampling.max_tokens,
            max_model_len=self.max_model_len,
            num_blocks=bm.num_blocks,
            block_size=bm.block_size,
        )
        self._requests[req.request_id] = req
        self._order[req.request_id] = (req.arrival, self._num_added)
        self._num_added += 1
        self._insert(self._waiting, req)

    def abort(self, request_id: str) -> Optional[Request]:
        """Drop a waiting or running request and free its blocks; None if it is not live."""
        if request_id not in self._requests:
            return None
        return self._remove(request_id, "abort")

    def finish(self, request_id: str, reason: str) -> Request:
        """End a live request (after the engine's stop checks) and free its blocks."""
        if reason not in FINISH_REASONS:
            raise ValueError(f"reason: must be one of {FINISH_REASONS}, got {reason!r}")
        if request_id not in self._requests:
            raise ValueError(f"request_id: {request_id!r} is not queued or running")
        return self._remove(request_id, reason)

    def started_requests(self) -> list[str]:
        """Live requests that have run (their prompt is, or was, in the cache), oldest first."""
        return [r.request_id for r in self._running + self._waiting if r.output_token_ids or r.num_computed_tokens]

    def replace_cache(self, block_manager: BlockManager) -> list[str]:
        """A new, empty KV cache (the ranks restarted); only requests that never started may be
        left. Returns the waiting requests too long for the new cache, which are removed."""
        assert not self._running and not self.started_requests(), "requests that started must go first"
        self.block_manager = block_manager
        bs = block_manager.block_size
        need = {r.request_id: blocks_to_fit(r.num_prompt_tokens, r.sampling.max_tokens, bs) for r in self._waiting}
        too_long = [rid for rid, n in need.items() if n > block_manager.num_blocks]
        for rid in too_long:
            self._remove(rid, "abort")
        return too_long

    def schedule(self) -> SchedulerOutput:
        """Pick this step's chunks and reserve their blocks (see the module docstring)."""
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        budget = self._schedule_running(chunks, preempted)
        if not preempted:
            self._admit_waiting(chunks, budget)
        assert len(chunks) <= self.max_num_seqs
        return SchedulerOutput(chunks=tuple(chunks), preempted=tuple(preempted))

    def advance(self, output: SchedulerOutput) -> list[Optional[tuple[Request, int]]]:
        """The step was handed to the ranks: advance each chunk's computed tokens, and give
        each chunk that samples a PENDING_TOKEN output until ``fill`` brings the real one.

        With a step in flight the next one can be scheduled already: its decode chunks
        carry the pending tokens, which the ranks take from their own last sampling.
        Returns, per sampling chunk in chunk order, (request, index of its pending output),
        or None for a request that ended since ``schedule``.
        """
        pending: list[Optional[tuple[Request, int]]] = []
        for chunk in output.chunks:
            req = self._requests[chunk.request_id] if self._is_running(chunk.request_id) else None
            if req is not None:
                assert chunk.start_pos == req.num_computed_tokens, f"{req.request_id}: stale or repeated update"
                req.num_computed_tokens += len(chunk.token_ids)
                self.block_manager.register_computed(req)  # its blocks this step fills become shareable
                if chunk.prompt_logprob_targets:
                    end = chunk.start_pos + chunk.prompt_logprob_offset + len(chunk.prompt_logprob_targets)
                    req.num_prompt_logprob_rows = end
            if chunk.sample:
                if req is not None:
                    req.output_token_ids.append(PENDING_TOKEN)
                pending.append(None if req is None else (req, len(req.output_token_ids) - 1))
        return pending

    def fill(self, pending: list[Optional[tuple[Request, int]]], tokens: list[int]) -> list[tuple[Request, int, int]]:
        """Put the sampled tokens (one per entry of ``advance``'s result) in place of the
        pending outputs; returns (request, output index, sampled row) of the requests still
        live, in order. Stop checks are the caller's."""
        assert len(pending) == len(tokens)
        got = []
        for row, (entry, token) in enumerate(zip(pending, tokens)):
            if entry is not None and self._requests.get(entry[0].request_id) is entry[0]:
                req, index = entry
                assert req.output_token_ids[index] == PENDING_TOKEN
                req.output_token_ids[index] = int(token)
                got.append((req, index, row))
        return got

    # -- internals --------------------------------------------------------------------

    def _schedule_running(self, chunks: list[ScheduledChunk], preempted: list[str]) -> int:
        """Schedule running requests oldest first; return the token budget left."""
        budget = self.max_num_batched_tokens
        for req in list(self._running):  # a snapshot: preemption removes requests from the queue
            if budget <= 0 or len(chunks) >= self.max_num_seqs:
                break
            if req.status is not RequestStatus.RUNNING or self._ends_by_length(req):
                continue  # preempted meanwhile, or sits this step out
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            assert n > 0, f"running request {req.request_id} has nothing to compute"
            if not self._reserve(req, req.num_computed_tokens + n, preempted):
                break  # req was the newest running request and preempted itself
            chunks.append(self._chunk(req, n))
            budget -= n
        return budget

    def _reserve(self, req: Request, num_tokens_after: int, preempted: list[str]) -> bool:
        """Allocate blocks for `req`, preempting other running requests; False if it lost its own.

        Victims: first requests whose pending token ends them (they hold blocks they will
        never use again, and their token still arrives: ``fill`` works on waiting requests
        too), then the newest running request."""
        bm = self.block_manager
        while not bm.can_allocate(req, num_tokens_after):
            victim = next((r for r in reversed(self._running) if self._ends_by_length(r)), self._running[-1])
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is req:
                return False
        bm.allocate(req, num_tokens_after)
        return True

    def _admit_waiting(self, chunks: list[ScheduledChunk], budget: int) -> None:
        bm = self.block_manager
        head: Optional[Request] = None  # the oldest waiting request that does not fit (see the module docstring)
        computing: set[bytes] = set()  # keys of the blocks that requests admitted this step fill
        i = 0
        while i < len(self._waiting) and budget > 0 and len(chunks) < self.max_num_seqs:
            # Budget and seq slots left means every running request got a chunk this step
            # (but those whose pending token ends them, which leave once it arrives).
            assert len(self._running) == len(chunks) + sum(map(self._ends_by_length, self._running))
            req = self._waiting[i]
            if req.output_token_ids[-2:-1] == [PENDING_TOKEN]:
                i += 1  # preempted with two outputs still in flight: it resumes once one is back
                continue
            prefix, next_key = bm.cached_prefix(req)
            cached = len(prefix) * bm.block_size
            if next_key is not None and next_key in computing:
                i += 1  # its next block is being filled this step: wait a step and share it
                continue
            n = min(req.num_tokens - cached, budget)
            if head is None:  # room for all its tokens so far, not just this step's chunk (see 2.)
                fits = bm.can_start(req, prefix, req.num_tokens)
            else:  # overtaking the head: only with room for all it can ever need
                most = max_cached_tokens(req.num_prompt_tokens, req.sampling.max_tokens)
                fits = bm.can_start(req, prefix, most)
            if not fits:
                if head is None:
                    head = req
                    if head.num_overtaken >= MAX_OVERTAKES:
                        break  # it has waited enough: nobody else starts before it
                i += 1
                continue
            self._admit(i, req, prefix, n, chunks)
            computing.update(bm.keys_through(req, req.num_computed_tokens + n))
            budget -= n
            if head is not None:
                req.overtook = True
                head.num_overtaken += 1
                if head.num_overtaken >= MAX_OVERTAKES:
                    break

    def _admit(self, index: int, req: Request, prefix: list[int], n: int, chunks: list[ScheduledChunk]) -> None:
        """Start waiting request ``index`` from its cached ``prefix`` with a chunk of ``n`` tokens."""
        self.block_manager.start(req, prefix)
        self.block_manager.allocate(req, req.num_computed_tokens + n)
        self._waiting.pop(index)
        req.status = RequestStatus.RUNNING
        self._insert(self._running, req)
        chunks.append(self._chunk(req, n))

    def _chunk(self, req: Request, n: int) -> ScheduledChunk:
        start = req.num_computed_tokens
        tokens = req.token_ids(start, start + n)
        assert len(tokens) == n and len(req.block_ids) * self.block_manager.block_size >= start + n
        sample, sampling = start + n == req.num_tokens, req.sampling
        # positions whose logits give a prompt token's logprob, not yet asked of a step
        # (a request resumed after preemption recomputes its prompt without asking again)
        first, end = max(start, req.num_prompt_logprob_rows), min(start + n, req.num_prompt_tokens - 1)
        targets = req.prompt_token_ids[first + 1 : end + 1] if sampling.prompt_logprobs is not None else []
        banned = ()
        if sample and len(req.output_token_ids) < sampling.min_tokens:
            banned = tuple(sorted(req.eos_token_ids | set(sampling.stop_token_ids)))
        return ScheduledChunk(
            request_id=req.request_id,
            token_ids=tuple(tokens),
            start_pos=start,
            block_ids=tuple(req.block_ids),
            sample=sample,
            sampling=sampling,
            seed=req.seed,
            num_output_tokens=len(req.output_token_ids),
            history=req.token_array() if sample and sampling.uses_penalties else (),
            banned=banned,
            prompt_logprob_offset=first - start if targets else 0,
            prompt_logprob_targets=tuple(targets),
        )

    def _ends_by_length(self, req: Request) -> bool:
        """Its last output (still pending: otherwise the engine would have ended it) is its last."""
        return len(req.output_token_ids) >= req.sampling.max_tokens or req.num_tokens >= self.max_model_len

    def _is_running(self, request_id: str) -> bool:
        req = self._requests.get(request_id)
        return req is not None and req.status is RequestStatus.RUNNING

    def _preempt(self, req: Request) -> None:
        self._running.remove(req)
        self.block_manager.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        req.overtook = False
        # In arrival order: at the front of waiting, unless it had overtaken someone
        self._insert(self._waiting, req)

    def _remove(self, request_id: str, reason: str) -> Request:
        req = self._requests.pop(request_id)
        del self._order[request_id]
        queue = self._running if req.status is RequestStatus.RUNNING else self._waiting
        queue.remove(req)
        self.block_manager.free(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        return req

    def _insert(self, queue: list[Request], req: Request) -> None:
        bisect.insort(queue, req, key=lambda r: self._order[r.request_id])
