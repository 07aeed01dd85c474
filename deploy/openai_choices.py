"""A request's choices from engine streams to an OpenAI response: one JSON body, or server-sent
events written as each delta arrives (chat: role, reasoning, content, tool calls, finish reason;
completions: echo and text offsets), then usage (if asked) and [DONE]."""

from __future__ import annotations

import time
from contextlib import aclosing
from typing import Any, AsyncIterator, Optional

from raymoe.actors.engine.output_text import Delta
from raymoe.deploy.api_error import APIError
from raymoe.deploy.choice_progress import (
    Echo,
    Outputs,
    Progress,
    delta_token_ids,
    response_items,
    with_lead_prompt_logprobs,
)
from raymoe.deploy.engine_client import EngineClient, merge
from raymoe.deploy.metrics import ServeMetrics
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
    sse,
    usage_chunk,
)
from raymoe.deploy.reasoning import ReasoningSplitter
from raymoe.deploy.request_stream import engine_error
from raymoe.deploy.tool_calls import HermesToolParser, ToolCallStream, split_tool_calls

# a non-streamed response with more logprob entries and token ids than this is encoded a slice at
# a time (json_bytes), not whole by the web framework (read here only: patch it here)
INLINE_RESPONSE_ITEMS = 16384


class ChoiceWriter:
    def __init__(
        self,
        client: EngineClient,
        metrics: ServeMetrics,
        model_name: str,
        *,
        reasoning_parser: Optional[str],
        tool_parser: HermesToolParser,
    ) -> None:
        """``reasoning_parser``: a chat answer's thinking block goes to ``reasoning_content``
        (None: all content); ``tool_parser``: how chat choices' tool calls are read."""
        self.client, self.metrics, self.model_name = client, metrics, model_name
        self.reasoning_parser, self.tool_parser = reasoning_parser, tool_parser

    def token_text(self, token_id: int) -> str:
        """A token's text in logprobs: its bytes' (a SentencePiece piece keeps the leading space
        that decoding it alone strips; part of a character is U+FFFD)."""
        return self.client.tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.client.tokenizer.token_bytes(token_id)

    def completion_echo(self, i: int, text: str, logprobs: list, prompt: Optional[list], echo: Optional[Echo]):
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

    async def run(
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
        echo: Optional[Echo] = None,
        tool_calls: bool = False,
        one_tool_call: bool = False,
    ) -> Any:
        """Stream ``ids[i]`` with ``params[i]`` as choice i (``per_prompt`` choices of each prompt
        in a row); ``prompt_tokens``: the usage's (each prompt once, however many choices it has);
        ``tool_calls``: parse chat choices' tool calls (``one_tool_call``: keep each choice's first only)."""
        max_calls = 1 if one_tool_call else None
        progress = Progress(len(ids), prompt_tokens, t0, self.metrics, per_prompt=per_prompt)
        self.metrics.prompt_tokens.inc(progress.prompt_tokens)
        # a grammar never lets the model close a thinking block: constrained output is all content
        reasoning = self.reasoning_parser if chat and params[0].grammar is None else None
        outputs = merge([self.client.stream(x, p) for x, p in zip(ids, params)])
        if echo is not None and echo.lead is not None:
            outputs = with_lead_prompt_logprobs(outputs, echo.lead)
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
            echoed = self.completion_echo(i, text, progress.logprobs[i], progress.prompt_logprobs[i], echo)
            text, token_ids, logprobs, offset = echoed
            lps = await completion_logprobs_in_slices(token_ids, logprobs, self.token_text, offset) if asked else None
            choice = {"text": text, "finish_reason": finish, "logprobs": lps}
            if req.return_token_ids:
                choice.update(prompt_token_ids=ids[i], token_ids=progress.token_ids[i])
            choices.append(choice)
        large = response_items(progress, params[0], with_ids=bool(req.return_token_ids)) > INLINE_RESPONSE_ITEMS
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
        progress: Progress,
        include_usage: bool,
        logprobs: bool,
        echo: Optional[Echo],
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
                        text, token_ids, lps, offset = self.completion_echo(i, text, lps, out.prompt_logprobs, prompt)
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
                            token_ids=delta_token_ids(out, return_ids, i, first=not started[i]),
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
                            token_ids=delta_token_ids(out, return_ids, i, first=not started[i]),
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
