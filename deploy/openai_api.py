"""OpenAI requests validated into engine inputs: a body parsed into its model
(openai_request_models.py), its values checked, its prompts, messages, max_tokens and sampling
parameters (tools and structured output: openai_constraints.py; error bodies: api_error.py).

Pure (no Ray, no FastAPI), so every rule here is unit-tested without a server. Every
user mistake becomes an ``APIError`` (HTTP 4xx with OpenAI's error body), never a 500:
unknown fields are rejected as OpenAI rejects them, OpenAI features raymoe does not
implement (suffix, best_of > 1...) are rejected by name rather than silently ignored.
Extensions, with vLLM's names: ``top_k``, ``ignore_eos``, ``stop_token_ids``,
``repetition_penalty``, ``min_tokens``, ``structured_outputs`` (json, regex, choice,
grammar; ``response_format`` works on both endpoints) and, for chat, ``chat_template_kwargs``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from typing import Any, Optional, Union

from pydantic import BaseModel, ValidationError

from raymoe.actors.engine.request import MAX_LOGIT_BIAS, MAX_LOGPROBS, SamplingParams
from raymoe.deploy.api_error import APIError, bad_request
from raymoe.deploy.openai_constraints import chat_tools, grammar_spec, tool_choice
from raymoe.deploy.openai_request_models import (
    ChatRequest,
    CompletionRequest,
    RequestModel,
)

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_TEMPERATURE = 2.0
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions
MAX_CHOICES = 128  # n: choices of one request (each runs as a request of its own)
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512  # OpenAI's bounds on metadata


# what a union field accepts, for errors that name it (pydantic lists every union member)
_UNION_HELP = {
    "prompt": "must be a string, a list of strings, a list of token ids, or a list of token-id lists",
    "stop": "must be a string or a list of strings",
    "content": "must be a string or a list of content parts",
    "tool_choice": "must be a string or an object",
}
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "ContentPart", "StreamOptions", "ChatMessage"}


def parse_body(model: type[BaseModel], body: bytes) -> Any:
    """Validate a raw JSON body into ``model``; APIError 400 naming the bad field."""
    try:
        req = model.model_validate_json(body)
    except ValidationError as e:
        raise _validation_error(e) from None
    _refuse_unknown_fields(req)
    return req


def _refuse_unknown_fields(obj: BaseModel, path: str = "") -> None:
    """APIError 400 naming the first field of a RequestModel (``obj`` or one inside it) that
    it does not define, as OpenAI refuses them."""
    if isinstance(obj, RequestModel) and obj.model_extra:
        param = path + next(iter(obj.model_extra))[:100]
        raise bad_request(f"Unrecognized request argument supplied: {param}", param, "unrecognized_argument")
    for name in type(obj).model_fields:
        value = getattr(obj, name)
        if isinstance(value, RequestModel):
            _refuse_unknown_fields(value, f"{path}{name}.")


def parse_request(model: type[BaseModel], body: bytes) -> Any:
    """Validate a completion or chat request: its shape, then its values; APIError 400 naming the bad field."""
    req = parse_body(model, body)
    _reject_unsupported(req)
    if req.temperature is not None and req.temperature > MAX_TEMPERATURE:
        raise bad_request(
            f"temperature: must be in [0, {MAX_TEMPERATURE}] (OpenAI's range), got {req.temperature}",
            "temperature",
            "invalid_value",
        )
    _check_logprobs(req)
    if isinstance(req, ChatRequest) and req.metadata is not None:
        _check_metadata(req.metadata)
    if req.n is not None and not 1 <= req.n <= MAX_CHOICES:
        raise bad_request(f"n: must be an integer in [1, {MAX_CHOICES}], got {req.n}", "n", "invalid_value")
    # every sampling field checked now, before the prompt is tokenised (against the request's own
    # max_tokens when it gives a valid one: the default depends on the prompt's length)
    requested = getattr(req, "max_completion_tokens", None) or req.max_tokens
    sampling_params(req, requested if isinstance(requested, int) and requested > 0 else max(1, req.min_tokens or 0))
    return req


def _check_metadata(metadata: dict[str, str]) -> None:
    """OpenAI's bounds (accepted, then unused: raymoe stores nothing): 16 pairs, keys of at most
    64 characters, values of at most 512."""
    if len(metadata) > MAX_METADATA_PAIRS:
        message = f"metadata: at most {MAX_METADATA_PAIRS} key-value pairs, got {len(metadata)}"
        raise bad_request(message, "metadata", "invalid_value")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
            message = f"metadata: keys of at most {MAX_METADATA_KEY} characters, values of at most {MAX_METADATA_VALUE}"
            raise bad_request(f"{message}; {key[:40]!r} is past that", "metadata", "invalid_value")


def _check_logprobs(req: Any) -> None:
    if isinstance(req, CompletionRequest):
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_COMPLETION_LOGPROBS:
            message = f"logprobs: must be an integer in [0, {MAX_COMPLETION_LOGPROBS}], got {req.logprobs}"
            raise bad_request(message, "logprobs", "invalid_value")
        return
    if req.top_logprobs is not None:
        if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
            message = f"top_logprobs: must be an integer in [0, {MAX_LOGPROBS}], got {req.top_logprobs}"
            raise bad_request(message, "top_logprobs", "invalid_value")
        if not req.logprobs:
            raise bad_request("top_logprobs: needs logprobs=true", "top_logprobs", "invalid_value")


def _validation_error(e: ValidationError) -> APIError:
    err = e.errors(include_url=False)[0]
    kind, loc = err["type"], err["loc"]
    if kind == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {err['msg']}", code="invalid_json")
    if not loc:
        return bad_request("the request body must be a JSON object", code="invalid_json")
    path: list[str] = []
    for part in loc:  # stop at a union member's tag ("str", "list[int]", ...)
        if isinstance(part, str) and (part in _TYPE_TAGS or "[" in part):
            break
        path.append(str(part))
    param = ".".join(path)
    if kind == "missing":
        return bad_request(f"Missing required parameter: '{param}'", param, "missing_required_parameter")
    name = path[-1] if path else ""
    if name in _UNION_HELP and len(loc) > len(path):
        return bad_request(f"{param}: {_UNION_HELP[name]}", param, "invalid_type")
    return bad_request(f"{param}: {err['msg']}, got {_preview(err.get('input'))}", param, "invalid_value")


def _preview(value: Any) -> str:
    """At most 80 characters of ``value`` as JSON, from a bounded part of it (a hostile body
    may hold millions of items)."""

    def shrink(v: Any, depth: int) -> Any:
        if isinstance(v, list):
            return [shrink(x, depth + 1) for x in v[:20]] if depth < 3 else "..."
        if isinstance(v, dict):
            return {str(k): shrink(x, depth + 1) for k, x in itertools.islice(v.items(), 20)} if depth < 3 else "..."
        return v[:100] if isinstance(v, str) else v

    return json.dumps(shrink(value, 0), default=str)[:80]


def _reject_unsupported(req: Any) -> None:
    """OpenAI features raymoe does not implement: a clear 400 rather than a silent ignore."""
    checks: list[tuple[str, bool, str]] = [
        (
            "stream_options",
            req.stream_options is not None and not req.stream,
            "stream_options is only allowed with stream=true",
        ),
    ]
    if isinstance(req, CompletionRequest):
        checks += [
            ("best_of", req.best_of not in (None, 1), "only best_of=1 is supported"),
            ("suffix", bool(req.suffix), "suffix is not supported"),
        ]
    else:
        chat_tools(req)
        checks += [
            (
                "tool_choice",
                req.tool_choice not in (None, "none") and not req.tools,
                "tool_choice needs tools",
            ),
            (
                "response_format",
                req.response_format is not None and tool_choice(req)[0] in ("required", "function"),
                "a forced tool call and response_format cannot both constrain the output",
            ),
            (
                "structured_outputs",
                req.structured_outputs is not None and tool_choice(req)[0] in ("required", "function"),
                "a forced tool call and structured_outputs cannot both constrain the output",
            ),
        ]
    for param, bad, message in checks:
        if bad:
            raise bad_request(f"{param}: {message}", param, "unsupported_parameter")


# ---- request -> engine inputs ----------------------------------------------------------


def completion_prompts(req: CompletionRequest) -> list[Union[str, list[int]]]:
    """The prompts of a completion request: one text or token-id list per choice."""
    p = req.prompt
    if isinstance(p, str) or (p and isinstance(p[0], int)):
        prompts = [p]
    else:
        prompts = list(p)
    if not prompts or any(len(x) == 0 for x in prompts):
        raise bad_request("prompt: must not be empty", "prompt", "invalid_value")
    return prompts


def check_fan_out(num_prompts: int, n: int, limit: int) -> None:
    """A request runs one engine request per prompt and choice; more than ``limit``
    (serve.max_queued_requests) could never wait in the queue together: 400, before any
    per-prompt work."""
    if num_prompts * n <= limit:
        return
    param = "prompt" if num_prompts > 1 else "n"
    raise bad_request(
        f"{param}: {num_prompts} prompt(s) x n={n} make {num_prompts * n} requests; at most {limit} "
        "(serve.max_queued_requests) fit the server's queue: send them in several requests",
        param,
        "invalid_value",
    )


def chat_messages(req: ChatRequest) -> list[dict[str, Any]]:
    """Messages as the chat template expects them; content parts must be text."""
    if not req.messages:
        raise bad_request("messages: must hold at least one message", "messages", "invalid_value")
    out = []
    for i, m in enumerate(req.messages):
        content, role = m.get("content"), m["role"]
        # as OpenAI: only an assistant message (one that calls tools, refuses) may leave it out
        if content is None and role != "assistant":
            raise bad_request(
                f"messages.{i}.content: a {role} message needs content", f"messages.{i}.content", "invalid_value"
            )
        if isinstance(content, list):
            for j, part in enumerate(content):
                where = f"messages.{i}.content.{j}"
                if part["type"] != "text":
                    raise bad_request(f"{where}: only text parts are supported, got {part['type']!r}", where)
                if part.get("text") is None:
                    raise bad_request(f"{where}.text: a text part needs its text", f"{where}.text")
            content = "".join(p["text"] for p in content)
        if role == "tool" and not m.get("tool_call_id"):  # as OpenAI: the answer names its call
            where = f"messages.{i}.tool_call_id"
            raise bad_request(f"{where}: a tool message needs the id of the call it answers", where)
        for j, call in enumerate(m.get("tool_calls") or []):
            _check_past_tool_call(call, f"messages.{i}.tool_calls.{j}")
        msg = {k: v for k, v in m.items() if v is not None}
        msg["content"] = content if content is not None else ""
        out.append(msg)
    return out


def _check_past_tool_call(call: Any, where: str) -> None:
    """An assistant message's earlier call, as chat templates read it: a function with a name,
    its arguments a JSON string (OpenAI's) or an object (transformers' convention)."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        shape = "{'id': ..., 'type': 'function', 'function': {'name': ..., 'arguments': ...}}"
        raise bad_request(f"{where}: a tool call is {shape}", where)
    if not isinstance(fn.get("arguments", ""), (str, dict)):
        raise bad_request(f"{where}.function.arguments: must be a JSON string", f"{where}.function.arguments")


