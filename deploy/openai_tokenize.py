"""``/tokenize`` and ``/detokenize``, in vLLM's shapes.

POST /tokenize ``{"prompt": str, "add_special_tokens": true}`` or ``{"messages": [...],
"chat_template_kwargs": {...}}`` (rendered with the generation prompt) ->
``{"count", "max_model_len", "tokens", "token_strs"}`` (the tokens' vocabulary pieces with
``"return_token_strs": true``, else null);
POST /detokenize ``{"tokens": [ids]}`` -> ``{"prompt": text}``.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Optional

from raymoe.deploy.api_error import bad_request
from raymoe.deploy.engine_client import EngineClient
from raymoe.deploy.openai_api import chat_messages, parse_body
from raymoe.deploy.openai_request_models import ChatMessages, ChatRequest, RequestModel, TokenIds

INLINE_DECODE_IDS = 4096  # longer lists of ids are decoded in a thread


class TokenizeRequest(RequestModel):
    """Either shape in one model, so the body is parsed once."""

    model: Optional[str] = None
    prompt: Optional[str] = None
    add_special_tokens: bool = True
    messages: Optional[ChatMessages] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    return_token_strs: bool = False


class DetokenizeRequest(RequestModel):
    model: Optional[str] = None
    tokens: TokenIds


async def tokenize(client: EngineClient, body: bytes) -> tuple[Optional[str], dict[str, Any]]:
    """-> (the model the request names, the response)."""
    req = parse_body(TokenizeRequest, body)
    given = req.model_fields_set
    if "messages" in given:
        if req.messages is None:
            raise bad_request("messages: must be a list of messages", "messages", "invalid_value")
        other = next((f for f in ("prompt", "add_special_tokens") if f in given), None)
        if other is not None:
            raise bad_request(f"{other}: not with messages (give prompt or messages)", other, "invalid_value")
        chat = ChatRequest(messages=req.messages)
        ids = await client.tokenize_chat(chat_messages(chat), req.chat_template_kwargs)
    elif req.prompt is None:
        raise bad_request(
            "Missing required parameter: 'prompt' (or 'messages')", "prompt", "missing_required_parameter"
        )
    elif "chat_template_kwargs" in given:
        raise bad_request("chat_template_kwargs: only with messages", "chat_template_kwargs", "invalid_value")
    else:
        ids = await client.tokenize(req.prompt, add_special_tokens=req.add_special_tokens)
    pieces = [client.tokenizer.backend.id_to_token(i) for i in ids] if req.return_token_strs else None
    response = {"count": len(ids), "max_model_len": client.info.max_model_len, "tokens": ids, "token_strs": pieces}
    return req.model, response


async def detokenize(client: EngineClient, body: bytes) -> tuple[Optional[str], dict[str, Any]]:
    """-> (the model the request names, the response). At most max_model_len ids (a longer
    list would hold the event loop while it is checked); long lists decode in a thread."""
    req = parse_body(DetokenizeRequest, body)
    limit = client.info.max_model_len
    if len(req.tokens) > limit:
        message = f"tokens: at most {limit} ids (max_model_len), got {len(req.tokens)}"
        raise bad_request(message, "tokens", "invalid_value")
    bad = next((t for t in req.tokens if not 0 <= t < client.info.vocab_size), None)
    if bad is not None:
        message = f"tokens: token id {bad} is outside the vocabulary [0, {client.info.vocab_size})"
        raise bad_request(message, "tokens", "invalid_value")
    decode = functools.partial(client.tokenizer.decode, req.tokens)
    text = await asyncio.to_thread(decode) if len(req.tokens) > INLINE_DECODE_IDS else decode()
    return req.model, {"prompt": text}
