"""What each OpenAI endpoint does, independent of the web framework and of Ray Serve.

``OpenAIServer`` turns a validated request into engine streams (one per prompt),
and the streams into a JSON response or server-sent events. Each delta is written
as soon as it arrives (no batching delay; a stream whose consumer fell behind gets
the tokens of several steps as one delta); a streaming response is started only
once the first token exists, so a request the engine refuses (full queue, too long)
still gets a proper HTTP error instead of a broken stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator, Optional

import pydantic_core
import ray

from raymoe.actors.engine.eplb import RebalanceRefused
from raymoe.actors.engine.messages import EngineStats
from raymoe.actors.engine.metaschema import MetaschemaCache
from raymoe.actors.engine.output_text import Delta
from raymoe.deploy.engine_client import EngineClient, engine_error, merge
from raymoe.deploy.metrics import ServeMetrics
from raymoe.deploy.openai_api import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    APIError,
    ChatRequest,
    CompletionRequest,
    bad_request,
    chat_messages,
    check_fan_out,
    choice_params,
    completion_prompts,
    parse_request,
    request_schemas,
    resolve_max_tokens,
    sampling_params,
    tool_choice,
)
from raymoe.deploy.openai_logprobs import (
    chat_logprobs,
    chat_logprobs_in_slices,
    completion_logprobs,
    completion_logprobs_in_slices,
)
from raymoe.deploy.openai_responses import (
    SSE_DONE,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    json_bytes,
    model_card,
    sse,
    usage,
    usage_chunk,
)
from raymoe.deploy.openai_tokenize import detokenize, tokenize
from raymoe.deploy.reasoning import ReasoningSplitter
from raymoe.deploy.tool_calls import ToolCallStream, split_tool_calls, tool_parser

log = logging.getLogger(__name__)

Outputs = AsyncIterator[tuple[int, Delta]]
# a non-streamed response with more logprob entries and token ids than this is encoded a slice at
# a time (json_bytes), not whole by the web framework
INLINE_RESPONSE_ITEMS = 16384


def _response_items(progress: _Progress, params: Any, *, with_ids: bool) -> int:
    """About how many JSON values a finished request's response holds besides its texts: a
    logprob entry per token and alternative, and the token ids when they are returned."""
    per_token = (0 if params.logprobs is None else 1 + params.logprobs) + with_ids
    prompt_entries = sum(len(p) for p in progress.prompt_logprobs if p) * (1 + (params.prompt_logprobs or 0))
    prompt_ids = progress.prompt_tokens * len(progress.pieces) if with_ids else 0
    return progress.completion_tokens * per_token + prompt_entries + prompt_ids


def _shown(name: str) -> str:
    """A name the client sent, as an error quotes it: cut to 100 characters (a body may carry a
    30 MiB one, which the 404 sent back whole)."""
    return name if len(name) <= 100 else f"{name[:100]}... ({len(name):,} characters)"


class _Progress:
    """One request's accounting as deltas arrive: text and finish reason per choice,
    token counts, and its TTFT / ITL / latency observations."""

    def __init__(self, n: int, num_prompt_tokens: int, t0: float, metrics: ServeMetrics, *, per_prompt: int) -> None:
        """n choices, ``per_prompt`` of each prompt in a row (prompt by prompt, as OpenAI orders them)."""
        # each choice's text as its pieces, joined once (appending each piece to the text so far
        # copies it all again: quadratic in long answers, on the event loop)
        self.pieces: list[list[str]] = [[] for _ in range(n)]
        self.logprobs: list[list] = [[] for _ in range(n)]
        self.prompt_logprobs: list[Optional[list]] = [None] * n
        self.token_ids: list[list[int]] = [[] for _ in range(n)]
        self.finish: list[Optional[str]] = [None] * n
        self.last: list[Optional[float]] = [None] * n
        self.prompt_tokens = num_prompt_tokens
        self.cached_tokens: list[Optional[int]] = [None] * n
        self.per_prompt = per_prompt
        self.completion_tokens = 0
        self.t0, self.metrics = t0, metrics

    def add(self, i: int, out: Delta) -> None:
        now = time.perf_counter()
        last, n = self.last[i], len(out.token_ids)
        if n:
            # tokens that arrive together share the time since the last ones
            if last is None:
                self.metrics.ttft.observe(now - self.t0)
                n -= 1
            for _ in range(n):
                self.metrics.itl.observe((now - (self.t0 if last is None else last)) / len(out.token_ids))
            self.last[i] = now
            self.completion_tokens += len(out.token_ids)
            self.metrics.completion_tokens.inc(len(out.token_ids))
        self.pieces[i].append(out.text)
        self.token_ids[i] += out.token_ids
        self.logprobs[i] += out.logprobs
        if out.prompt_logprobs is not None:
            self.prompt_logprobs[i] = out.prompt_logprobs
        if out.cached_tokens is not None:
            self.cached_tokens[i] = out.cached_tokens
        if out.finished:
            self.finish[i] = out.finish_reason
            if all(f is not None for f in self.finish):
                self.metrics.e2e.observe(now - self.t0)

    def text(self, i: int) -> str:
        return "".join(self.pieces[i])

    def usage(self) -> dict[str, int]:
        # a prompt's choices share it: what the cache gave all of them, summed over the prompts
        per = self.per_prompt
        choices = [self.cached_tokens[i : i + per] for i in range(0, len(self.cached_tokens), per)]
        cached = sum(min((c for c in prompt if c is not None), default=0) for prompt in choices)
        return usage(self.prompt_tokens, self.completion_tokens, cached_tokens=cached)


def _delta_token_ids(out: Delta, prompts: Optional[list[list[int]]], i: int, *, first: bool) -> Optional[dict]:
    """A chunk's token ids (vLLM's return_token_ids), the prompt's in a choice's first."""
    if prompts is None:
        return None
    return {"prompt_token_ids": prompts[i], "token_ids": out.token_ids} if first else {"token_ids": out.token_ids}


class _Echo:
    """What a completion request echoes: each choice's prompt text and token ids, whether its
    output is dropped (echo with max_tokens 0: the prompt's logprobs alone), and ``lead[i]``:
    the choice whose prompt logprobs choice i echoes (``lead`` None: each its own)."""

    def __init__(
        self, texts: list[str], ids: list[list[int]], drop_output: bool, lead: Optional[list[int]] = None
    ) -> None:
        self.texts, self.ids, self.drop_output, self.lead = texts, ids, drop_output, lead


async def _with_lead_prompt_logprobs(outputs: Outputs, lead: list[int]) -> Outputs:
    """``outputs`` with choice i's first delta carrying the prompt logprobs of choice ``lead[i]``,
    which computed them for every choice of its prompt: a choice's deltas wait for its lead's first."""
    known: dict[int, Optional[list]] = {}  # by lead: the prompt logprobs of its first delta
    waiting: dict[int, list[tuple[int, Delta]]] = {}  # by lead: deltas of choices that wait for it
    given: set[int] = set()

    def share(i: int, out: Delta) -> tuple[int, Delta]:
        if i in given:
            return i, out
        given.add(i)
        return i, dataclasses.replace(out, prompt_logprobs=known.get(lead[i]))

    async with aclosing(outputs):
        async for i, out in outputs:
            if lead[i] == i:
                known.setdefault(i, out.prompt_logprobs)
                yield share(i, out)
                for held in waiting.pop(i, []):
                    yield share(*held)
            elif lead[i] in known:
                yield share(i, out)
            else:
                waiting.setdefault(lead[i], []).append((i, out))
    for held in [h for hs in waiting.values() for h in hs]:  # a lead that ended without a delta
        yield share(*held)


class OpenAIServer:
    def __init__(
        self,
        client: EngineClient,
        model_name: str,
        model_root: str,
        api_key: Optional[str] = None,
        reasoning_parser: Optional[str] = None,
        tool_parser_name: str = "hermes",
        max_queued_requests: int = 1024,
    ) -> None:
        """``reasoning_parser``: a chat answer's ``<think>`` block goes to ``reasoning_content``
        (see deploy/reasoning.py); None: all of it is content. ``max_queued_requests``: the
        engine's queue (serve.max_queued_requests), the most engine requests one HTTP request
        may make (a prompt and choice each)."""
        self.reasoning_parser = reasoning_parser
        self.max_queued_requests = max_queued_requests
        self.tool_parser = tool_parser(tool_parser_name)
        self.client = client
        self.model_name = model_name
        self.model_root = model_root
        self.api_key = api_key
        self.metrics = ServeMetrics(model_name)
        self.created = int(time.time())
        self.schemas = MetaschemaCache()

    @property
    def controller(self) -> Any:
        """The controller actor now (stats, EPLB, health): the engine client's, which follows
        the controller when the engine host replaces it."""
        return self.client.engine.controller

    # ---- checks -----------------------------------------------------------------------

    async def check_schemas(self, req: Any) -> None:
        """400 naming the field and the place in it where a JSON schema of ``req`` is not valid
        against its draft's metaschema; checked once a request, in a worker thread (pure Python,
        about 10 ms a kilobyte of schema; a schema checked before is answered at once)."""
        schemas = request_schemas(req)
        if not schemas:
            return
        try:
            await asyncio.to_thread(self.schemas.check, schemas)
        except ValueError as e:
            raise bad_request(str(e), str(e).partition(":")[0], "invalid_value") from None

    def authorize(self, authorization: Optional[str]) -> None:
        """401 unless ``Authorization: Bearer <api key>`` matches (when a key is set)."""
        if self.api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            message = "Incorrect or missing API key: send 'Authorization: Bearer <key>'"
            raise APIError(401, message, code="invalid_api_key")

    def _check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.model_name:
            message = f"The model '{_shown(model)}' does not exist; this server serves '{self.model_name}'"
            raise APIError(404, message, param="model", code="model_not_found")

    # ---- endpoints -------------------------------------------------------------------------

    def models(self) -> dict[str, Any]:
        card = model_card(self.model_name, self.created, self.model_root, self.client.info.max_model_len)
        return {"object": "list", "data": [card]}

    def model(self, name: str) -> dict[str, Any]:
        if name != self.model_name:
            raise APIError(404, f"The model '{_shown(name)}' does not exist", param="model", code="model_not_found")
        return model_card(self.model_name, self.created, self.model_root, self.client.info.max_model_len)

    async def completions(self, body: bytes) -> Any:
        """POST /v1/completions: a dict (JSON) or an async iterator of SSE bytes."""
        t0 = time.perf_counter()
        req = parse_request(CompletionRequest, body)
        self._check_model(req.model)
        prompts = completion_prompts(req)
        check_fan_out(len(prompts), req.n or 1, self.max_queued_requests)
        await self.check_schemas(req)
        ids = await self.client.tokenize_prompts(prompts)
        limits = dict(limit=self.client.info.token_limit, default=DEFAULT_COMPLETION_MAX_TOKENS)
        limits.update(param="max_tokens", prompt_param="prompt")
        drop_output = bool(req.echo) and req.max_tokens == 0  # the prompt's logprobs alone (lm-eval)
        max_tokens = 1 if drop_output else req.max_tokens
        n = req.n or 1
        params = [
            choice
            for x in ids
            for choice in choice_params(sampling_params(req, resolve_max_tokens(max_tokens, len(x), **limits)), n)
        ]
        echo = None
        if req.echo:
            texts = [p if isinstance(p, str) else self.client.tokenizer.decode(p, False) for p in prompts]
            lead = None
            if n > 1 and params[0].prompt_logprobs is not None:
                # a prompt's logprobs are the same for all its choices: its first choice alone
                # computes them (a logit row per prompt token, and no prefix cache)
                lead = [i - i % n for i in range(len(params))]
                params = [
                    p if i == j else dataclasses.replace(p, prompt_logprobs=None)
                    for i, (p, j) in enumerate(zip(params, lead))
                ]
            echo = _Echo([t for t in texts for _ in range(n)], [x for x in ids for _ in range(n)], drop_output, lead)
        rid = f"cmpl-{uuid.uuid4().hex}"
        prompt_tokens = sum(map(len, ids))
        ids = [x for x in ids for _ in range(n)]  # choices prompt by prompt, as OpenAI orders them
        return await self._run(
            req,
            chat=False,
            rid=rid,
            ids=ids,
            params=params,
            t0=t0,
            echo=echo,
            prompt_tokens=prompt_tokens,
            per_prompt=n,
        )

    async def chat(self, body: bytes) -> Any:
        """POST /v1/chat/completions: a dict (JSON) or an async iterator of SSE bytes."""
        t0 = time.perf_counter()
        req = parse_request(ChatRequest, body)
        self._check_model(req.model)
        check_fan_out(1, req.n or 1, self.max_queued_requests)
        tools, (mode, forced) = req.tools or [], tool_choice(req)  # tools checked by parse_request
        # the template tells the model about the tools it may call
        ids = await self.client.tokenize_chat(
            chat_messages(req), req.chat_template_kwargs, tools=tools if mode != "none" else None
        )
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        limit = resolve_max_tokens(
            requested, len(ids), limit=self.client.info.token_limit, default=None, param=param, prompt_param="messages"
        )
        await self.check_schemas(req)  # after the prompt's length: the tools' schemas are in it
        n = req.n or 1
        params = sampling_params(req, limit)
        if mode in ("required", "function"):  # one call, written as the parser reads it
            try:
                params = dataclasses.replace(params, grammar=self.tool_parser.forced_call(tools, forced))
            except ValueError as e:  # the tools' schemas are too large to force
                raise bad_request(f"tools: {str(e).partition(': ')[2]}", "tools", "invalid_value") from None
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        return await self._run(
            req,
            chat=True,
            rid=rid,
            ids=[ids] * n,
            params=choice_params(params, n),
            t0=t0,
            prompt_tokens=len(ids),
            per_prompt=n,
            tool_calls=mode != "none",
            one_tool_call=req.parallel_tool_calls is False,
        )

    async def tokenize(self, body: bytes) -> dict[str, Any]:
        """POST /tokenize (vLLM's shape)."""
        model, response = await tokenize(self.client, body)
        self._check_model(model)
        return response

    async def detokenize(self, body: bytes) -> dict[str, Any]:
        """POST /detokenize (vLLM's shape)."""
        model, response = await detokenize(self.client, body)
        self._check_model(model)
        return response

    async def stats(self) -> EngineStats:
        return await self.controller.stats.remote()

    async def metrics_text(self, timeout_s: float) -> bytes:
        """Prometheus text; this replica's own metrics also while the controller does not
        answer within ``timeout_s`` (dead, or hung), when they matter most."""
        try:
            answers = asyncio.gather(self.controller.stats.remote(), self.controller.eplb_status.remote())
            stats, eplb = await asyncio.wait_for(answers, timeout_s)
        except Exception as e:  # noqa: BLE001 -- any failure to reach the engine is reported, not raised
            log.warning("metrics: the controller does not answer: %r", e)
            asyncio.create_task(self.client.engine.reconnect())  # to the one its host may have started
            stats, eplb = None, None
        return self.metrics.render(stats, eplb, controllers_lost=self.client.controllers_lost)

    async def eplb_status(self, body: bytes) -> dict[str, Any]:
        return await self.controller.eplb_status.remote()

    async def rebalance(self, body: bytes) -> dict[str, Any]:
        """Start a rebalance; optional JSON body {"logical_load": [[...] per MoE layer]}."""
        load = None
        if body.strip():
            try:
                # pydantic's parser, as every other body's: it refuses lone UTF-16 surrogates
                # ("\ud800"), which json.loads takes, and an error naming one could not be encoded (a 500)
                fields = pydantic_core.from_json(body)
                unknown = sorted(set(fields) - {"logical_load"})
                load = fields.get("logical_load")
            except (ValueError, TypeError, AttributeError):
                raise APIError(400, 'body must be a JSON object, e.g. {} or {"logical_load": [[...]]}') from None
            if unknown:
                field = str(unknown[0])[:40]
                raise APIError(400, f"{field}: unknown field; the body takes logical_load", param=field)
        try:
            return await self.controller.rebalance.remote(load)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, RebalanceRefused):
                raise APIError(409, str(e.cause), type="conflict_error") from None
            if isinstance(e.cause, ValueError):
                raise APIError(400, str(e.cause), param="logical_load" if load is not None else None) from None
            raise

    # ---- streams -> responses ------------------------------------------------------------------

    def token_text(self, token_id: int) -> str:
        """A token's text in logprobs: its bytes' (a SentencePiece piece keeps the leading space
        that decoding it alone strips; part of a character is U+FFFD)."""
        return self.client.tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.client.tokenizer.token_bytes(token_id)

    def _completion_echo(self, i: int, text: str, logprobs: list, prompt: Optional[list], echo: Optional[_Echo]):
        """Completion choice ``i``'s (text, token ids, logprobs, text offset of the first),
        the prompt's first where it is echoed (``logprobs``: the output's)."""
        token_ids = [lp.token_id for lp in logprobs]
        if echo is not None and echo.drop_output:
            text, token_ids, logprobs = "", [], []
        offset = 0
        if echo is not None:
            offset = len(echo.texts[i])
            text = echo.texts[i] + text
            if prompt is not None:
                token_ids, logprobs, offset = echo.ids[i] + token_ids, prompt + logprobs, 0
        return text, token_ids, logprobs, offset

    async def _run(
        self,
        req: Any,
        *,
        chat: bool,
        rid: str,
        ids: list[list[int]],
        params: list,
        t0: float,
        prompt_tokens: int,
        per_prompt: int,
        echo: Optional[_Echo] = None,
        tool_calls: bool = False,
        one_tool_call: bool = False,
    ) -> Any:
        """Stream ``ids[i]`` with ``params[i]`` as choice i (``per_prompt`` choices of each prompt
        in a row); ``prompt_tokens``: the usage's (each prompt once, however many choices it has);
        ``tool_calls``: parse chat choices' tool calls (``one_tool_call``: keep each choice's first only)."""
        max_calls = 1 if one_tool_call else None
        progress = _Progress(len(ids), prompt_tokens, t0, self.metrics, per_prompt=per_prompt)
        self.metrics.prompt_tokens.inc(progress.prompt_tokens)
        # a grammar never lets the model close a thinking block: constrained output is all content
        reasoning = self.reasoning_parser if chat and params[0].grammar is None else None
        outputs = merge([self.client.stream(x, p) for x, p in zip(ids, params)])
        if echo is not None and echo.lead is not None:
            outputs = _with_lead_prompt_logprobs(outputs, echo.lead)
        self.metrics.in_flight.inc()
        done = True
        try:
            first = await anext(outputs)  # errors before any byte is sent become HTTP errors
            progress.add(*first)
            if req.stream:
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                done = False  # the event stream owns the outputs from here
                return self._events(
                    outputs,
                    first,
                    chat=chat,
                    rid=rid,
                    progress=progress,
                    include_usage=include_usage,
                    logprobs=params[0].logprobs is not None,
                    echo=echo,
                    tool_calls=tool_calls,
                    max_tool_calls=max_calls,
                    return_ids=ids if req.return_token_ids else None,
                    reasoning=reasoning,
                )
            async for i, out in outputs:
                progress.add(i, out)
        except StopAsyncIteration:
            raise engine_error(RuntimeError("the engine ended the stream without output")) from None
        finally:
            if done:
                await outputs.aclose()
                self.metrics.in_flight.dec()
        asked = params[0].logprobs is not None
        choices = []
        for i, finish in enumerate(progress.finish):
            text = progress.text(i)
            # logprobs are built a slice at a time, the event loop serving other requests in between
            if chat:
                lps = (
                    await chat_logprobs_in_slices(progress.logprobs[i], self.token_text, self.token_bytes)
                    if asked
                    else None
                )
                choice: dict[str, Any] = {"logprobs": lps}
                if reasoning:
                    choice["reasoning"], text = ReasoningSplitter.split(reasoning, text)
                if tool_calls:
                    text, calls = split_tool_calls(self.tool_parser, text, max_calls)
                    choice["tool_calls"] = [c.to_openai() for c in calls]
                    finish = "tool_calls" if calls and finish == "stop" else finish
                if req.return_token_ids:
                    choice.update(prompt_token_ids=ids[i], token_ids=progress.token_ids[i])
                choices.append({**choice, "text": text, "finish_reason": finish})
                continue
            echoed = self._completion_echo(i, text, progress.logprobs[i], progress.prompt_logprobs[i], echo)
            text, token_ids, logprobs, offset = echoed
            lps = await completion_logprobs_in_slices(token_ids, logprobs, self.token_text, offset) if asked else None
            choice = {"text": text, "finish_reason": finish, "logprobs": lps}
            if req.return_token_ids:
                choice.update(prompt_token_ids=ids[i], token_ids=progress.token_ids[i])
            choices.append(choice)
        large = _response_items(progress, params[0], with_ids=bool(req.return_token_ids)) > INLINE_RESPONSE_ITEMS
        if echo is not None and echo.drop_output:
            progress.completion_tokens = 0
        build = chat_response if chat else completion_response
        body = build(rid, int(time.time()), self.model_name, choices=choices, use=progress.usage())
        # a large body (logprobs of many tokens) is encoded a slice at a time, the event loop
        # serving every other stream in between
        return await json_bytes(body) if large else body

    async def _events(
        self,
        outputs: Outputs,
        first: tuple[int, Delta],
        *,
        chat: bool,
        rid: str,
        progress: _Progress,
        include_usage: bool,
        logprobs: bool,
        echo: Optional[_Echo],
        tool_calls: bool = False,
        max_tool_calls: Optional[int] = None,
        return_ids: Optional[list[list[int]]] = None,
        reasoning: Optional[str] = None,
    ) -> AsyncIterator[bytes]:
        """SSE bytes: one chunk per delta as it arrives, then usage (if asked) and [DONE];
        ``return_ids``: each choice's prompt ids, when its chunks carry token ids; ``reasoning``:
        the reasoning parser that splits chat choices (None: all content)."""
        created, model = int(time.time()), self.model_name
        choices = range(len(progress.pieces))
        started = [False] * len(choices)
        text_offsets = [0] * len(choices)  # completions: where each choice's next token's text starts
        splitters = [ReasoningSplitter(reasoning) if reasoning else None for _ in choices] if chat else []
        calls = [ToolCallStream(self.tool_parser, max_tool_calls) if tool_calls else None for _ in choices]
        try:
            async with aclosing(outputs):
                item: Optional[tuple[int, Delta]] = first
                while item is not None:
                    i, out = item
                    if not chat:
                        text, lps = out.text, out.logprobs
                        if echo is not None and echo.drop_output:
                            text, lps = "", []
                        prompt = echo if echo is not None and not started[i] else None
                        text, token_ids, lps, offset = self._completion_echo(i, text, lps, out.prompt_logprobs, prompt)
                        start = text_offsets[i] if started[i] else offset  # offsets go on across chunks
                        lp_obj = completion_logprobs(token_ids, lps, self.token_text, start)
                        tokens = lp_obj["tokens"]
                        text_offsets[i] = lp_obj["text_offset"][-1] + len(tokens[-1]) if tokens else start
                        chunk = completion_chunk(
                            rid,
                            created,
                            model,
                            index=i,
                            text=text,
                            finish=out.finish_reason,
                            with_usage=include_usage,
                            logprobs=lp_obj if logprobs else None,
                            token_ids=_delta_token_ids(out, return_ids, i, first=not started[i]),
                        )
                        yield sse(chunk)
                    else:
                        lp_obj = chat_logprobs(out.logprobs, self.token_text, self.token_bytes) if logprobs else None
                        yield self._chat_events(
                            out,
                            self._split_delta(splitters, i, out),
                            calls[i],
                            rid=rid,
                            created=created,
                            i=i,
                            first=not started[i],
                            with_usage=include_usage,
                            logprobs=lp_obj,
                            token_ids=_delta_token_ids(out, return_ids, i, first=not started[i]),
                        )
                    started[i] = True
                    item = await anext(outputs, None)
                    if item is not None:
                        progress.add(*item)
            if include_usage:
                if echo is not None and echo.drop_output:
                    progress.completion_tokens = 0
                obj = "chat.completion.chunk" if chat else "text_completion"
                yield sse(usage_chunk(rid, created, model, obj=obj, use=progress.usage()))
            yield SSE_DONE
        except APIError as e:  # the engine failed mid-stream: an error event, then the end
            yield sse(e.body())
        finally:
            self.metrics.in_flight.dec()

    def _split_delta(self, splitters: list[Optional[ReasoningSplitter]], i: int, out: Delta) -> tuple[str, str]:
        """Choice ``i``'s delta as (reasoning, content); all content without a reasoning parser."""
        splitter = splitters[i]
        if splitter is None:
            return "", out.text
        reasoning, content = splitter.feed(out.text)
        if out.finished:
            more = splitter.flush()
            reasoning, content = reasoning + more[0], content + more[1]
        return reasoning, content

    def _chat_events(
        self,
        out: Delta,
        texts: tuple[str, str],
        calls: Optional[ToolCallStream],
        *,
        rid: str,
        created: int,
        i: int,
        first: bool,
        with_usage: bool,
        logprobs: Optional[dict],
        token_ids: Optional[dict] = None,
    ) -> bytes:
        """A chat delta as SSE (``texts``: its reasoning and content; ``calls``: the choice's tool
        calls so far, when parsed): the role comes first, each tool call whole as it completes,
        the finish reason in a chunk of its own (the delta's logprobs go with its content, its
        ``token_ids`` with the first chunk after the role)."""
        model, events = self.model_name, []

        def chunk(delta: dict, finish: Optional[str], lps: Optional[dict] = None) -> bytes:
            ids = token_ids if len(events) == int(first) else None
            return sse(
                chat_chunk(
                    rid,
                    created,
                    model,
                    index=i,
                    delta=delta,
                    finish=finish,
                    with_usage=with_usage,
                    logprobs=lps,
                    token_ids=ids,
                )
            )

        if first:
            events.append(
                sse(
                    chat_chunk(
                        rid,
                        created,
                        model,
                        index=i,
                        delta={"role": "assistant", "content": ""},
                        finish=None,
                        with_usage=with_usage,
                    )
                )
            )
        reasoning, content = texts
        new_calls = []
        if calls is not None:
            before = calls.num_calls
            content, new_calls = calls.add(content)
            if out.finished:
                content += calls.finish()[0]
            new_calls = [c.to_openai(index=before + k) for k, c in enumerate(new_calls)]
        if reasoning:
            events.append(chunk({"reasoning_content": reasoning}, None))
        if content or (not out.finished and not reasoning and not new_calls) or (logprobs and logprobs["content"]):
            events.append(chunk({"content": content}, None, logprobs))
        if new_calls:
            events.append(chunk({"tool_calls": new_calls}, None))
        if out.finished:
            finish = out.finish_reason
            if calls is not None and calls.num_calls and finish == "stop":
                finish = "tool_calls"
            events.append(chunk({}, finish))
        return b"".join(events)
