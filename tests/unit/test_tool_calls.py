"""Tool calls: the hermes parser splits content from calls (whole, and streamed in any
pieces with the same result), leaves what is not a call as content, and its forced-call
grammar accepts exactly one call of the allowed tools; bad tools are 400s naming the field."""

from __future__ import annotations

import json
import random
import time

import pytest
import xgrammar

from raymoe.actors.engine.grammar import GrammarCompiler
from raymoe.actors.engine.tokenizer import Tokenizer
from raymoe.actors.models.builtin import resolve_model_path
from raymoe.deploy.api_error import APIError
from raymoe.deploy.openai_api import parse_request
from raymoe.deploy.openai_constraints import tool_choice
from raymoe.deploy.openai_request_models import ChatRequest
from raymoe.deploy.tool_calls import HermesToolParser, ToolCallStream, split_tool_calls

P = HermesToolParser()
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer", "minimum": 1}},
                "required": ["city", "days"],
                "additionalProperties": False,
            },
        },
    },
    {"type": "function", "function": {"name": "now"}},
]


def _strict_with_properties(name: str, count: int) -> dict:
    properties = {str(i): {"type": "integer"} for i in range(count)}
    return {
        "type": "function",
        "function": {"name": name, "strict": True, "parameters": {"type": "object", "properties": properties}},
    }


STRICT_UNENFORCED = {
    "type": "function",
    "function": {
        "name": "pick",
        "strict": True,
        "parameters": {"type": "object", "properties": {"a": {"type": "array", "items": {"not": {"type": "null"}}}}},
    },
}
TEXT = (
    "Let me check.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call>\n'
    '<tool_call>{"name": "now", "arguments": {}}</tool_call>'
)


def test_whole_output_splits_into_content_and_calls():
    content, calls = split_tool_calls(P, TEXT)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo", "days": 2}),
        ("now", {}),
    ]
    assert len({c.id for c in calls}) == 2
    assert split_tool_calls(P, "no calls <tool_ here") == ("no calls <tool_ here", [])
    bad = "<tool_call>not json</tool_call>"
    assert split_tool_calls(P, bad) == (bad, [])
    # the model's text nested past the JSON parser's depth, as the call or as its arguments
    deep = "[" * 100_000 + "]" * 100_000
    for body in (deep, json.dumps({"name": "now", "arguments": deep})):
        text = f"<tool_call>{body}</tool_call>"
        assert split_tool_calls(P, text) == (text, [])


@pytest.mark.parametrize("seed", range(5))
def test_streamed_in_any_pieces_equals_whole(seed):
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(TEXT)), 12))
    pieces = [TEXT[a:b] for a, b in zip([0, *cuts], [*cuts, len(TEXT)])]
    stream, content, calls = ToolCallStream(P), "", []
    for piece in pieces:
        c, new = stream.add(piece)
        assert "<tool_call>" not in c and "</tool_call>" not in c  # a call's text is never sent as content
        content, calls = content + c, calls + new
    content += stream.finish()[0]
    whole_content, whole_calls = split_tool_calls(P, TEXT)
    assert content.strip() == whole_content
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole_calls]


@pytest.mark.parametrize("piece", [None, 1, 5])
def test_an_end_tag_inside_the_arguments_does_not_end_the_call(piece):
    """A string argument holding "</tool_call>" (which a forced call's grammar allows): the call
    ends at the tag after its JSON. It ended at the first tag, and the whole output came back as
    content with no call."""
    args = {"s": "a </tool_call> b", "t": ["}", '"]"', "\\"]}
    text = "<tool_call>\n" + json.dumps({"name": "f", "arguments": args}) + "\n</tool_call> after"
    content, calls = _split(text, piece)
    assert content.strip() == "after" and [(c.name, json.loads(c.arguments)) for c in calls] == [("f", args)]


