"""The chat route with a reasoning parser and tool calls, over a stand-in engine client that
streams a scripted answer: the message's reasoning_content, content and tool_calls, streamed
and not, checked with the official openai client's own response types; the tools reach the
chat template; a large response, encoded in slices, is the body a small one would be."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import openai.types.chat as chat_types
import pytest

from raymoe.actors.engine.output_text import Delta
from raymoe.deploy.openai_server import OpenAIServer

PIECES = ["<thi", "nk>Let me ", "think.</th", "ink>\n\nParis", " it is."]


class StandInClient:
    """Streams ``pieces`` as one token each, whatever the request; keeps the tools it got."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces
        self.tools = None
        self.info = SimpleNamespace(token_limit=1000, max_model_len=1000)
        self.tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens=True: "?")

    async def tokenize_chat(self, messages, kwargs, tools=None):
        self.tools = tools
        return [1, 2, 3]

    async def stream(self, ids, params):
        for n, piece in enumerate(self.pieces, 1):
            yield Delta(
                token_ids=[n], text=piece, finish_reason="stop" if n == len(self.pieces) else None, num_output_tokens=n
            )


def _server(parser, pieces=PIECES):
    return OpenAIServer(StandInClient(pieces), "m", "m", reasoning_parser=parser)


def _streamed(server, body: bytes) -> list:
    async def collect():
        events = await server.chat(body[:-1] + b', "stream": true}')
        return b"".join([e async for e in events])

    raw = asyncio.run(collect())
    return [
        chat_types.ChatCompletionChunk.model_validate(json.loads(line[6:]))
        for line in raw.split(b"\n\n")
        if line.startswith(b"data: {")
    ]


BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "?"}]}).encode()


@pytest.mark.parametrize(
    "parser,reasoning,content", [("qwen3", "Let me think.", "Paris it is."), (None, None, "".join(PIECES))]
)
def test_reasoning_content_not_streamed(parser, reasoning, content):
    response = chat_types.ChatCompletion.model_validate(asyncio.run(_server(parser).chat(BODY)))
    message = response.choices[0].message
    assert message.content == content
    assert getattr(message, "reasoning_content", None) == reasoning


@pytest.mark.parametrize("parser", ["qwen3", None])
def test_reasoning_content_streamed(parser):
    reasoning, content = "", ""
    for chunk in _streamed(_server(parser), BODY):
        for choice in chunk.choices:
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            content += choice.delta.content or ""
    if parser:
        assert (reasoning, content) == ("Let me think.", "Paris it is.")
    else:
        assert (reasoning, content) == ("", "".join(PIECES))


TOOLS = [{"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}]
CALLING = ["<think>hm</think>Sure. <tool", '_call>\n{"name": "now", "argu', 'ments": {}}\n</tool_call>']


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_with_reasoning(stream):
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "?"}], "tools": TOOLS}).encode()
    server = _server("qwen3", CALLING)
    if stream:
        chunks = _streamed(server, body)
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
        calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        assert [tc.index for tc in calls] == [0]
    else:
        choice = chat_types.ChatCompletion.model_validate(asyncio.run(server.chat(body))).choices[0]
        content, reasoning, calls = choice.message.content, choice.message.reasoning_content, choice.message.tool_calls
        finish = choice.finish_reason
    assert (content.strip(), reasoning, finish) == ("Sure.", "hm", "tool_calls")
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("now", {})]
    assert server.client.tools == TOOLS  # the chat template saw them


def test_tool_choice_none_leaves_calls_as_content():
    body = {"model": "m", "messages": [{"role": "user", "content": "?"}], "tools": TOOLS, "tool_choice": "none"}
    server = _server(None, CALLING)
    choice = chat_types.ChatCompletion.model_validate(asyncio.run(server.chat(json.dumps(body).encode()))).choices[0]
    assert choice.message.content == "".join(CALLING) and not choice.message.tool_calls
    assert choice.finish_reason == "stop" and server.client.tools is None


