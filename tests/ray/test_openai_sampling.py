"""Logprobs, penalties, logit_bias, min_tokens, /tokenize and /detokenize, live: the Ray
Serve app on the shared cluster (built-in tiny model, float32), queried with the official
``openai`` client, streaming and not. References: transformers' logprobs on the same
checkpoint, the same request without streaming."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from typing import Any

import openai
import pytest
import torch
from serving import served

from raymoe.actors.models.builtin import resolve_model_path
from raymoe.cluster.config import load_config

MODEL = "builtin:tiny-qwen3-moe"
EOS_IDS = (0, 2)  # the built-in tokenizer's
GREEDY = dict(model=MODEL, temperature=0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def server(ray_cluster) -> Any:
    config = load_config().replace({"model.dtype": "float32", "engine.num_kv_blocks": 512})
    with served(config) as url:
        yield url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=120)


def _post(server: str, path: str, body: dict) -> tuple[int, Any]:
    req = urllib.request.Request(server + path, data=json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _hf_logprobs(ids: list[int]) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(resolve_model_path(MODEL), dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_chat_logprobs_streaming_and_not(client):
    args = dict(messages=[{"role": "user", "content": "Hi"}], max_tokens=6, logprobs=True, top_logprobs=3, **GREEDY)
    full = client.chat.completions.create(**args)
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens == 6
    for item in content:  # greedy: the chosen token is the most likely
        assert len(item.top_logprobs) == 3 and item.logprob == pytest.approx(item.top_logprobs[0].logprob)
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob >= item.top_logprobs[2].logprob
    streamed = [
        i
        for c in client.chat.completions.create(stream=True, **args)
        if c.choices and c.choices[0].logprobs
        for i in c.choices[0].logprobs.content
    ]
    # the same tokens; logprobs equal up to float32 rounding (the second request reuses the
    # first's cached prompt blocks and computes its last token in a smaller batch)
    assert [i.token for i in streamed] == [i.token for i in content]
    assert [i.logprob for i in streamed] == pytest.approx([i.logprob for i in content], abs=1e-5)
    plain = client.chat.completions.create(**{**args, "logprobs": None, "top_logprobs": None})
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == full.choices[0].message.content


def test_completion_logprobs_streaming_and_not(client):
    args = dict(prompt="The capital of France is", max_tokens=5, logprobs=2, **GREEDY)
    full = client.completions.create(**args).choices[0]
    lp = full.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    # greedy: the chosen token is the most likely (tokens whose texts collide share a key)
    assert all(len(top) <= 2 and t >= max(top.values()) - 1e-5 for top, t in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    streamed = [c.choices[0].logprobs for c in client.completions.create(stream=True, **args) if c.choices]
    assert [t for s in streamed if s for t in s.token_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-5)
    assert [o for s in streamed if s for o in s.text_offset] == lp.text_offset  # offsets go on across chunks
    echoed = dict(args, echo=True)
    whole = client.completions.create(**echoed).choices[0].logprobs.text_offset
    streamed = [c.choices[0].logprobs for c in client.completions.create(stream=True, **echoed) if c.choices]
    assert [o for s in streamed if s for o in s.text_offset] == whole


def test_chat_logprobs_bytes_rebuild_characters_split_over_tokens(client):
    """The built-in byte-level tokenizer spells 日é as five tokens of one byte each: their
    texts are U+FFFD, their ``bytes`` the UTF-8 bytes, which joined give the text back."""
    args = dict(messages=[{"role": "user", "content": "x"}], max_tokens=10, logprobs=True, top_logprobs=2)
    args.update(model=MODEL, temperature=0, extra_body={"structured_outputs": {"regex": "日é"}})
    full = client.chat.completions.create(**args).choices[0]
    text = [item for item in full.logprobs.content if item.token != "<|im_end|>"]  # the stop token's last
    assert full.message.content == "日é" and len(text) > 2  # split over tokens
    assert b"".join(bytes(item.bytes) for item in text) == "日é".encode()
    streamed = [
        i
        for c in client.chat.completions.create(stream=True, **args)
        if c.choices and c.choices[0].logprobs
        for i in c.choices[0].logprobs.content
    ]
    assert [i.bytes for i in streamed] == [i.bytes for i in full.logprobs.content]


def test_echo_gives_prompt_logprobs_as_lm_eval_asks(server, client):
    """lm-eval's loglikelihood: echo, logprobs, max_tokens 0 (or 1), token-id prompts."""
    ids = _post(server, "/tokenize", {"prompt": "one two three four five"})[1]["tokens"]
    ref = _hf_logprobs(ids)
    for max_tokens in (0, 1):
        r = client.completions.create(prompt=ids, max_tokens=max_tokens, logprobs=1, echo=True, **GREEDY)
        lp = r.choices[0].logprobs
        assert len(lp.token_logprobs) == len(ids) + max_tokens and lp.token_logprobs[0] is None
        assert lp.top_logprobs[0] is None
        for pos in range(1, len(ids)):
            assert math.isclose(lp.token_logprobs[pos], float(ref[pos - 1, ids[pos]]), abs_tol=1e-3)
        assert r.usage.completion_tokens == max_tokens and r.usage.prompt_tokens == len(ids)
        assert r.choices[0].text.startswith("one two three four five")
    # n choices of a prompt echo the same prompt logprobs (computed by the first alone)
    r = client.completions.create(prompt=ids, max_tokens=1, logprobs=1, echo=True, n=3, **GREEDY)
    for choice in r.choices:
        got = choice.logprobs.token_logprobs
        assert len(got) == len(ids) + 1 and got[0] is None
        assert got[1:-1] == pytest.approx([float(ref[pos - 1, ids[pos]]) for pos in range(1, len(ids))], abs=1e-3)
    chunks = list(client.completions.create(prompt=ids, max_tokens=2, logprobs=1, echo=True, stream=True, **GREEDY))
    first = chunks[0].choices[0]
    assert first.text.startswith("one two three four five") and first.logprobs.token_logprobs[0] is None
    got = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs]
    assert len(got) == len(ids) + 2


