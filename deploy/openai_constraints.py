"""What constrains a request's output: its tools and tool_choice (checked in OpenAI's shapes),
and its structured output (``response_format``, vLLM's ``structured_outputs``) as a grammar
spec; the JSON schemas they give, for the metaschema check. A bad field is a 400 naming it."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any, Optional

from raymoe.actors.engine.grammar import GrammarSpec
from raymoe.actors.engine.json_schema import count_subschemas, unenforced_keywords
from raymoe.deploy.api_error import bad_request

if TYPE_CHECKING:
    from raymoe.deploy.openai_request_models import ChatRequest

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
