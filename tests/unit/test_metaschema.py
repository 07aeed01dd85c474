"""Every JSON schema a request gives (response_format's, structured_outputs.json, each tool's
parameters) is checked against its draft's metaschema, with jsonschema as the reference: the
schemas it refuses are refused (a 400 naming the field, the place in the schema and jsonschema's
reason), the ones it takes (OpenAI's strict schemas, pydantic's, draft-07 ones) are taken; once
a request, off the event loop, remembered by text."""

from __future__ import annotations

import asyncio
import json
import random
import threading
from types import SimpleNamespace

import jsonschema
import pytest

from raymoe.actors.engine import metaschema
from raymoe.actors.engine.metaschema import MetaschemaCache, metaschema_error
from raymoe.deploy.api_error import APIError

DRAFT7 = "http://json-schema.org/draft-07/schema#"
INVALID = [
    {"type": []},
    {"allOf": []},
    {"anyOf": []},
    {"oneOf": []},
    {"type": "strin"},
    {"type": ["string", "string"]},
    {"type": "object", "properties": {"a": {"type": "strin"}}},
    {"type": "object", "properties": []},
    {"type": "object", "required": "a"},
    {"type": "object", "properties": {"a": {"type": "string", "required": True}}},  # draft-03's required
    {"type": "object", "additionalProperties": "false"},
    {"type": "string", "minLength": -1},
    {"type": "string", "maxLength": 1.5},
    {"type": "number", "multipleOf": 0},
    {"type": "array", "items": 3},
    {"$ref": 3},
    {"enum": 3},
    {"format": 3},
    {"$schema": 3},
    {"$schema": DRAFT7, "type": []},
    {"$schema": DRAFT7, "definitions": {"a": 3}},
    {"$schema": DRAFT7, "type": "object", "required": ["a", "a"]},
    [],
    3,
]

_PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        "address": {"$ref": "#/$defs/Address"},
    },
    "required": ["name", "age", "address"],
    "additionalProperties": False,
    "$defs": {
        "Address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": ["string", "null"]}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        }
    },
}


def _pydantic_schemas() -> list[dict]:
    import datetime
    import enum
    from typing import Literal, Optional

    import pydantic

    class Colour(enum.Enum):
        RED = "red"

    class Place(pydantic.BaseModel):
        city: str = pydantic.Field(description="a city", min_length=1)
        zip_code: Optional[str] = pydantic.Field(default=None, pattern=r"^\d{5}$")

    class Order(pydantic.BaseModel):
        kind: Literal["order"]
        colour: Colour
        count: int = pydantic.Field(ge=1, le=9)
        tags: list[str] = pydantic.Field(max_length=3)
        place: Place
        previous: Optional["Order"] = None
        when: datetime.date
        price: float = pydantic.Field(gt=0, multiple_of=0.01)

    return [Order.model_json_schema(), Place.model_json_schema(), pydantic.TypeAdapter(list[Place]).json_schema()]


VALID = [
    _PERSON,  # OpenAI's strict mode: additionalProperties false, every name required, $defs, null unions
    {"type": "object", "properties": {"steps": {"type": "array", "items": {"$ref": "#"}}}, "required": ["steps"]},
    {"type": "object", "properties": {}, "required": [], "additionalProperties": False},
    {"type": "object", "properties": {"location": {"type": "string", "description": "City"}}, "required": []},
    {"type": "string", "enum": ["a", "b"], "title": "T", "description": "d", "default": "a", "examples": ["a"]},
    {"type": "object", "nullable": True, "x-custom": 1},  # unknown keywords are allowed
    {"$schema": DRAFT7, "type": "object", "properties": {"a": {"$ref": "#/definitions/A"}}, "definitions": {"A": {}}},
    {"$schema": DRAFT7, "type": "object", "properties": {"a": {"type": "integer", "exclusiveMinimum": 0}}},
    {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "array", "prefixItems": [{"type": "integer"}]},
    {"$schema": "https://example.com/own-dialect", "type": "string"},  # unknown: any draft's
    # draft-07 schemas that do not say so: tuple items (pydantic v1), definitions
    {"type": "array", "items": [{"type": "integer"}, {"type": "string"}]},
    {"type": "object", "properties": {"a": {"$ref": "#/definitions/A"}}, "definitions": {"A": {"type": "string"}}},
    {  # an MCP server's tool, as zod-to-json-schema writes it
        "type": "object",
        "properties": {"path": {"type": "string", "description": "file"}, "lines": {"type": "number"}},
        "required": ["path"],
        "additionalProperties": False,
        "$schema": DRAFT7,
    },
    {"type": "string", "format": "date-time"},
    True,
    {},
    *_pydantic_schemas(),
]


