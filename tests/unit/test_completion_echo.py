"""Completions with echo, logprobs and n > 1, over a stand-in engine client: the engine is
asked for a prompt's logprobs once (by its first choice), and every choice echoes them,
streamed and not, even when another choice's tokens come first."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from raymoe.actors.engine.messages import Logprob
from raymoe.actors.engine.output_text import Delta
from raymoe.deploy.openai_server import OpenAIServer

PROMPTS = {"a b c": [11, 12, 13], "d e": [21, 22]}


def _prompt_logprobs(ids: list[int]) -> list:
    return [None] + [Logprob(t, -0.5 * t, ((t, -0.5 * t),)) for t in ids[1:]]


class StandInClient:
    """Streams two tokens per request; the prompt's logprobs (a function of the prompt) in the
    first delta when asked. ``lead_late``: requests that ask for them start late (the other
    choices' tokens come first); else the others do."""

    def __init__(self, lead_late: bool = True) -> None:
        self.lead_late = lead_late
        self.asked: list[tuple[list[int], bool]] = []
        self.info = SimpleNamespace(token_limit=1000, max_model_len=1000)
        self.tokenizer = SimpleNamespace(
            decode=lambda ids, skip_special_tokens=True: " ".join(map(str, ids)),
            token_bytes=lambda i: str(i).encode(),
        )

    async def tokenize_prompts(self, prompts, param="prompt"):
        return [PROMPTS[p] for p in prompts]

    async def stream(self, ids, params):
        wants = params.prompt_logprobs is not None
        self.asked.append((ids, wants))
        if wants == self.lead_late:
            await asyncio.sleep(0.05)
        for n in (1, 2):
            yield Delta(
                token_ids=[90 + n],
                text=f" t{n}",
                finish_reason="length" if n == 2 else None,
                num_output_tokens=n,
                logprobs=[Logprob(90 + n, -1.0, ((90 + n, -1.0),))],
                prompt_logprobs=_prompt_logprobs(ids) if wants and n == 1 else None,
            )


def _body(**fields) -> bytes:
    return json.dumps({"model": "m", "prompt": list(PROMPTS), "max_tokens": 2, "logprobs": 1, **fields}).encode()


def _streamed_choices(server: OpenAIServer, body: bytes) -> tuple[dict[int, list[float]], list[int]]:
    """Each choice's logprobs from the chunks, and the choice index of each chunk in order."""

    async def collect():
        return b"".join([e async for e in await server.completions(body)])

    logprobs: dict[int, list] = {}
    order = []
    for line in asyncio.run(collect()).split(b"\n\n"):
        if line.startswith(b"data: {"):
            for c in json.loads(line[6:])["choices"]:
                logprobs.setdefault(c["index"], []).extend(c["logprobs"]["token_logprobs"])
                order.append(c["index"])
    return logprobs, order


@pytest.mark.parametrize("lead_late", [True, False], ids=["lead-late", "lead-first"])
def test_each_prompt_logprobs_are_computed_once_and_echoed_by_every_choice(lead_late):
    expected = {
        i: [None if lp is None else lp.logprob for lp in _prompt_logprobs(ids)] + [-1.0, -1.0]
        for i, ids in enumerate(ids for ids in PROMPTS.values() for _ in range(3))
    }
    client = StandInClient(lead_late)
    server = OpenAIServer(client, "m", "m")
    full = asyncio.run(server.completions(_body(n=3, echo=True)))["choices"]
    assert [c["index"] for c in full] == list(range(6))
    assert {c["index"]: c["logprobs"]["token_logprobs"] for c in full} == expected
    assert [c["text"] for c in full] == [f"{prompt} t1 t2" for prompt in PROMPTS for _ in range(3)]
    assert sorted(client.asked) == sorted([(ids, j == 0) for ids in PROMPTS.values() for j in range(3)])

    streamed, order = _streamed_choices(server, _body(n=3, echo=True, stream=True))
    assert streamed == expected
    if lead_late:  # the other choices' chunks go out once the lead's first delta is in, not after its last
        for lead in (0, 3):
            assert max(order.index(lead + 1), order.index(lead + 2)) < len(order) - 1 - order[::-1].index(lead)

    # one choice computes its own; without echo none are asked
    client.asked.clear()
    one = asyncio.run(server.completions(_body(echo=True)))["choices"]
    assert [c["logprobs"]["token_logprobs"] for c in one] == [expected[0], expected[3]]
    asyncio.run(server.completions(_body(n=3)))
    assert [wants for _, wants in client.asked] == [True, True] + [False] * 6
