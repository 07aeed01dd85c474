"""A client of the engine (an ingress replica, the offline LLM): submits requests in
batches, polls for its outputs, and turns them into each request's text.

Per step the controller answers one poll per client with every new token of that
client's requests (``OutputBatch``), so the Ray calls per step do not grow with the
number of requests. Submissions and aborts go in batches too: one submit call out at
a time, each taking every request that queued while the one before it was out.
Detokenisation and stop strings run here (``OutputText``), in the consumer of each
request's stream: a consumer that falls behind the engine takes several steps' tokens
as one delta, so a slow client never slows the engine.

Requests are tokenised here as well (the tokenizer is fetched from the controller once),
and usage counts are the token ids the engine saw. A stream that is closed before it
finishes (the client went away) aborts its request, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator, Optional, Sequence, Union

import jinja2
import ray

from raymoe.actors.engine.messages import Finish, ModelInfo, NewRequest, OutputBatch, Rejection, RejectKind
from raymoe.actors.engine.output_text import Delta, OutputText
from raymoe.actors.engine.request import SamplingParams
from raymoe.actors.engine.tokenizer import Tokenizer, encode_prompt
from raymoe.deploy.api_error import bad_request
from raymoe.deploy.ray_engine import RETRY_S, EngineApi
from raymoe.deploy.request_stream import RequestRejected, RequestStream, engine_error

log = logging.getLogger(__name__)

Prompt = Union[str, list[int]]
POLL_TIMEOUT_S = 1.0
INLINE_TEXT_CHARS = 16384  # longer texts are tokenised in a thread
INLINE_MESSAGES = 256  # longer conversations are rendered in a thread
CHARS_PER_TOKEN_BOUND = 32  # a text longer than the context times this is first checked by its prefix


class EngineClient:
    def __init__(
        self, engine: EngineApi, tokenizer: Tokenizer, info: ModelInfo, poll_timeout_s: float = POLL_TIMEOUT_S
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.info = info
        self.poll_timeout_s = poll_timeout_s
        self.client_id = uuid.uuid4().hex[:16]
        self._streams: dict[int, RequestStream] = {}
        self._seqs = itertools.count()
        self._to_submit: dict[int, NewRequest] = {}
        self._to_abort: list[int] = []
        self._send = asyncio.Event()
        self._have_streams = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._submits: set[asyncio.Task] = set()  # submit calls out
        self._plain_submit: Optional[asyncio.Task] = None  # the one of plain requests
        self._submitting: set[int] = set()  # seqs of the requests in them
        self.controllers_lost = 0  # polls that found the controller dead (/metrics)

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    # ---- prompts -> token ids -------------------------------------------------------------
    # Long texts are tokenised in a thread (the tokenizer releases the GIL for them), and a
    # text far longer than the context is refused after its prefix alone: one huge prompt
    # never stalls the other requests of this replica.

    async def tokenize(self, prompt: Prompt, param: str = "prompt", add_special_tokens: bool = True) -> list[int]:
        """Text is encoded (special tokens added as the tokenizer defines, unless not
        ``add_special_tokens``); token ids are checked against the vocabulary. APIError 400
        naming ``param``."""
        if isinstance(prompt, str):
            return await self._encode_text(prompt, param, add_special_tokens=add_special_tokens)
        return self._check_ids(prompt, param)

    async def tokenize_prompts(self, prompts: Sequence[Prompt], param: str = "prompt") -> list[list[int]]:
        """``tokenize`` of each of a request's prompts. Texts of more than INLINE_TEXT_CHARS in all
        are encoded in one thread call: a batch of texts each under that bound, encoded one by one
        on the event loop, held it (and every stream of this replica) for seconds (a 15 MiB body:
        7 s)."""
        if sum(len(p) for p in prompts if isinstance(p, str)) <= INLINE_TEXT_CHARS:
            return [await self.tokenize(p, param) for p in prompts]

        def encode(p: Prompt) -> list[int]:
            return self._encode_long_text(p, param, True) if isinstance(p, str) else self._check_ids(p, param)

        return await asyncio.to_thread(lambda: [encode(p) for p in prompts])

    def _check_ids(self, prompt: Sequence[int], param: str) -> list[int]:
        try:
            return encode_prompt(self.tokenizer, prompt, self.info.vocab_size, param)
        except ValueError as e:
            raise bad_request(str(e), param, "invalid_value") from None

    async def tokenize_chat(
        self,
        messages: list[dict[str, Any]],
        template_kwargs: Optional[dict[str, Any]] = None,
        tools: Optional[list[dict[str, Any]]] = None,
    ) -> list[int]:
        """Render the chat template (with the generation prompt, and ``tools`` when given) and
        encode it as is."""
        kwargs = dict(template_kwargs or {})
        for reserved in ("messages", "add_generation_prompt", "tools"):
            if reserved in kwargs:
                raise bad_request(f"chat_template_kwargs: {reserved!r} cannot be set here", "chat_template_kwargs")
        if tools:
            kwargs["tools"] = tools
        limit = self.info.token_limit
        if len(messages) > limit:  # each message renders to a token at least
            raise bad_request(
                f"messages: {len(messages)} messages cannot fit this model's context of {limit} tokens",
                "messages",
                "context_length_exceeded",
            )
        render = functools.partial(self.tokenizer.apply_chat_template, messages, add_generation_prompt=True, **kwargs)
        # a long conversation renders in a thread, as long texts encode: the replica's other
        # streams go on meanwhile; so does one with tools or template kwargs, of any size
        chars = sum(len(str(m.get("content") or "")) for m in messages)
        large = len(messages) > INLINE_MESSAGES or chars > INLINE_TEXT_CHARS or bool(tools) or bool(kwargs)
        try:
            text = await asyncio.to_thread(render) if large else render()
        except ValueError as e:  # no chat template
            raise bad_request(str(e), "messages") from None
        except jinja2.TemplateError as e:  # the template rejects the conversation
            raise bad_request(f"messages: the model's chat template rejected them: {e}", "messages") from None
        except Exception as e:  # the template failed on what it was given (e.g. a wrongly typed kwarg)
            raise bad_request(
                f"messages: the model's chat template failed on this request ({type(e).__name__}: {e}); "
                "check messages and chat_template_kwargs",
                "chat_template_kwargs" if kwargs else "messages",
            ) from None
        return await self._encode_text(text, "messages", add_special_tokens=False)

    async def _encode_text(self, text: str, param: str, add_special_tokens: bool) -> list[int]:
        if len(text) <= INLINE_TEXT_CHARS:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return await asyncio.to_thread(self._encode_long_text, text, param, add_special_tokens)

    def _encode_long_text(self, text: str, param: str, add_special_tokens: bool) -> list[int]:
        limit = self.info.token_limit
        head = limit * CHARS_PER_TOKEN_BOUND
        if len(text) > head and len(self.tokenizer.encode(text[:head], add_special_tokens=add_special_tokens)) > limit:
            raise bad_request(
                f"{param}: the prompt has more than {limit} tokens, more than this model's context of "
                f"{limit} tokens; shorten the prompt",
                param,
                "context_length_exceeded",
            )
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    # ---- requests ---------------------------------------------------------------------------

    def stream(self, prompt_token_ids: list[int], sampling: SamplingParams) -> RequestStream:
        """Submit a request; its deltas as they come. A refusal is raised (RequestRejected)
        by the first ``__anext__``."""
        self._start()
        seq = next(self._seqs)
        request = NewRequest(seq, list(prompt_token_ids), sampling)
        stream = self._streams[seq] = RequestStream(
            self.abort, request, OutputText(self.tokenizer, prompt_token_ids, sampling.stop, sampling.min_tokens)
        )
        self._to_submit[seq] = request
        self._send.set()
        self._have_streams.set()
        return stream

    def abort(self, seq: int) -> None:
        """Stop request ``seq`` (its consumer went away, or it hit a stop string)."""
        if self._streams.pop(seq, None) is None:
            return
        if self._to_submit.pop(seq, None) is None:  # already sent: the engine must drop it
            self._to_abort.append(seq)
            self._send.set()

    async def close(self) -> None:
        """Abort every open request and stop polling."""
        tasks = [*self._tasks, *self._submits]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = []
        if self._streams:
            try:
                await self.engine.leave(self.client_id)
            except Exception as e:  # the engine is gone already
                log.warning("leaving the engine: %r", e)
            self._fail_all(RequestRejected(RejectKind.ENGINE_FAILED, "the client closed"))

    def _start(self) -> None:
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._send_loop()), asyncio.create_task(self._poll_loop())]

    async def _send_loop(self) -> None:
        """Submit and abort in batches. One call of plain requests is out at a time, and the
        requests that arrive meanwhile go together in the next: under a burst the controller
        takes a few calls rather than one a request, each waiting on its busy event loop.
        Requests under a grammar go in calls of their own, at once: the engine compiles a new
        grammar before it takes the call's requests (seconds for a large one)."""
        while True:
            await self._send.wait()
            self._send.clear()
            queued = list(self._to_submit.values())
            plain_out = self._plain_submit is not None and not self._plain_submit.done()
            self._to_submit = {n.seq: n for n in queued if plain_out and n.sampling.grammar is None}
            constrained = [n for n in queued if n.sampling.grammar is not None]
            plain = [] if plain_out else [n for n in queued if n.sampling.grammar is None]
            if constrained:
                self._launch_submit(constrained)
            if plain:
                self._plain_submit = self._launch_submit(plain)
            aborts, self._to_abort = self._to_abort, []
            # a request whose submit is still out is aborted once that returns (_submit_batch)
            aborts = [seq for seq in aborts if seq not in self._submitting]
            if aborts:
                try:
                    await self.engine.abort(self.client_id, aborts)
                except Exception as e:  # the engine is unreachable: its requests are gone with it
                    log.warning("aborting requests: %r", e)

    def _launch_submit(self, batch: list[NewRequest]) -> asyncio.Task:
        task = asyncio.create_task(self._submit_batch(batch))
        self._submits.add(task)
        task.add_done_callback(self._submit_done)
        self._submitting.update(n.seq for n in batch)
        return task

    def _submit_done(self, task: asyncio.Task) -> None:
        self._submits.discard(task)
        if self._to_submit:  # plain requests held for this call
            self._send.set()

    async def _submit_batch(self, new: list[NewRequest]) -> None:
        """Submit ``new``; those whose consumer went away meanwhile (their abort may have
        reached the engine before them) are aborted once they are in."""
        try:
            rejected = await self._submit(new)
        except Exception as e:  # the engine is unreachable even after re-attaching
            self._fail_streams(new, e)
            return
        finally:
            self._submitting.difference_update(n.seq for n in new)
        self._fail_rejected(rejected)
        refused = {r.seq for r in rejected}
        gone = [n.seq for n in new if n.seq not in self._streams and n.seq not in refused]
        if gone:
            try:
                await self.engine.abort(self.client_id, gone)
            except Exception as e:  # the engine is unreachable: its requests are gone with it
                log.warning("aborting requests: %r", e)

    def _fail_streams(self, new: list[NewRequest], error: BaseException) -> None:
        for n in new:
            stream = self._streams.pop(n.seq, None)
            if stream is not None:
                stream.fail(error)

    def _fail_rejected(self, rejected: list[Rejection]) -> None:
        for r in rejected:
            stream = self._streams.pop(r.seq, None)
            if stream is not None:
                stream.fail(RequestRejected(r.kind, r.message))

    async def _submit(self, new: list[NewRequest]) -> list[Rejection]:
        """Submit; when the controller is unreachable, find it again (its host may have started
        a new one) and submit once more: a request that no engine took is not lost."""
        try:
            return await self.engine.submit(self.client_id, new)
        except Exception as e:
            log.warning("submitting: %r; re-attaching to the engine", e)
            await self.engine.reconnect()
            return await self.engine.submit(self.client_id, new)

    async def _poll_loop(self) -> None:
        while True:
            if not self._streams:
                self._have_streams.clear()
                await self._have_streams.wait()
            try:
                batch = await self.engine.poll(self.client_id, self.poll_timeout_s)
            except Exception as e:  # the controller is unreachable: find it again
                if isinstance(e, ray.exceptions.RayActorError):  # it died, and its requests with it
                    self._engine_lost(e)
                else:
                    self._fail_all(e)
                await asyncio.gather(self.engine.reconnect(), asyncio.sleep(RETRY_S))
                continue
            self._dispatch(batch)

    def _dispatch(self, batch: OutputBatch) -> None:
        for entry in batch.entries():
            stream = self._streams.get(entry.seq)
            if stream is None:
                continue  # aborted here since
            if entry.finish == Finish.FAILED:
                stream.fail(RequestRejected(RejectKind.ENGINE_FAILED, batch.failure or "the engine failed; retry"))
            else:
                stream.push(entry)
            if entry.finish != Finish.RUNNING:
                del self._streams[entry.seq]
        if batch.error is not None:
            self._fail_all(RequestRejected(RejectKind.ENGINE_FAILED, batch.error))

    def _engine_lost(self, error: BaseException) -> None:
        """The controller died: its requests are gone. Those that returned nothing yet are sent
        again (to the controller found next), once: a request in flight when two controllers
        died in a row may be what kills them. The others fail."""
        self.controllers_lost += 1
        for seq, stream in list(self._streams.items()):
            if stream.received or stream.resent:
                del self._streams[seq]
                stream.fail(error)
            else:
                stream.resent = True
                self._to_submit[seq] = stream.request
        if self._to_submit:
            self._send.set()

    def _fail_all(self, error: BaseException) -> None:
        streams, self._streams = self._streams, {}
        self._to_submit.clear()
        for stream in streams.values():
            stream.fail(error)


async def merge(streams: Sequence[AsyncIterator[Delta]]) -> AsyncIterator[tuple[int, Delta]]:
    """Interleave several streams as (stream index, delta), in arrival order. An error
    in one stream stops (and closes) all of them, raised as an APIError."""
    if len(streams) == 1:
        try:
            async with aclosing(streams[0]) as only:
                async for out in only:
                    yield 0, out
        except Exception as e:
            raise engine_error(e) from None
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: AsyncIterator[Delta]) -> None:
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
                raise engine_error(item)
            if item is None:
                remaining -= 1
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