ECMA_PATTERN = {"type": "string", "pattern": "^x[^]+$"}  # ECMA-262's "[^]", which Python's re refuses
VALID.append(ECMA_PATTERN)


def _reference(schema, regex: bool = True) -> bool:
    """jsonschema's own check_schema, formats left out: against the draft $schema names, or where
    it names none jsonschema knows, against each draft's until one takes it. True where one does.
    ``regex``: with its "regex" format (Python's re)."""
    known = isinstance(schema, dict) and isinstance(schema.get("$schema"), str)  # else it raises TypeError
    named = jsonschema.validators.validator_for(schema, default=None) if known else None
    drafts = [named] if named else [getattr(jsonschema, f"Draft{d}Validator") for d in ("202012", "201909", "7", "6")]
    formats = jsonschema.FormatChecker(formats=())
    if regex:
        formats.checkers = {"regex": jsonschema.Draft202012Validator.FORMAT_CHECKER.checkers["regex"]}
    for validator in drafts:
        try:
            validator.check_schema(schema, format_checker=formats)
            return True
        except jsonschema.SchemaError:
            pass
    return False


@pytest.mark.parametrize("schema", INVALID + VALID, ids=[json.dumps(s)[:60] for s in INVALID + VALID])
def test_refused_exactly_where_jsonschema_refuses(schema):
    error = metaschema_error(schema)
    assert (error is not None) == (schema in INVALID), error
    assert (error is not None) == (not _reference(schema)) or schema is ECMA_PATTERN


def test_a_pattern_is_left_to_the_grammar_s_own_regex_parser():
    """Python's re (jsonschema's "regex" format) refuses ECMA-262 that xgrammar takes; a pattern
    no regex parser takes is refused where the grammar compiles."""
    assert not _reference(ECMA_PATTERN) and _reference(ECMA_PATTERN, regex=False)
    assert metaschema_error(ECMA_PATTERN) is None and metaschema_error({"pattern": "("}) is None


def _server():
    from raymoe.deploy.openai_server import OpenAIServer

    async def tokenize_chat(*args, **kwargs):
        return [1, 2, 3]

    client = SimpleNamespace(tokenize_chat=tokenize_chat, info=SimpleNamespace(token_limit=100, max_model_len=100))
    return OpenAIServer(client, "m", "m")


def _tool(name: str, parameters: dict) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": parameters, "strict": True}}


@pytest.mark.parametrize(
    "body,param,where",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": []}}}},
            "response_format.json_schema.schema",
            "at $.type: [] is not valid under any of the given schemas",
        ),
        ({"structured_outputs": {"json": {"allOf": []}}}, "structured_outputs.json", "at $.allOf: [] should be non"),
        (
            {"structured_outputs": {"json": '{"type": "object", "required": "a"}'}},
            "structured_outputs.json",
            "at $.required: 'a' is not of type 'array'",
        ),
        (
            {"tools": [_tool("ok", _PERSON), _tool("bad", {"type": "object", "properties": {"a": {"type": "strin"}}})]},
            "tools.1.function.parameters",
            "at $.properties.a.type: 'strin' is not valid",
        ),
    ],
    ids=["response_format", "structured_outputs", "structured_outputs-text", "tool"],
)
def test_an_invalid_schema_is_a_400_naming_the_field_the_place_and_the_reason(body, param, where):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}
    with pytest.raises(APIError) as e:
        asyncio.run(_server().chat(json.dumps(body).encode()))
    assert e.value.status == 400 and e.value.param == param, e.value.message
    assert e.value.message.startswith(f"{param}: invalid JSON schema (Draft202012 ") and where in e.value.message


