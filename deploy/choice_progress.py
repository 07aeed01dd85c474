"""A request's choices as their deltas arrive: each choice's text, tokens, logprobs and finish
reason with the request's metrics (TTFT, ITL, latency); what a completion echoes; a prompt's
logprobs shared by its choices."""

from __future__ import annotations

import dataclasses
import time
from contextlib import aclosing
from typing import Any, AsyncIterator, Optional

from raymoe.actors.engine.output_text import Delta
from raymoe.deploy.metrics import ServeMetrics
from raymoe.deploy.openai_responses import usage

Outputs = AsyncIterator[tuple[int, Delta]]


def response_items(progress: Progress, params: Any, *, with_ids: bool) -> int:
    """About how many JSON values a finished request's response holds besides its texts: a
    logprob entry per token and alternative, and the token ids when they are returned."""
    per_token = (0 if params.logprobs is None else 1 + params.logprobs) + with_ids
    prompt_entries = sum(len(p) for p in progress.prompt_logprobs if p) * (1 + (params.prompt_logprobs or 0))
    prompt_ids = progress.prompt_tokens * len(progress.pieces) if with_ids else 0
    return progress.completion_tokens * per_token + prompt_entries + prompt_ids


class Progress:
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


def delta_token_ids(out: Delta, prompts: Optional[list[list[int]]], i: int, *, first: bool) -> Optional[dict]:
    """A chunk's token ids (vLLM's return_token_ids), the prompt's in a choice's first."""
    if prompts is None:
        return None
    return {"prompt_token_ids": prompts[i], "token_ids": out.token_ids} if first else {"token_ids": out.token_ids}


class Echo:
    """What a completion request echoes: each choice's prompt text and token ids, whether its
    output is dropped (echo with max_tokens 0: the prompt's logprobs alone), and ``lead[i]``:
    the choice whose prompt logprobs choice i echoes (``lead`` None: each its own)."""

    def __init__(
        self, texts: list[str], ids: list[list[int]], drop_output: bool, lead: Optional[list[int]] = None
    ) -> None:
        self.texts, self.ids, self.drop_output, self.lead = texts, ids, drop_output, lead


async def with_lead_prompt_logprobs(outputs: Outputs, lead: list[int]) -> Outputs:
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
