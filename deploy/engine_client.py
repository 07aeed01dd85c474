"""The ingress side of the controller: tokenize locally, stream each request's deltas
over one Ray streaming call, map engine errors to HTTP errors.

The tokenizer is fetched from the controller once, so a request costs exactly one
Ray call (the stream) and usage counts are the token ids the engine saw. A stream
that is closed before it finishes (the client went away) cancels its Ray stream and
aborts the request, which frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from typing import Any, AsyncIterator, Optional, Sequence, Union

import jinja2
import ray

from raymoe.actors.engine.async_engine import EngineFailedError, QueueFullError
from raymoe.actors.engine.core import RequestOutput
from raymoe.actors.engine.request import SamplingParams
from raymoe.actors.engine.tokenizer import Tokenizer, encode_chat, encode_prompt
from raymoe.deploy.openai_api import APIError, bad_request

log = logging.getLogger(__name__)

Prompt = Union[str, list[int]]


class EngineClient:
    def __init__(self, controller: Any, tokenizer: Tokenizer, model_info: dict[str, Any]) -> None:
        self.controller = controller
        self._generate = controller.generate_stream.options(num_returns="streaming")
        self.tokenizer = tokenizer
        self.model_info = model_info
        self.vocab_size: int = model_info["vocab_size"]
        self.max_model_len: int = model_info["max_model_len"]
        # a request (prompt + output) must fit the context and, alone, the KV cache
        # (its last sampled token never enters the cache, hence the + 1)
        cache_tokens = model_info["kv_blocks_per_replica"] * model_info["block_size"]
        self.token_limit = min(self.max_model_len, cache_tokens + 1)

    # ---- prompts -> token ids -------------------------------------------------------------

    def tokenize(self, prompt: Prompt, param: str = "prompt") -> list[int]:
        """Text is encoded (special tokens added as the tokenizer defines); token ids are
        checked against the vocabulary."""
        try:
            return encode_prompt(self.tokenizer, prompt, self.vocab_size, param)
        except ValueError as e:
            raise bad_request(str(e), param, "invalid_value") from None

    def tokenize_chat(self, messages: list[dict[str, Any]], template_kwargs: Optional[dict[str, Any]] = None) -> list[int]:
        """Render the chat template (with the generation prompt) and encode it as is."""
        kwargs = dict(template_kwargs or {})
        for reserved in ("messages", "add_generation_prompt", "tools"):
            if reserved in kwargs:
                raise bad_request(f"chat_template_kwargs: {reserved!r} cannot be set here", "chat_template_kwargs")
        try:
            return encode_chat(self.tokenizer, messages, **kwargs)
        except ValueError as e:  # no chat template
            raise bad_request(str(e), "messages") from None
        except jinja2.TemplateError as e:  # the template rejects the conversation
            raise bad_request(f"messages: the model's chat template rejected them: {e}", "messages") from None

    # ---- streams ------------------------------------------------------------------------------

    async def stream(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams) -> AsyncIterator[RequestOutput]:
        """The request's deltas as the engine produces them; APIError for engine errors."""
        gen = self._generate.remote(request_id, prompt_token_ids, sampling)
        finished = False
        try:
            async for ref in gen:
                out = await ref
                finished = out.finished
                yield out
        except (ray.exceptions.RayError, EngineFailedError, QueueFullError, ValueError) as e:
            finished = True  # the engine side is over with this request
            raise engine_error(e) from None
        finally:
            if not finished:  # closed early: stop the engine's work and free the blocks now
                ray.cancel(gen)
                self.controller.abort.remote(request_id)


async def merge(streams: Sequence[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several streams as (stream index, output), in arrival order. An error
    in one stream stops (and closes) all of them."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for out in only:
                yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: AsyncIterator[RequestOutput]) -> None:
        try:
            async with aclosing(s) as stream:
                async for out in stream:
                    queue.put_nowait((i, out))
            queue.put_nowait((i, None))
        except Exception as e:
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                remaining -= 1
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def engine_error(e: BaseException) -> APIError:
    """HTTP error for what the controller raised: a full queue 429, a request the engine
    refuses 400, a failed engine or a dead controller 503."""
    if isinstance(e, APIError):
        return e
    cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) and e.cause is not None else e
    if isinstance(cause, QueueFullError):
        return APIError(429, f"the server is at capacity ({cause}); retry later", None, "rate_limit_exceeded", "rate_limit_error")
    if isinstance(cause, ValueError):
        field, _, _ = str(cause).partition(":")
        return bad_request(str(cause), field if field.isidentifier() else None, "invalid_value")
    if isinstance(cause, EngineFailedError):
        return APIError(503, str(cause), None, "engine_failed", "server_error")
    if isinstance(cause, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)):
        return APIError(503, f"the engine is not available: {cause}", None, "engine_unavailable", "server_error")
    log.error("unexpected engine error: %r", e)
    return APIError(500, f"internal error: {type(cause).__name__}: {cause}", None, "internal_error", "server_error")