def test_the_completions_route_checks_its_schema_too():
    response_format = {"type": "json_schema", "json_schema": {"schema": {"type": []}}}
    body = {"model": "m", "prompt": "x", "response_format": response_format}
    with pytest.raises(APIError) as e:
        asyncio.run(_server().completions(json.dumps(body).encode()))
    assert e.value.status == 400 and e.value.param == "response_format.json_schema.schema"


def test_checked_once_per_schema_off_the_event_loop(monkeypatch):
    """Each schema's check runs in a worker thread, and a schema checked before is not checked again."""
    calls = []

    def counted(schema):
        calls.append((json.dumps(schema), threading.get_ident()))
        return None

    monkeypatch.setattr(metaschema, "metaschema_error", counted)
    server = _server()
    req = SimpleNamespace(
        response_format={"type": "json_schema", "json_schema": {"schema": _PERSON}},
        structured_outputs=None,
        tools=[_tool("a", {"type": "object"}), _tool("b", {"type": "object"})],
    )

    async def main():
        await server.check_schemas(req)
        await server.check_schemas(req)
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert sorted(text for text, _ in calls) == sorted([json.dumps(_PERSON), json.dumps({"type": "object"})])
    assert all(thread != loop_thread for _, thread in calls)


def test_a_request_s_schemas_are_bounded_in_all():
    """Past MAX_CHECKED_CHARS in all the schema that goes over is refused, unchecked."""
    half = {"type": "object", "description": "x" * (metaschema.MAX_CHECKED_CHARS // 2)}
    schemas = [(f"tools.{k}.function.parameters", half) for k in range(3)]
    MetaschemaCache().check(schemas[:1])
    with pytest.raises(ValueError, match=r"^tools\.1\.function\.parameters: the request's JSON schemas hold over"):
        MetaschemaCache().check(schemas)


def test_hostile_schemas_get_an_answer_never_an_exception():
    rng = random.Random(0)
    keys = ["type", "properties", "items", "allOf", "anyOf", "$ref", "$defs", "required", "pattern", "$schema", "enum"]
    leaves = [None, True, 0, -1, 1e308, "x", "(", "string", [], {}, [[]], DRAFT7]

    def junk(depth=0):
        if depth > 3 or rng.random() < 0.3:
            return rng.choice(leaves)
        if rng.random() < 0.3:
            return [junk(depth + 1) for _ in range(rng.randint(0, 3))]
        return {rng.choice(keys): junk(depth + 1) for _ in range(rng.randint(0, 4))}

    for _ in range(500):
        schema = junk()
        assert (metaschema_error(schema) is None) == _reference(schema, regex=False)
    deep = '{"items": ' * 5000 + "{}" + "}" * 5000
    assert MetaschemaCache().error(deep) == "the schema nests too deep to check"


def test_the_jsonschema_required_has_what_the_check_calls():
    """metaschema_error calls ``check_schema(schema, format_checker=...)`` and reads the validators'
    ``FORMAT_CHECKER``: jsonschema 4.17 and 4.5. "jsonschema>=4" let an older one already installed
    stay, and every request with a schema raised TypeError there (a 500)."""
    import pathlib
    import re

    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    text = (pathlib.Path(__file__).parents[2] / "pyproject.toml").read_text()
    specifiers = [SpecifierSet(s) for s in re.findall(r'"jsonschema([^"\[]*)"', text)]
    assert len(specifiers) == 2  # the dependency and the test extra's
    assert not any(s.contains(Version("4.16.0")) for s in specifiers)
    assert all(s.contains(Version("4.17.0")) for s in specifiers)