@pytest.mark.parametrize("piece", [None, 1, 5])
def test_a_call_left_open_ends_at_its_tag(piece):
    """A call whose JSON misses its closing brace ends at the end tag outside its strings: it
    comes back as content, and the well-formed call after it is a call. The open bracket had
    every later tag read as argument text: the next call was lost, and nothing after streamed
    until the output ended."""
    text = (
        '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>\n'
        '<tool_call>\n{"name": "g", "arguments": {"b": 2}}\n</tool_call> after'
    )
    content, calls = _split(text, piece)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("g", {"b": 2})]
    assert content.startswith('<tool_call>\n{"name": "f"') and content.strip().endswith("after")
    stream = ToolCallStream(P)
    stream.add('<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>\n')
    assert stream.add("Here is the answer.")[0].endswith("Here is the answer.")


def test_forced_call_with_an_end_tag_in_an_argument_parses(compiler):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"s": {}}}}}
    text = '<tool_call>\n{"name": "f", "arguments": {"s": "</tool_call>"}}\n</tool_call>'
    assert xgrammar.GrammarMatcher(compiler.compile(P.forced_call([tool], "f"))).accept_string(text)
    content, calls = split_tool_calls(P, text)
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"s": "</tool_call>"})]


def test_a_forced_call_of_a_tool_whose_pattern_names_a_backslash_parses(compiler):
    """A non-strict tool's pattern naming a backslash (a Windows path): xgrammar writes it raw,
    so the forced call's grammar accepted arguments that are not JSON, and the call came back
    as content. Such a pattern is dropped from the grammar; the others hold."""
    path = {"type": "string", "pattern": "^[A-Z]:\\\\[a-z]+$"}
    name = {"type": "string", "pattern": "^[a-z]+$"}
    params = {"type": "object", "properties": {"path": path, "name": name}, "required": ["path", "name"]}
    tool = {"type": "function", "function": {"name": "open", "parameters": params}}
    grammar = compiler.compile(P.forced_call([tool], None))
    raw = '<tool_call>\n{"name": "open", "arguments": {"path": "C:\\abc", "name": "x"}}\n</tool_call>'
    assert not xgrammar.GrammarMatcher(grammar).accept_string(raw)
    escaped = '<tool_call>\n{"name": "open", "arguments": {"path": "C:\\\\abc", "name": "x"}}\n</tool_call>'
    assert xgrammar.GrammarMatcher(grammar).accept_string(escaped)
    assert [json.loads(c.arguments) for c in split_tool_calls(P, escaped)[1]] == [{"path": "C:\\abc", "name": "x"}]
    assert not xgrammar.GrammarMatcher(grammar).accept_string(escaped.replace('"x"', '"X"'))


@pytest.mark.parametrize("piece", [None, 1, 7])
def test_a_short_call_after_long_content_is_found(piece):
    """The end tag is searched for from where the call's text starts, whatever came before it
    (whole, or streamed in pieces of ``piece`` characters)."""
    text = "x" * 200 + '<tool_call>{"name": "now", "arguments": {}}</tool_call> y'
    content, calls = _split(text, piece)
    assert (content, [c.name for c in calls]) == ("x" * 200 + " y", ["now"])


def _split(text: str, piece: int | None) -> tuple[str, list]:
    """split_tool_calls of the whole text (piece None), or the text streamed in pieces."""
    if piece is None:
        return split_tool_calls(P, text)
    stream, content, calls = ToolCallStream(P), "", []
    for at in range(0, len(text), piece):
        c, new = stream.add(text[at : at + piece])
        content, calls = content + c, calls + new
    return content + stream.finish()[0], calls


def test_an_unclosed_call_ends_as_content():
    stream = ToolCallStream(P)
    assert stream.add('hi <tool_call>{"name": "x"') == ("hi ", [])
    assert stream.finish() == ('<tool_call>{"name": "x"', [])


@pytest.fixture(scope="module")
def compiler():
    d = resolve_model_path("builtin:tiny-qwen3-moe")
    tok = Tokenizer.from_dir(d)
    return GrammarCompiler(tok, 512, tok.eos_token_ids)


