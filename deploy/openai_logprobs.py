"""The OpenAI shapes of log-probabilities: chat's ``logprobs.content`` and completions'
``logprobs`` columns (with echo, the prompt's tokens first; the first has no logprob).
Pure: a token's text comes from the caller."""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Optional, Sequence

from raymoe.actors.engine.messages import Logprob

LOGPROB_FLOOR = -9999.0  # what -inf becomes in JSON

TokenText = Callable[[int], str]  # a token id -> its text
TokenBytes = Callable[[int], bytes]  # a token id -> the bytes it stands for (part of a character, maybe)
# the *_in_slices builders yield to the event loop after each this many tokens (a few ms of work)
SLICE_TOKENS = 256


def _finite(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


def chat_logprobs(logprobs: Sequence[Logprob], token_text: TokenText, token_bytes: TokenBytes) -> dict[str, Any]:
    """Chat's ``logprobs`` object: one entry per output token; ``bytes`` the token's own, so a
    character split over tokens comes back whole when they are joined."""

    def item(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": token_text(token_id), "logprob": _finite(logprob), "bytes": list(token_bytes(token_id))}

    return {
        "content": [
            {**item(lp.token_id, lp.logprob), "top_logprobs": [item(t, v) for t, v in lp.top]} for lp in logprobs
        ]
    }


def completion_logprobs(
    token_ids: Sequence[int], logprobs: Sequence[Optional[Logprob]], token_text: TokenText, text_offset: int = 0
) -> dict[str, Any]:
    """Completions' ``logprobs`` object; a None entry (the first prompt token) has no logprob.
    ``text_offset``: where the first token's text starts in the choice's text."""
    tokens, offsets = [], []
    for token_id in token_ids:
        tokens.append(token_text(token_id))
        offsets.append(text_offset)
        text_offset += len(tokens[-1])
    return {
        "tokens": tokens,
        "token_logprobs": [None if lp is None else _finite(lp.logprob) for lp in logprobs],
        "top_logprobs": [None if lp is None else {token_text(t): _finite(v) for t, v in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }


async def chat_logprobs_in_slices(
    logprobs: Sequence[Logprob], token_text: TokenText, token_bytes: TokenBytes
) -> dict[str, Any]:
    """chat_logprobs, built ``SLICE_TOKENS`` at a time with the event loop served in between."""
    content: list[dict[str, Any]] = []
    for start in range(0, len(logprobs), SLICE_TOKENS):
        content += chat_logprobs(logprobs[start : start + SLICE_TOKENS], token_text, token_bytes)["content"]
        await asyncio.sleep(0)
    return {"content": content}


async def completion_logprobs_in_slices(
    token_ids: Sequence[int], logprobs: Sequence[Optional[Logprob]], token_text: TokenText, text_offset: int = 0
) -> dict[str, Any]:
    """completion_logprobs, built ``SLICE_TOKENS`` at a time with the event loop served in between."""
    columns: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for start in range(0, len(token_ids), SLICE_TOKENS):
        end = start + SLICE_TOKENS
        part = completion_logprobs(token_ids[start:end], logprobs[start:end], token_text, text_offset)
        for name, values in part.items():
            columns[name] += values
        text_offset = part["text_offset"][-1] + len(part["tokens"][-1])
        await asyncio.sleep(0)
    return columns
