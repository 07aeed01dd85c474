"""The OpenAI response shapes raymoe answers with: whole responses, stream chunks as
server-sent events, usage, the model card."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Optional


def usage(prompt_tokens: int, completion_tokens: int, *, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; ``cached_tokens``: prompt tokens whose KV the prefix cache gave."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion_response(rid: str, created: int, model: str, *, choices: list[dict], use: dict) -> dict[str, Any]:
    """``choices``: [{"text", "finish_reason", "logprobs"}, and "prompt_token_ids" and
    "token_ids" when asked (vLLM's return_token_ids)] in prompt order."""
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": i,
                "text": c["text"],
                "logprobs": c.get("logprobs"),
                "finish_reason": c["finish_reason"],
                **{k: c[k] for k in ("prompt_token_ids", "token_ids") if k in c},
            }
            for i, c in enumerate(choices)
        ],
        "usage": use,
    }


def chat_response(rid: str, created: int, model: str, *, choices: list[dict], use: dict) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": i,
                "message": _message(c),
                "logprobs": c.get("logprobs"),
                "finish_reason": c["finish_reason"],
                **{k: c[k] for k in ("prompt_token_ids", "token_ids") if k in c},
            }
            for i, c in enumerate(choices)
        ],
        "usage": use,
    }


def _message(choice: dict) -> dict[str, Any]:
    message = {"role": "assistant", "content": choice["text"]}
    if choice.get("reasoning") is not None:  # a reasoning parser is on
        message["reasoning_content"] = choice["reasoning"] or None
    if choice.get("tool_calls"):
        message["tool_calls"] = choice["tool_calls"]
    return message


def _stream_chunk(rid: str, created: int, model: str, *, obj: str, choice: dict, with_usage: bool) -> dict:
    chunk: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
    if with_usage:
        chunk["usage"] = None
    return chunk


def completion_chunk(
    rid: str,
    created: int,
    model: str,
    *,
    index: int,
    text: str,
    finish: Optional[str],
    with_usage: bool,
    logprobs: Optional[dict] = None,
    token_ids: Optional[dict] = None,
) -> dict:
    """``token_ids``: {"token_ids": the delta's, and "prompt_token_ids" in a choice's first
    chunk} when asked (vLLM's return_token_ids)."""
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish, **(token_ids or {})}
    return _stream_chunk(rid, created, model, obj="text_completion", choice=choice, with_usage=with_usage)


def chat_chunk(
    rid: str,
    created: int,
    model: str,
    *,
    index: int,
    delta: dict,
    finish: Optional[str],
    with_usage: bool,
    logprobs: Optional[dict] = None,
    token_ids: Optional[dict] = None,
) -> dict:
    """``token_ids``: as ``completion_chunk``'s."""
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish, **(token_ids or {})}
    return _stream_chunk(rid, created, model, obj="chat.completion.chunk", choice=choice, with_usage=with_usage)


def usage_chunk(rid: str, created: int, model: str, *, obj: str, use: dict) -> dict:
    """The last chunk when stream_options.include_usage: no choices, the request's usage."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}


def sse(data: dict) -> bytes:
    """One server-sent event carrying ``data`` as JSON."""
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def model_card(name: str, created: int, root: str, max_model_len: int) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "raymoe",
        "root": root,
        "max_model_len": max_model_len,
    }


async def json_bytes(body: dict[str, Any], *, slice_items: int = 256) -> bytes:
    """``body`` as compact JSON, its long lists (a choice's logprobs) encoded ``slice_items``
    items at a time with the event loop served in between: json's encoder runs in C, and one
    call over tens of MB would hold up every other request for seconds."""
    return (await _encoded(body, slice_items)).encode()


# a response's long lists lie this deep (body -> choices -> a choice -> logprobs -> content)
_WALKED_DEPTH = 4


async def _encoded(value: Any, slice_items: int, depth: int = 0) -> str:
    if isinstance(value, list) and len(value) > slice_items:
        parts = []
        for start in range(0, len(value), slice_items):
            parts.append(_compact(value[start : start + slice_items])[1:-1])
            await asyncio.sleep(0)
        return "[" + ",".join(parts) + "]"
    if depth < _WALKED_DEPTH and isinstance(value, dict):
        items = [f"{_compact(key)}:{await _encoded(item, slice_items, depth + 1)}" for key, item in value.items()]
        return "{" + ",".join(items) + "}"
    if depth < _WALKED_DEPTH and isinstance(value, list):
        parts = []
        for item in value:  # the choices: the loop is served after each
            parts.append(await _encoded(item, slice_items, depth + 1))
            await asyncio.sleep(0)
        return "[" + ",".join(parts) + "]"
    return _compact(value)


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
