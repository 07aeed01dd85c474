"""The OpenAI wire format: request models, validation into engine inputs, error bodies,
and the shapes of responses and stream chunks.

Pure (no Ray, no FastAPI), so every rule here is unit-tested without a server. Every
user mistake becomes an ``APIError`` (HTTP 4xx with OpenAI's error body), never a 500:
unknown fields are rejected as OpenAI rejects them, OpenAI features raymoe does not
implement (tools, suffix...) are rejected by name rather than silently ignored.
Extensions, with vLLM's names: ``top_k``, ``ignore_eos``, ``stop_token_ids``,
``repetition_penalty``, ``min_tokens``, ``structured_outputs`` (json, regex, choice,
grammar; ``response_format`` works on both endpoints) and, for chat, ``chat_template_kwargs``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, FailFast, ValidationError, with_config
from typing_extensions import NotRequired, TypeAliasType, TypedDict

from raymoe.actors.engine.grammar import GrammarSpec
from raymoe.actors.engine.json_schema import count_subschemas, unenforced_keywords
from raymoe.actors.engine.request import MAX_LOGIT_BIAS, MAX_LOGPROBS, SamplingParams

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_TEMPERATURE = 2.0
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions
MAX_CHOICES = 128  # n: choices of one request (each runs as a request of its own)
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512  # OpenAI's bounds on metadata


class APIError(Exception):
    """An error answered with ``status`` and OpenAI's body ``{"error": {...}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: Optional[str] = None,
        code: Optional[str] = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ---- request models -----------------------------------------------------------------


def _fail_fast(name: str, container: Any) -> Any:
    """``container`` (a list or dict type) validated up to its first bad item. Pydantic
    otherwise reports every bad item, about 10 us each: a 30 MiB body of them held the
    ingress, and every stream it serves, for minutes. (An alias: Annotated[..., FailFast()]
    cannot sit in a Union.)"""
    return TypeAliasType(name, Annotated[container, FailFast()])


TokenIds = _fail_fast("TokenIds", list[int])
Texts = _fail_fast("Texts", list[str])
TokenIdLists = _fail_fast("TokenIdLists", list[TokenIds])
LogitBias = _fail_fast("LogitBias", dict[str, float])
Tools = _fail_fast("Tools", list[dict[str, Any]])
Metadata = _fail_fast("Metadata", dict[str, str])


class RequestModel(BaseModel):
    """A request object: strict types; a field it does not define is refused by parse_body,
    naming the first (collected here rather than refused by pydantic, which reports every
    one: a body of millions of them held the ingress for seconds)."""

    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(RequestModel):
    include_usage: Optional[bool] = None


class _Common(RequestModel):
    """Fields both endpoints share."""

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: Optional[int] = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, Texts]] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[LogitBias] = None
    user: Optional[str] = None
    # extensions
    top_k: Optional[int] = None
    ignore_eos: Optional[bool] = None
    stop_token_ids: Optional[TokenIds] = None
    repetition_penalty: Optional[float] = None
    min_tokens: Optional[int] = None
    return_token_ids: Optional[bool] = None  # vLLM's: each choice's prompt and output token ids
    response_format: Optional[dict[str, Any]] = None
    structured_outputs: Optional[dict[str, Any]] = None  # vLLM's: exactly one of json, regex, choice, grammar


class CompletionRequest(_Common):
    prompt: Union[str, TokenIds, Texts, TokenIdLists]
    echo: Optional[bool] = None
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None


# Messages and their parts are TypedDicts, not models: a 32 MiB body holds a million of them, and
# pydantic validates a TypedDict about 10 x faster than it builds a model (0.6 against 6 us a
# message on the 2-core box), all of it holding the GIL, so the ingress's event loop and every
# stream on it with it.
@with_config(ConfigDict(extra="allow", strict=True))
class ContentPart(TypedDict):
    type: str
    text: NotRequired[Optional[str]]


ContentParts = _fail_fast("ContentParts", list[ContentPart])


@with_config(ConfigDict(extra="allow", strict=True))
class ChatMessage(TypedDict):
    # extra fields (tool_calls, tool_call_id, reasoning_content...) pass on to the chat template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: NotRequired[Optional[Union[str, ContentParts]]]
    name: NotRequired[Optional[str]]
    tool_calls: NotRequired[Optional[list[dict[str, Any]]]]  # an assistant's earlier calls
    tool_call_id: NotRequired[Optional[str]]  # the call a tool message answers