def resolve_max_tokens(
    requested: Optional[int],
    num_prompt_tokens: int,
    *,
    limit: int,
    default: Optional[int],
    param: str,
    prompt_param: str,
) -> int:
    """The request's max_tokens, checked against ``limit`` (the most tokens, prompt plus
    output, one request may hold). ``default`` None means "the rest of the context"."""
    if num_prompt_tokens >= limit:
        raise bad_request(
            f"the prompt has {num_prompt_tokens} tokens, which leaves no room for output in this model's "
            f"context of {limit} tokens; shorten the prompt",
            prompt_param,
            "context_length_exceeded",
        )
    room = limit - num_prompt_tokens
    if requested is None:
        return room if default is None else min(default, room)
    if requested < 1:
        raise bad_request(f"{param}: must be >= 1, got {requested}", param, "invalid_value")
    if requested > room:
        raise bad_request(
            f"{param}: the prompt ({num_prompt_tokens} tokens) plus {param} ({requested}) exceed this model's "
            f"context of {limit} tokens; use {param} <= {room}",
            param,
            "context_length_exceeded",
        )
    return requested


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """The parameters of ``n`` choices: each its own random stream (a given seed is the first
    choice's; the others take the next seeds, wrapping within 64 bits)."""
    if params.seed is None:
        return [params] * n
    return [dataclasses.replace(params, seed=(params.seed + 2**63 + j) % 2**64 - 2**63) for j in range(n)]