@pytest.mark.parametrize("name", [None, "get_weather"])
def test_forced_call_grammar_accepts_one_call_of_the_allowed_tools(compiler, name):
    compiled = compiler.compile(P.forced_call(TOOLS, name))

    def accepts(text: str) -> bool:
        return xgrammar.GrammarMatcher(compiled).accept_string(text)

    weather = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
    assert accepts(weather)
    assert accepts('<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>') == (name is None)
    assert not accepts('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 3}}\n</tool_call>')
    assert not accepts('<tool_call>\n{"name": "other", "arguments": {}}\n</tool_call>')


# pydantic's shape for nested models: local $defs, and a recursive "#" ref (a tree of nodes)
NESTED = {
    "type": "function",
    "function": {
        "name": "route",
        "parameters": {
            "type": "object",
            "$defs": {"Loc": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
            "definitions": {"Days": {"type": "integer", "minimum": 1}},
            "properties": {
                "loc": {"$ref": "#/$defs/Loc"},
                "days": {"$ref": "#/definitions/Days"},
                "next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]},
            },
            "required": ["loc", "days", "next"],
            "additionalProperties": False,
        },
    },
}


@pytest.mark.parametrize("name", [None, "route"])
def test_forced_call_of_a_tool_with_local_refs_follows_them(compiler, name):
    """Before, the tool's schema was nested under the call's, so its "#/..." refs pointed at the
    call's root: a 400 ("Cannot find field '$defs'") where OpenAI takes the tool."""
    compiled = compiler.compile(P.forced_call([*TOOLS, NESTED], name))

    def accepts(arguments: str) -> bool:
        text = '<tool_call>\n{"name": "route", "arguments": ' + arguments + "}\n</tool_call>"
        return xgrammar.GrammarMatcher(compiled).accept_string(text)

    inner = '{"loc": {"city": "Oslo"}, "days": 1, "next": null}'
    assert accepts('{"loc": {"city": "Paris"}, "days": 3, "next": ' + inner + "}")
    assert not accepts('{"loc": {"town": "Paris"}, "days": 3, "next": null}')  # Loc needs a city
    assert not accepts('{"loc": {"city": "Paris"}, "days": 0, "next": null}')  # Days >= 1
    assert not accepts('{"loc": {"city": "Paris"}, "days": 3, "next": {"days": 2}}')  # next is a whole route


# refs that stay as they are: to an $anchor, and "$ref" keys inside values (const, enum)
ANCHORED = {
    "type": "function",
    "function": {
        "name": "pick",
        "parameters": {
            "type": "object",
            "$defs": {"Int": {"$anchor": "int", "type": "integer"}},
            "properties": {
                "n": {"$ref": "#int"},
                "tag": {"const": {"$ref": "#"}},
                "kind": {"enum": [{"$ref": "#/$defs/Int"}, "plain"]},
            },
            "required": ["n", "tag", "kind"],
            "additionalProperties": False,
        },
    },
}


def test_forced_call_keeps_anchor_refs_and_values_that_look_like_refs(compiler):
    """The tool's schema moves under the call's $defs: a ref to an $anchor ("#int") and a
    "$ref" key in a const or enum value are not rewritten (they were, to "#/$defs/tool0int", a
    400, and into the values themselves). xgrammar reads "#int" as any value, as it does in a
    response_format; strict tools refuse it (json_schema.unenforced_keywords)."""
    compiled = compiler.compile(P.forced_call([ANCHORED], "pick"))

    def accepts(arguments: str) -> bool:
        text = '<tool_call>\n{"name": "pick", "arguments": ' + arguments + "}\n</tool_call>"
        return xgrammar.GrammarMatcher(compiled).accept_string(text)

    # xgrammar writes a const or enum object compactly, and the call's other JSON as json.dumps does
    assert accepts('{"n": 3, "tag": {"$ref":"#"}, "kind": {"$ref":"#/$defs/Int"}}')
    assert accepts('{"n": 3, "tag": {"$ref":"#"}, "kind": "plain"}')
    assert not accepts('{"n": 3, "tag": {"$ref":"#/$defs/tool0"}, "kind": "plain"}')
    assert not accepts('{"n": 3, "tag": {"$ref":"#"}, "kind": {"$ref":"#/$defs/tool0_defs_Int"}}')


def _chat(body: dict) -> ChatRequest:
    return parse_request(ChatRequest, json.dumps({"messages": [{"role": "user", "content": "x"}], **body}).encode())


def test_tool_choice_modes():
    assert tool_choice(_chat({})) == ("none", None)
    assert tool_choice(_chat({"tools": TOOLS})) == ("auto", None)
    assert tool_choice(_chat({"tools": TOOLS, "tool_choice": "required"})) == ("required", None)
    named = {"type": "function", "function": {"name": "now"}}
    assert tool_choice(_chat({"tools": TOOLS, "tool_choice": named})) == ("function", "now")


@pytest.mark.parametrize(
    "body,param",
    [
        ({"tools": [{"type": "retrieval"}]}, "tools.0"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools.0.function.name"),
        ({"tools": [TOOLS[1], TOOLS[1]]}, "tools.1.function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]}, "tools.0.function.parameters"),
        # a misspelt "parameters": the tool would have no schema
        ({"tools": [{"type": "function", "function": {"name": "f", "parameter": {}}}]}, "tools.0.function.parameter"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": f"f{k}"}} for k in range(129)]}, "tools"),
        ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
        # it used to be dropped silently, the call forced
        ({"tools": TOOLS, "tool_choice": "required", "structured_outputs": {"regex": "z"}}, "structured_outputs"),
        ({"tools": [{"type": "function", "function": {"name": "f", "strict": "yes"}}]}, "tools.0.function.strict"),
        ({"tools": [{"type": "function", "function": {"name": "f", "strict": 0}}]}, "tools.0.function.strict"),
        # a forced call would write arguments that are no object, which no parser takes
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "integer"}}}]},
            "tools.0.function.parameters",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": ["object", "null"]}}}]},
            "tools.0.function.parameters",
        ),
        # strict tools' schemas are walked on the event loop: bounded in all
        ({"tools": [_strict_with_properties(f"f{k}", 2000) for k in range(3)]}, "tools"),
        # strict: arguments must match, and the grammar would not enforce "not" (deep inside)
        ({"tools": [TOOLS[1], STRICT_UNENFORCED]}, "tools.1.function.parameters"),
    ],
)
def test_bad_tools_are_400s_naming_the_field(body, param):
    with pytest.raises(APIError) as e:
        r = _chat(body)
        tool_choice(r)
    assert (e.value.status, e.value.param) == (400, param)