ChatMessages = _fail_fast("ChatMessages", list[ChatMessage])


class ChatRequest(_Common):
    messages: ChatMessages
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[Tools] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    store: Optional[bool] = None
    metadata: Optional[Metadata] = None
    service_tier: Optional[str] = None
    reasoning_effort: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None


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


_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_FUNCTION_FIELDS = frozenset({"name", "description", "parameters", "strict"})  # OpenAI's function tool
MAX_TOOLS = 128
# schema objects in a request's strict tools, all walked on the event loop for keywords
# structured output does not enforce; OpenAI's strict mode allows 5,000 properties in all
MAX_STRICT_SUBSCHEMAS = 5000


def chat_tools(req: ChatRequest) -> list[dict[str, Any]]:
    """The request's tools, checked (OpenAI's shape: function tools with a name, an optional
    description and an optional JSON-schema ``parameters``); 400 naming the bad field."""
    tools = req.tools or []
    if len(tools) > MAX_TOOLS:
        raise bad_request(f"tools: at most {MAX_TOOLS} tools", "tools")
    names, strict_subschemas = set(), 0
    for k, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise bad_request(f"tools.{k}: must be {{'type': 'function', 'function': {{...}}}}", f"tools.{k}")
        unknown = sorted(set(fn) - _FUNCTION_FIELDS)
        if unknown:  # a misspelt "parameters" would leave the tool without a schema
            field = f"tools.{k}.function.{str(unknown[0])[:40]}"
            raise bad_request(f"{field}: unknown field; a function has {', '.join(sorted(_FUNCTION_FIELDS))}", field)
        name = fn.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise bad_request(
                f"tools.{k}.function.name: must be 1-64 of a-z, A-Z, 0-9, _ and -", f"tools.{k}.function.name"
            )
        if name in names:
            raise bad_request(f"tools.{k}.function.name: {name!r} is given twice", f"tools.{k}.function.name")
        names.add(name)
        params = fn.get("parameters")
        # the arguments are an object: a forced call's grammar takes this schema as they are
        if params is not None and not (isinstance(params, dict) and params.get("type", "object") == "object"):
            raise bad_request(
                f"tools.{k}.function.parameters: must be a JSON schema of an object (type 'object')",
                f"tools.{k}.function.parameters",
            )
        if not isinstance(fn.get("strict"), (bool, type(None))):
            raise bad_request(f"tools.{k}.function.strict: must be a boolean", f"tools.{k}.function.strict")
        # strict promises arguments that match the schema (OpenAI's meaning; the grammar holds them
        # to it where a call is forced): keywords it does not enforce are refused there; without
        # strict they pass, as clients routinely send them
        if not fn.get("strict"):
            continue
        strict_subschemas += count_subschemas(params, MAX_STRICT_SUBSCHEMAS - strict_subschemas)
        if strict_subschemas > MAX_STRICT_SUBSCHEMAS:
            message = f"tools: strict tools' parameters hold at most {MAX_STRICT_SUBSCHEMAS} schema objects in all"
            raise bad_request(message, "tools")
        unenforced = unenforced_keywords(params)
        if unenforced:
            param = f"tools.{k}.function.parameters"
            raise bad_request(f"{param}: strict, but structured output does not enforce {', '.join(unenforced)}", param)
    return tools


def tool_choice(req: ChatRequest) -> tuple[str, Optional[str]]:
    """("none" | "auto" | "required" | "function", the forced function's name or None);
    OpenAI's default: "auto" with tools, "none" without."""
    choice = req.tool_choice
    if choice is None:
        return ("auto" if req.tools else "none"), None
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise bad_request("tool_choice: must be 'none', 'auto', 'required' or a function", "tool_choice")
        return choice, None
    fn = choice.get("function") if choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise bad_request(
            "tool_choice: a function choice is {'type': 'function', 'function': {'name': ...}}", "tool_choice"
        )
    if name not in {t["function"]["name"] for t in req.tools or []}:  # checked by parse_request (chat_tools)
        raise bad_request(f"tool_choice: no tool is named {name!r}", "tool_choice")
    return "function", name


