"""Output delivery: each step's sampled tokens, sorted into one outbox per client.

The engine registers every request under its client; after each step it hands the
step's ``TokenOutput``s here, and a client's ``poll`` takes everything its outbox
gathered since the last one, as one ``OutputBatch``. A poll waits (up to a timeout)
while the outbox is empty, so an idle client costs one call per timeout and a busy one
one call per step at most, however many requests it has running.

A client that stops polling (its process died) is found by ``silent_clients`` so the
engine can abort its requests and free their KV blocks.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import numpy as np

from raymoe.actors.engine.messages import Finish, Logprob, OutputBatch, empty_batch


@dataclass(slots=True)
class TokenOutput:
    """One request's token from one step, and its state after it."""

    request_id: str
    token: int
    finish: Finish
    logits: Any = None  # this token's logits row [vocab], when the engine collects logits
    logprob: Optional[Logprob] = None  # when the request asks for logprobs
    prompt_logprobs: Optional[list] = None  # with a first token, when the request asks for them
    cached_tokens: Optional[int] = None  # with a first token: prompt tokens the prefix cache gave


class _Outbox:
    def __init__(self, with_logits: bool) -> None:
        self.seqs: list[int] = []
        self.num_tokens: list[int] = []
        self.tokens: list[int] = []
        self.finish: list[int] = []
        self.logits: Optional[list[Any]] = [] if with_logits else None
        self.logprobs: dict[int, Logprob] = {}  # index into tokens -> its logprobs
        self.prompt_logprobs: dict[int, list] = {}  # entry index -> prompt logprobs
        self.cached_tokens: dict[int, int] = {}  # entry index -> prompt tokens from the prefix cache
        self.error: Optional[str] = None
        self.failure: Optional[str] = None
        self.ready = asyncio.Event()
        self.polls_open = 0
        self.last_heard = time.monotonic()  # the client's last sign of life: a poll, or new requests
        self.requests: set[str] = set()  # live request ids

    def add(
        self,
        seq: int,
        tokens: list[int],
        finish: Finish,
        logits: Optional[list[Any]],
        logprob: Optional[Logprob] = None,
        prompt_logprobs: Optional[list] = None,
        cached_tokens: Optional[int] = None,
    ) -> None:
        if cached_tokens is not None:
            self.cached_tokens[len(self.seqs)] = cached_tokens
        if logprob is not None:
            self.logprobs[len(self.tokens)] = logprob  # a logprob comes with one token
        if prompt_logprobs is not None:
            self.prompt_logprobs[len(self.seqs)] = prompt_logprobs
        self.seqs.append(seq)
        self.num_tokens.append(len(tokens))
        self.tokens.extend(tokens)
        self.finish.append(finish)
        if self.logits is not None:
            self.logits.extend(logits or [])
        self.ready.set()

    def take(self) -> OutputBatch:
        if not self.seqs:
            return empty_batch(self.error)
        batch = OutputBatch(
            seqs=np.array(self.seqs, dtype=np.int64),
            num_tokens=np.array(self.num_tokens, dtype=np.int64),
            token_ids=np.array(self.tokens, dtype=np.int64),
            finish=np.array(self.finish, dtype=np.int8),
            logits=self.logits,
            error=self.error,
            failure=self.failure,
            logprobs=self.logprobs or None,
            prompt_logprobs=self.prompt_logprobs or None,
            cached_tokens=self.cached_tokens or None,
        )
        self.seqs, self.num_tokens, self.tokens, self.finish = [], [], [], []
        if self.logprobs:
            self.logprobs = {}
        if self.prompt_logprobs:
            self.prompt_logprobs = {}
        if self.cached_tokens:
            self.cached_tokens = {}
        self.failure = None
        if self.logits is not None:
            self.logits = []
        return batch


class OutputRouter:
    """Outboxes by client id; request ids are ``"{client}/{seq}"``."""

    def __init__(self, with_logits: bool = False) -> None:
        self.with_logits = with_logits
        self._outboxes: dict[str, _Outbox] = {}
        self._owner: dict[str, tuple[_Outbox, int]] = {}  # live request id -> (outbox, seq)
        self.num_polls = 0

    @staticmethod
    def request_id(client: str, seq: int) -> str:
        return f"{client}/{seq}"

    def holds(self, request_id: str) -> bool:
        """Whether outputs still go out for this request (added, not yet over)."""
        return request_id in self._owner

    def add(self, client: str, seq: int) -> str:
        """Register a request of ``client``; returns its engine request id."""
        box = self._outbox(client)
        box.last_heard = time.monotonic()  # an idle client stops polling; its next request comes first
        rid = self.request_id(client, seq)
        box.requests.add(rid)
        self._owner[rid] = (box, seq)
        return rid

    def remove(self, request_id: str) -> None:
        """The request is over (aborted, or refused after ``add``): nothing more goes out for it."""
        entry = self._owner.pop(request_id, None)
        if entry is not None:
            entry[0].requests.discard(request_id)

    def deliver(self, outputs: Iterable[TokenOutput]) -> None:
        """Sort one step's outputs into their clients' outboxes."""
        for out in outputs:
            entry = self._owner.get(out.request_id)
            if entry is None:
                continue  # aborted since the step was scheduled
            box, seq = entry
            logits = None if out.logits is None else [out.logits]
            box.add(seq, [out.token], out.finish, logits, out.logprob, out.prompt_logprobs, out.cached_tokens)
            if out.finish != Finish.RUNNING:
                self.remove(out.request_id)

    def fail_request(self, request_id: str, reason: str) -> None:
        """The engine failed this request (``reason`` goes to its client): a FAILED entry."""
        entry = self._owner.get(request_id)
        if entry is not None:
            entry[0].failure = reason
            entry[0].add(entry[1], [], Finish.FAILED, None)
            self.remove(request_id)

    def fail(self, error: str) -> None:
        """The engine failed: every client's next poll returns ``error``."""
        for box in self._outboxes.values():
            box.error = error
            box.ready.set()
        self._owner.clear()

    async def poll(self, client: str, timeout_s: float) -> OutputBatch:
        """Everything ``client``'s outbox holds; waits up to ``timeout_s`` for something."""
        box = self._outbox(client)
        box.polls_open += 1
        try:
            if not box.seqs and box.error is None:
                box.ready.clear()
                try:
                    await asyncio.wait_for(box.ready.wait(), timeout_s)
                except asyncio.TimeoutError:
                    pass
            self.num_polls += 1
            return box.take()
        finally:
            box.polls_open -= 1
            box.last_heard = time.monotonic()

    def requests_of(self, client: str) -> list[str]:
        box = self._outboxes.get(client)
        return sorted(box.requests) if box is not None else []

    def drop_client(self, client: str) -> list[str]:
        """Forget ``client``; returns its live request ids (for the engine to abort)."""
        box = self._outboxes.pop(client, None)
        if box is None:
            return []
        rids = sorted(box.requests)
        for rid in rids:
            self._owner.pop(rid, None)
        return rids

    def silent_clients(self, timeout_s: float) -> list[str]:
        """Clients with live requests that are not polling and have neither polled nor sent
        requests for ``timeout_s``."""
        now = time.monotonic()
        return [
            client
            for client, box in self._outboxes.items()
            if box.requests and box.polls_open == 0 and now - box.last_heard > timeout_s
        ]

    def _outbox(self, client: str) -> _Outbox:
        box = self._outboxes.get(client)
        if box is None:
            box = self._outboxes[client] = _Outbox(self.with_logits)
        return box