def test_penalties_bias_and_min_tokens_streaming_and_not(server, client):
    def run(stream: bool, **extra: Any) -> str:
        args = dict(prompt="a b a b a b a b", max_tokens=12, model=MODEL, temperature=0)
        body = {"ignore_eos": True, **extra.pop("extra_body", {})}
        if stream:
            return "".join(
                c.choices[0].text
                for c in client.completions.create(stream=True, extra_body=body, **args, **extra)
                if c.choices
            )
        return client.completions.create(extra_body=body, **args, **extra).choices[0].text

    token = _post(server, "/tokenize", {"prompt": " hello", "add_special_tokens": False})[1]["tokens"][0]
    # a bias that makes " hello" win often but not always: the penalties then show
    bias = {str(token): 6.0}
    plain = run(False, logit_bias=bias)
    assert plain != run(False)
    for extra, changes in (
        (dict(frequency_penalty=2.0), True),
        (dict(extra_body={"repetition_penalty": 2.0}), True),
        (dict(presence_penalty=2.0), False),  # lowers the biased token once: not always enough
    ):
        got = run(False, logit_bias=bias, **extra)
        assert got != plain or not changes, extra
        assert run(True, logit_bias=bias, **extra) == got
    biased = run(False, logit_bias={str(token): 100})
    assert biased == _post(server, "/detokenize", {"tokens": [token] * 12})[1]["prompt"]
    eos = {str(t): 100 for t in EOS_IDS}
    eos_bias = dict(logit_bias=eos, extra_body={"ignore_eos": False, "min_tokens": 3})
    r = client.completions.create(prompt="x", max_tokens=12, model=MODEL, temperature=0, **eos_bias)
    assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "path,body,param",
    [
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
        ),
        ("/v1/completions", {"prompt": "x", "logprobs": 6}, "logprobs"),
        ("/v1/completions", {"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
        ("/v1/completions", {"prompt": "x", "frequency_penalty": -3}, "frequency_penalty"),
        ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 200}}, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"99999999": 1}}, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("/detokenize", {"tokens": [-1]}, "tokens"),
    ],
)
def test_bad_values_are_a_400_naming_the_field(server, path, body, param):
    status, err = _post(server, path, body)
    assert status == 400 and err["error"]["param"] == param, err


def test_tokenize_detokenize_and_max_model_len(server, client):
    status, tok = _post(server, "/tokenize", {"prompt": "Hello world"})
    assert status == 200 and tok["count"] == len(tok["tokens"]) and tok["max_model_len"] > 0
    status, detok = _post(server, "/detokenize", {"tokens": tok["tokens"]})
    assert status == 200 and detok["prompt"].endswith("Hello world")
    status, chat = _post(server, "/tokenize", {"messages": [{"role": "user", "content": "Hi"}]})
    r = client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], max_tokens=1, model=MODEL)
    assert status == 200 and chat["count"] == r.usage.prompt_tokens
    card = client.models.list().data[0]
    assert card.model_extra["max_model_len"] == tok["max_model_len"]


def test_n_choices_streaming_and_not(client):
    """n choices: choice j samples as a lone request with seed + j would, indices prompt by
    prompt, usage counts each prompt once; the same streamed; chat too."""
    args = dict(model=MODEL, max_tokens=8, temperature=1.0, seed=11, extra_body={"ignore_eos": True})
    prompts = ("Once upon", "x y")
    lone = {(p, j): client.completions.create(prompt=p, **{**args, "seed": 11 + j}) for p in prompts for j in range(2)}
    full = client.completions.create(prompt=["Once upon", "x y"], n=2, **args)
    assert [c.index for c in full.choices] == [0, 1, 2, 3]
    expected = [lone[(p, j)].choices[0].text for p in prompts for j in range(2)]
    assert [c.text for c in full.choices] == expected
    assert expected[0] != expected[1]  # the choices do differ
    assert full.usage.prompt_tokens == lone[("Once upon", 0)].usage.prompt_tokens + lone[("x y", 0)].usage.prompt_tokens
    assert full.usage.completion_tokens == 4 * 8
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(prompt=["Once upon", "x y"], n=2, stream=True, **args):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(4)] == expected

    messages = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(messages=messages, n=3, **args)
    lone_chat = [client.chat.completions.create(messages=messages, **{**args, "seed": 11 + j}) for j in range(3)]
    assert [c.index for c in chat.choices] == [0, 1, 2]
    assert [c.message.content for c in chat.choices] == [r.choices[0].message.content for r in lone_chat]
    assert chat.usage.prompt_tokens == lone_chat[0].usage.prompt_tokens
    parts: dict[int, str] = {}
    for chunk in client.chat.completions.create(messages=messages, n=3, stream=True, **args):
        for c in chunk.choices:
            parts[c.index] = parts.get(c.index, "") + (c.delta.content or "")
    assert [parts[i] for i in range(3)] == [c.message.content for c in chat.choices]