def sampling_params(req: Any, max_tokens: int) -> SamplingParams:
    """Engine sampling parameters; a bad value is an APIError naming the field."""
    if isinstance(req, CompletionRequest):
        logprobs, prompt_logprobs = req.logprobs, req.logprobs if req.echo else None
    else:
        logprobs, prompt_logprobs = (req.top_logprobs or 0) if req.logprobs else None, None
    fields = {
        "max_tokens": max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "seed": req.seed,
        "stop": req.stop,
        "stop_token_ids": req.stop_token_ids,
        "ignore_eos": req.ignore_eos,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": req.repetition_penalty,
        "min_tokens": req.min_tokens,
        "logit_bias": _logit_bias(req.logit_bias),
        "logprobs": logprobs,
        "prompt_logprobs": prompt_logprobs,
        "grammar": grammar_spec(req),
    }
    try:
        return SamplingParams.create(**{k: v for k, v in fields.items() if v is not None})
    except ValueError as e:
        field, _, _ = str(e).partition(":")
        raise bad_request(str(e), field if field in fields else None, "invalid_value") from None


def _logit_bias(bias: Optional[dict[str, float]]) -> Optional[dict[int, float]]:
    if not bias:
        return None
    if len(bias) > MAX_LOGIT_BIAS:  # refused by its count before a million keys are converted
        message = f"logit_bias: must map at most {MAX_LOGIT_BIAS} token ids to biases, got {len(bias)}"
        raise bad_request(message, "logit_bias", "invalid_value")
    out = {}
    for key, value in bias.items():
        # str.isdigit also takes "²" and "٣"; past 19 digits no id fits (and int() refuses 4,300)
        if not (key.isascii() and key.isdigit() and len(key) <= 19):
            raise bad_request(f"logit_bias: keys must be token ids, got {key[:40]!r}", "logit_bias", "invalid_value")
        token = int(key)
        if token in out:  # "5" and "05": JSON keeps both, and one bias would silently win
            raise bad_request(f"logit_bias: token id {token} is given twice", "logit_bias", "invalid_value")
        out[token] = value
    return out


# ---- responses ----------------------------------------------------------------------------