def test_tools_too_large_to_force_are_a_400_naming_tools():
    from raymoe.deploy.api_error import APIError

    huge = {"type": "object", "properties": {"x": {"enum": ["y" * 70000]}}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": huge}}]
    body = {"model": "m", "messages": [{"role": "user", "content": "?"}], "tools": tools, "tool_choice": "required"}
    with pytest.raises(APIError) as e:
        asyncio.run(_server(None, CALLING).chat(json.dumps(body).encode()))
    assert (e.value.status, e.value.param) == (400, "tools")


def test_a_large_response_encoded_in_slices_is_the_body_built_inline(monkeypatch):
    """Past INLINE_RESPONSE_ITEMS the body comes encoded (bytes, a slice at a time): the same
    JSON as the inline dict, reasoning and tool calls included."""
    from raymoe.deploy import openai_choices

    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "?"}], "tools": TOOLS, "n": 2}).encode()
    inline = asyncio.run(_server("qwen3", CALLING).chat(body))
    monkeypatch.setattr(openai_choices, "INLINE_RESPONSE_ITEMS", -1)  # every body
    encoded = asyncio.run(_server("qwen3", CALLING).chat(body))
    assert isinstance(inline, dict) and isinstance(encoded, bytes)
    built = json.loads(encoded)
    assert built["id"] != inline["id"]
    assert _without_ids(built) == _without_ids(inline)
    assert chat_types.ChatCompletion.model_validate(built).choices[1].message.tool_calls[0].function.name == "now"


def _without_ids(body: dict) -> dict:
    """The body less what each response draws afresh: its id and time, its tool calls' ids."""
    body = {k: v for k, v in json.loads(json.dumps(body)).items() if k not in ("id", "created")}
    for choice in body["choices"]:
        for call in choice["message"].get("tool_calls") or []:
            call.pop("id")
    return body


def test_structured_output_is_content_under_a_parser_whose_thinking_starts_open():
    """deepseek_r1's answers open inside a thinking block; a grammar never lets the model close
    it, so constrained output goes to content (it all went to reasoning_content)."""
    pieces = ['{"city": ', '"Paris"}']
    constrained = json.loads(BODY)
    constrained["response_format"] = {"type": "json_object"}
    body = json.dumps(constrained).encode()
    response = chat_types.ChatCompletion.model_validate(asyncio.run(_server("deepseek_r1", pieces).chat(body)))
    message = response.choices[0].message
    assert message.content == '{"city": "Paris"}' and getattr(message, "reasoning_content", None) is None
    streamed = _streamed(_server("deepseek_r1", pieces), body)
    assert "".join(c.delta.content or "" for chunk in streamed for c in chunk.choices) == '{"city": "Paris"}'
    assert not any(getattr(c.delta, "reasoning_content", None) for chunk in streamed for c in chunk.choices)
    # unconstrained, the same text is deepseek_r1's reasoning: the parser is on
    plain = chat_types.ChatCompletion.model_validate(asyncio.run(_server("deepseek_r1", pieces).chat(BODY)))
    assert getattr(plain.choices[0].message, "reasoning_content", None) == '{"city": "Paris"}'


TWO_CALLS = [
    '<tool_call>\n{"name": "now", "arguments": {}}\n</tool',
    '_call>\nAnd <tool_call>\n{"name": "now", "argu',
    'ments": {"tz": "UTC"}}\n</tool_call>',
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("parallel", [None, True, False])
def test_parallel_tool_calls_false_keeps_each_choices_first_call(stream, parallel):
    """As OpenAI promises and vLLM does: parallel_tool_calls false returns one call, the later
    ones dropped (neither calls nor content); unset or true, every call."""
    body = {"model": "m", "messages": [{"role": "user", "content": "?"}], "tools": TOOLS}
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    server = _server(None, TWO_CALLS)
    if stream:
        chunks = _streamed(server, json.dumps(body).encode())
        calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert [tc.index for tc in calls] == list(range(len(calls)))
    else:
        choice = chat_types.ChatCompletion.model_validate(asyncio.run(server.chat(json.dumps(body).encode()))).choices[
            0
        ]
        calls, content = choice.message.tool_calls, choice.message.content or ""
        assert choice.finish_reason == "tool_calls"
    want = [{}] if parallel is False else [{}, {"tz": "UTC"}]
    assert [json.loads(c.function.arguments) for c in calls] == want
    assert content.strip() == "And"
