"""The chat route with a reasoning parser, over a stand-in engine client that streams a
thinking answer: the message's reasoning_content and content, streamed and not, checked
with the official openai client's own response types."""

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
    """Streams PIECES as one token each, whatever the request."""

    def __init__(self) -> None:
        self.info = SimpleNamespace(token_limit=1000, max_model_len=1000)
        self.tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens=True: "?")

    async def tokenize_chat(self, messages, kwargs):
        return [1, 2, 3]

    async def stream(self, ids, params):
        for n, piece in enumerate(PIECES, 1):
            yield Delta(
                token_ids=[n], text=piece, finish_reason="stop" if n == len(PIECES) else None, num_output_tokens=n
            )


def _server(parser):
    return OpenAIServer(StandInClient(), "m", "m", reasoning_parser=parser)


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
    async def collect():
        events = await _server(parser).chat(BODY[:-1] + b', "stream": true}')
        return b"".join([e async for e in events])

    raw = asyncio.run(collect())
    reasoning, content = "", ""
    for line in raw.split(b"\n\n"):
        if not line.startswith(b"data: {"):
            continue
        chunk = chat_types.ChatCompletionChunk.model_validate(json.loads(line[6:]))
        for choice in chunk.choices:
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            content += choice.delta.content or ""
    if parser:
        assert (reasoning, content) == ("Let me think.", "Paris it is.")
    else:
        assert (reasoning, content) == ("", "".join(PIECES))
