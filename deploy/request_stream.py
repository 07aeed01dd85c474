"""One request's outputs as its consumer reads them: an async iterator of text deltas (the
tokens of every step since the last read as one delta); closing it early aborts the request.
The engine's refusals and failures as HTTP errors."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Optional

import ray

from raymoe.actors.engine.messages import Entry, Finish, NewRequest, RejectKind
from raymoe.actors.engine.output_text import Delta, OutputText
from raymoe.deploy.api_error import APIError, bad_request

log = logging.getLogger(__name__)


class RequestRejected(Exception):
    """The engine refused the request (``Rejection``) or failed."""

    def __init__(self, kind: RejectKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class RequestStream:
    """One request's deltas as an async iterator; closing it early aborts the request."""

    def __init__(self, abort: Callable[[int], None], request: NewRequest, text: OutputText) -> None:
        """``abort``: the client's, which aborts a request by its seq."""
        self._abort, self.request, self.seq, self.text = abort, request, request.seq, text
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.received = False  # any output came back (if not, a lost engine's request can be sent again)
        self.resent = False  # sent again after its engine was lost (it is not sent a third time)
        self._tokens: list[int] = []
        self._logits: list[Any] = []
        self._logprobs: list[Any] = []
        self._prompt_logprobs: Optional[list] = None
        self._cached_tokens: Optional[int] = None
        self._finish = Finish.RUNNING
        self._error: Optional[BaseException] = None
        self._ready = asyncio.Event()

    def push(self, entry: Entry) -> None:
        self.received = True
        self._tokens.extend(entry.token_ids)
        if entry.logits:
            self._logits.extend(entry.logits)
        self._logprobs.extend(entry.logprobs)
        if entry.prompt_logprobs is not None:
            self._prompt_logprobs = entry.prompt_logprobs
        if entry.cached_tokens is not None:
            self._cached_tokens = entry.cached_tokens
        self._finish = entry.finish
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._ready.set()

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> Delta:
        while not self.text.finished:
            if self._error is not None:
                raise self._error
            if not self._tokens and self._finish == Finish.RUNNING:
                self._ready.clear()
                await self._ready.wait()
                continue
            tokens, self._tokens = self._tokens, []
            logits, self._logits = self._logits, []
            logprobs, self._logprobs = self._logprobs, []
            delta = self.text.add(tokens, self._finish, logits, logprobs)
            delta.prompt_logprobs, self._prompt_logprobs = self._prompt_logprobs, None
            delta.cached_tokens, self._cached_tokens = self._cached_tokens, None
            if self.text.needs_abort:  # a stop string: the engine is still running it
                self._abort(self.seq)
            if delta.token_ids or delta.text or delta.finished:
                return delta
        raise StopAsyncIteration

    async def aclose(self) -> None:
        if not self.text.finished and self._error is None:
            self._abort(self.seq)


def engine_error(e: BaseException) -> APIError:
    """HTTP error for what the engine answered: a full queue 429, a request the engine
    refuses 400, a failed engine or an unreachable controller 503."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, RequestRejected):
        if e.kind is RejectKind.QUEUE_FULL:
            message = f"the server is at capacity ({e}); retry later"
            return APIError(429, message, code="rate_limit_exceeded", type="rate_limit_error")
        if e.kind is RejectKind.INVALID:
            field, _, _ = str(e).partition(":")
            named = all(part.isidentifier() for part in field.split("."))
            return bad_request(str(e), field if named else None, "invalid_value")
        if e.kind is RejectKind.INTERNAL:
            return APIError(500, f"{e}; the server log has the details", code="internal_error", type="server_error")
        return APIError(503, str(e), code="engine_failed", type="server_error")
    cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) and e.cause is not None else e
    if isinstance(cause, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)):
        log.warning("the engine's controller is unreachable: %r", cause)
        message = "the engine is not available right now (it is restarting); retry the request"
        return APIError(503, message, code="engine_unavailable", type="server_error")
    log.error("unexpected engine error: %r", e)
    message = "internal server error; the server log has the details"
    return APIError(500, message, code="internal_error", type="server_error")