def test_unenforced_keywords_pass_in_tools_that_are_not_strict():
    loose = {"type": "function", "function": {**STRICT_UNENFORCED["function"], "strict": False}}
    assert tool_choice(_chat({"tools": [loose], "tool_choice": "required"})) == ("required", None)
    # the bound on strict schemas is for them all: two large ones fit
    assert tool_choice(_chat({"tools": [_strict_with_properties(f"f{k}", 2000) for k in range(2)]})) == ("auto", None)


def test_many_end_tags_inside_an_argument_are_read_in_linear_time():
    """Each end tag inside a call's string read the call's text from its start again: 8,000 of
    them (a model forced by a regex to write them) held the ingress's event loop 11 s."""
    parser = HermesToolParser()
    head = parser.begin + '\n{"name": "f", "arguments": {"a": "'
    for pieces in (False, True):
        t0 = time.monotonic()
        text = head + parser.end * 20_000 + '"}}\n' + parser.end
        if pieces:
            stream = ToolCallStream(parser)
            calls = [c for i in range(0, len(text), 7) for c in stream.add(text[i : i + 7])[1]]
        else:
            calls = split_tool_calls(parser, text)[1]
        assert time.monotonic() - t0 < 2.0
        assert [json.loads(c.arguments) for c in calls] == [{"a": parser.end * 20_000}]
