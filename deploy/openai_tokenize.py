"""``/tokenize`` and ``/detokenize``, in vLLM's shapes.

POST /tokenize ``{"prompt": str, "add_special_tokens": true}`` or ``{"messages": [...],
"chat_template_kwargs": {...}}`` (rendered with the generation prompt) ->
``{"count", "max_model_len", "tokens", "token_strs": null}``;
POST /detokenize ``{"tokens": [ids]}`` -> ``{"prompt": text}``.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from raymoe.deploy.engine_client import EngineClient
from raymoe.deploy.openai_api import (
    ChatMessages,
    ChatRequest,
    RequestModel,
    TokenIds,
    bad_request,
    chat_messages,
    parse_body,
)


class TokenizePromptRequest(RequestModel):
    model: Optional[str] = None
    prompt: str
    add_special_tokens: bool = True


class TokenizeChatRequest(RequestModel):
    model: Optional[str] = None
    messages: ChatMessages
    chat_template_kwargs: Optional[dict[str, Any]] = None


class DetokenizeRequest(RequestModel):
    model: Optional[str] = None
    tokens: TokenIds


def _is_chat(body: bytes) -> bool:
    try:
        return isinstance(parsed := json.loads(body), dict) and "messages" in parsed
    except ValueError:
        return False  # parse_body names the error


async def tokenize(client: EngineClient, body: bytes) -> tuple[Optional[str], dict[str, Any]]:
    """-> (the model the request names, the response)."""
    if _is_chat(body):
        req = parse_body(TokenizeChatRequest, body)
        chat = ChatRequest(messages=req.messages)
        ids = await client.tokenize_chat(chat_messages(chat), req.chat_template_kwargs)
    else:
        req = parse_body(TokenizePromptRequest, body)
        ids = await client.tokenize(req.prompt, add_special_tokens=req.add_special_tokens)
    response = {"count": len(ids), "max_model_len": client.info.max_model_len, "tokens": ids, "token_strs": None}
    return req.model, response


def detokenize(client: EngineClient, body: bytes) -> tuple[Optional[str], dict[str, Any]]:
    """-> (the model the request names, the response)."""
    req = parse_body(DetokenizeRequest, body)
    bad = next((t for t in req.tokens if not 0 <= t < client.info.vocab_size), None)
    if bad is not None:
        message = f"tokens: token id {bad} is outside the vocabulary [0, {client.info.vocab_size})"
        raise bad_request(message, "tokens", "invalid_value")
    return req.model, {"prompt": client.tokenizer.decode(req.tokens)}