def grammar_spec(req: Any) -> Optional[GrammarSpec]:
    """The grammar of ``response_format`` (json_object, json_schema) or vLLM's
    ``structured_outputs`` (json, regex, choice, grammar); None for free text. Compiling
    it (which finds a bad schema or regex) is the engine's, which names the same field."""
    try:
        return _grammar_spec(req)
    except ValueError as e:  # GrammarSpec's own checks (size)
        field = str(e).partition(":")[0]
        raise bad_request(str(e), field, "invalid_value") from None


def _grammar_spec(req: Any) -> Optional[GrammarSpec]:
    fmt, ext = req.response_format, req.structured_outputs
    if fmt is not None and ext is not None:
        raise bad_request(
            "structured_outputs: give response_format or structured_outputs, not both", "structured_outputs"
        )
    if ext is not None:
        return _structured_outputs(ext)
    if fmt is None:
        return None
    kind = fmt.get("type")
    extra = sorted(set(fmt) - {"type", "json_schema" if kind == "json_schema" else "type"})
    if kind in ("text", "json_object", "json_schema") and extra:  # e.g. a schema given to json_object
        raise bad_request(f"response_format: {str(extra[0])[:40]!r} is not a field of type {kind!r}", "response_format")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json", "", "response_format")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad_request("response_format: json_schema.schema must be a JSON schema object", "response_format")
        unknown = sorted(set(spec) - {"name", "description", "schema", "strict"})
        if unknown or not isinstance(spec.get("strict"), (bool, type(None))):
            why = f"{str(unknown[0])[:40]!r} is not a field of it" if unknown else "strict must be a boolean"
            raise bad_request(f"response_format: json_schema: {why}", "response_format")
        return GrammarSpec("json", json.dumps(schema), "response_format")
    raise bad_request(
        f"response_format: type must be 'text', 'json_object' or 'json_schema', got {kind!r}", "response_format"
    )


def _structured_outputs(ext: dict[str, Any]) -> GrammarSpec:
    given = [k for k in ("json", "regex", "choice", "grammar") if ext.get(k) is not None]
    unknown = sorted(set(ext) - {"json", "regex", "choice", "grammar"})
    if unknown or len(given) != 1:
        named = ", ".join(k[:40] for k in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise bad_request(
            "structured_outputs: give exactly one of json, regex, choice, grammar"
            + (f" (unknown: {named})" if unknown else ""),
            "structured_outputs",
        )
    key, value = given[0], ext[given[0]]
    field = f"structured_outputs.{key}"
    if key == "json":
        if not isinstance(value, (dict, str)):
            raise bad_request(f"{field}: must be a JSON schema (an object or its text)", field)
        return GrammarSpec("json", value if isinstance(value, str) else json.dumps(value), field)
    if key == "choice":
        if not (isinstance(value, list) and value and all(isinstance(c, str) and c for c in value)):
            raise bad_request(f"{field}: must be a non-empty list of non-empty strings", field)
        return GrammarSpec("choice", json.dumps(value), field)
    if not isinstance(value, str) or not value:
        raise bad_request(f"{field}: must be a non-empty string", field)
    return GrammarSpec("regex" if key == "regex" else "ebnf", value, field)


def request_schemas(req: Any) -> list[tuple[str, Any]]:
    """The JSON schemas a parsed request gives (``parse_request`` checked their places), each
    with the field it sits in, as an object or its text: ``response_format``'s, ``structured_outputs.json``
    and each tool's ``parameters``; for ``MetaschemaCache.check``."""
    schemas: list[tuple[str, Any]] = []
    fmt, ext = req.response_format, req.structured_outputs
    if fmt is not None and fmt.get("type") == "json_schema":
        schemas.append(("response_format.json_schema.schema", fmt["json_schema"]["schema"]))
    if ext is not None and ext.get("json") is not None:
        schemas.append(("structured_outputs.json", ext["json"]))
    for k, tool in enumerate(getattr(req, "tools", None) or []):
        if tool["function"].get("parameters") is not None:
            schemas.append((f"tools.{k}.function.parameters", tool["function"]["parameters"]))
    return schemas


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
