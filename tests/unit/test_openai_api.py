"""The OpenAI wire format without a server: request validation (every bad input is an
APIError 4xx naming the field, never an exception of another kind), engine errors
mapped to HTTP codes, response and stream-chunk shapes (checked with the official
``openai`` package's own response types), and the SSE framing."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import openai.types as ot
import openai.types.chat as otc
import pytest
import ray
from pydantic import ValidationError

from raymoe.actors.engine.grammar import GrammarSpec
from raymoe.actors.engine.messages import RejectKind
from raymoe.deploy.api_error import APIError
from raymoe.deploy.openai_api import (
    chat_messages,
    check_fan_out,
    completion_prompts,
    parse_request,
    resolve_max_tokens,
    sampling_params,
)
from raymoe.deploy.openai_constraints import grammar_spec
from raymoe.deploy.openai_request_models import ChatRequest, CompletionRequest
from raymoe.deploy.openai_responses import (
    SSE_DONE,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    json_bytes,
    sse,
    usage,
    usage_chunk,
)
from raymoe.deploy.request_stream import RequestRejected, engine_error


def _err(model: type, body: object) -> APIError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(APIError) as e:
        req = parse_request(model, raw)
        if model is CompletionRequest:
            completion_prompts(req)
            sampling_params(req, 4)
        else:
            chat_messages(req)
            sampling_params(req, 4)
    assert e.value.status == 400 and e.value.type == "invalid_request_error"
    return e.value


@pytest.mark.parametrize(
    "body,param",
    [
        (b"{not json", None),
        (b'"a string"', None),
        ({"prompt": "x", "bogus": 1}, "bogus"),
        ({"prompt": "x", "stream_options": {"include_usage": True, "extra": 1}}, "stream_options.extra"),
        ({}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["ok", ""]}, "prompt"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "top_p": 1.01}, "top_p"),
        ({"prompt": "x", "top_k": 0}, "top_k"),
        ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "n": 129}, "n"),
        ({"prompt": "x", "best_of": 2}, "best_of"),
        ({"prompt": "x", "logprobs": 6}, "logprobs"),
        ({"prompt": "x", "logprobs": -1}, "logprobs"),
        ({"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
        ({"prompt": "x", "frequency_penalty": -2.01}, "frequency_penalty"),
        ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
        ({"prompt": "x", "repetition_penalty": -1.0}, "repetition_penalty"),
        # finite in float64, infinite (or zero) in the ranks' float32
        ({"prompt": "x", "repetition_penalty": 1e300}, "repetition_penalty"),
        ({"prompt": "x", "repetition_penalty": 1e-300}, "repetition_penalty"),
        # two spellings of one token id: one bias would silently win
        ({"prompt": "x", "logit_bias": {"5": 100, "05": -100}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"a": 1.0}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"5": 101.0}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"-5": 1.0}}, "logit_bias"),
        # digits to str.isdigit, not to int(): "²" made a 500, "٣" passed as token 3
        ({"prompt": "x", "logit_bias": {"²": 1.0}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"٣": 1.0}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"9" * 5000: 1.0}}, "logit_bias"),  # int() refuses 4,300 digits
        ({"prompt": "x", "min_tokens": -1}, "min_tokens"),
        ({"prompt": "x", "stop": 7}, "stop"),
        ({"prompt": "x", "stop": ["ok", ""]}, "stop"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        # ranges the engine packs (int64 seeds) or OpenAI allows (temperature <= 2)
        ({"prompt": "x", "seed": 2**63}, "seed"),
        ({"prompt": "x", "seed": -(2**63) - 1}, "seed"),
        ({"prompt": "x", "top_k": 2**63}, "top_k"),
        ({"prompt": "x", "temperature": 2.5}, "temperature"),
        ({"prompt": "x", "stop": ["s"] * 65}, "stop"),
        ({"prompt": "x", "stop_token_ids": [2**64]}, "stop_token_ids"),
    ],
)
def test_bad_completion_requests(body, param):
    assert _err(CompletionRequest, body).param == param


def test_a_request_that_could_never_queue_is_a_400_naming_what_makes_it():
    check_fan_out(8, 128, limit=1024)  # exactly the queue: it may wait, or be told to retry (429)
    with pytest.raises(APIError) as many_prompts:
        check_fan_out(300_000, 1, limit=1024)
    with pytest.raises(APIError) as many_choices:
        check_fan_out(1, 128, limit=64)
    assert many_prompts.value.status == many_choices.value.status == 400
    assert many_prompts.value.param == "prompt" and many_choices.value.param == "n"
    assert "300000" in many_prompts.value.message and "serve.max_queued_requests" in many_prompts.value.message


_PAST_CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize(
    "body,param",
    [
        ({"messages": "hi"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages.0.content"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "c"}]}, "messages.1.content"),
        # the fields a chat template reads from earlier calls, of the wrong type
        ({"messages": [{"role": "assistant", "content": "x", "tool_calls": "zzz"}]}, "messages.0.tool_calls"),
        ({"messages": [{"role": "tool", "content": "x", "tool_call_id": 7}]}, "messages.0.tool_call_id"),
        # as OpenAI: a tool message names the call it answers; an earlier call names its function
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id"),
        ({"messages": [{"role": "tool", "content": "x", "tool_call_id": ""}]}, "messages.0.tool_call_id"),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"id": "c1", "type": "function"}]}]},
            "messages.0.tool_calls.0",
        ),
        ({"messages": [{"role": "assistant", "tool_calls": [_PAST_CALL, 3]}]}, "messages.0.tool_calls.1"),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 1}}]}]},
            "messages.0.tool_calls.0.function.arguments",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
            "messages.0.content.0",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text"}]}]},
            "messages.0.content.1.text",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "presence_penalty": -3}, "presence_penalty"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools.0"),
        (
            {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}},
            "response_format",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "prompt": "x"}, "prompt"),
    ],
)
def test_bad_chat_requests(body, param):
    assert _err(ChatRequest, body).param == param


def test_unknown_field_message_is_openais():
    e = _err(CompletionRequest, {"prompt": "x", "frobnicate": 1})
    assert (
        e.message == "Unrecognized request argument supplied: frobnicate" and e.body()["error"]["param"] == "frobnicate"
    )


def test_unknown_fields_are_refused_inside_objects_and_on_every_endpoint():
    from raymoe.deploy.openai_tokenize import DetokenizeRequest

    e = _err(CompletionRequest, {"prompt": "x", "stream": True, "stream_options": {"include_usage": True, "x": 1}})
    assert e.param == "stream_options.x" and e.message.endswith("supplied: stream_options.x")
    assert _err(DetokenizeRequest, {"tokens": [1], "frobnicate": 1}).param == "frobnicate"
    # messages pass their extra fields to the chat template: not refused
    assert parse_request(ChatRequest, json.dumps({"messages": [{"role": "user", "content": "x", "k": 1}]}).encode())
    # one error for many unknown fields, naming the first (pydantic reported each one)
    many = {"prompt": "x", **{f"f{i}": 1 for i in range(HOSTILE_ITEMS)}}
    assert _err(CompletionRequest, many).param == "f0"


def test_good_requests_map_to_engine_inputs():
    req = parse_request(
        CompletionRequest,
        b'{"model": "m", "prompt": ["a", "b"], "max_tokens": 5, "temperature": 0, "top_p": 0.9, "top_k": 4,'
        b' "stop": "##", "seed": 3, "ignore_eos": true, "stop_token_ids": [7], "user": "u", "n": 1, "stream": null}',
    )
    assert completion_prompts(req) == ["a", "b"]
    sp = sampling_params(req, 5)
    assert (sp.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.stop, sp.seed, sp.ignore_eos, sp.stop_token_ids) == (
        5,
        0.0,
        0.9,
        4,
        ("##",),
        3,
        True,
        (7,),
    )
    assert completion_prompts(parse_request(CompletionRequest, b'{"prompt": [1, 2, 3]}')) == [[1, 2, 3]]
    assert completion_prompts(parse_request(CompletionRequest, b'{"prompt": [[1], [2, 3]]}')) == [[1], [2, 3]]
    defaults = sampling_params(parse_request(CompletionRequest, b'{"prompt": "x"}'), 16)
    assert (defaults.temperature, defaults.top_p, defaults.top_k) == (1.0, 1.0, -1)

    chat = parse_request(
        ChatRequest,
        b'{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "a"},'
        b' {"type": "text", "text": "b"}]}, {"role": "assistant", "content": null, "tool_calls": []}],'
        b' "max_completion_tokens": 9, "tool_choice": "none", "chat_template_kwargs": {"enable_thinking": false}}',
    )
    assert chat_messages(chat) == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "", "tool_calls": []},
    ]
    assert chat.chat_template_kwargs == {"enable_thinking": False}


def test_max_tokens_against_the_context():
    completion = dict(limit=100, default=16, param="max_tokens", prompt_param="prompt")
    assert resolve_max_tokens(None, 10, **completion) == 16
    assert resolve_max_tokens(None, 90, **completion) == 10  # default capped by the room left
    chat = dict(limit=100, default=None, param="max_tokens", prompt_param="messages")
    assert resolve_max_tokens(None, 10, **chat) == 90  # chat: the rest of the context
    assert resolve_max_tokens(90, 10, **completion) == 90
    for requested, n, param, code in [
        (0, 10, "max_tokens", "invalid_value"),
        (91, 10, "max_tokens", "context_length_exceeded"),
        (1, 100, "prompt", "context_length_exceeded"),
    ]:
        with pytest.raises(APIError) as e:
            resolve_max_tokens(requested, n, **completion)
        assert (e.value.status, e.value.param, e.value.code) == (400, param, code)


def test_engine_errors_map_to_http_codes():
    assert engine_error(RequestRejected(RejectKind.QUEUE_FULL, "full")).status == 429
    bad = engine_error(RequestRejected(RejectKind.INVALID, "max_tokens: needs 9 KV blocks"))
    assert (bad.status, bad.param) == (400, "max_tokens")
    assert engine_error(RequestRejected(RejectKind.ENGINE_FAILED, "engine failed: rank died")).status == 503
    assert engine_error(ray.exceptions.RayActorError()).status == 503
    cause = ray.exceptions.RayActorError()
    assert engine_error(ray.exceptions.RayTaskError("poll", "traceback", cause).as_instanceof_cause()).status == 503
    assert engine_error(RuntimeError("surprise")).status == 500


def test_responses_parse_as_openai_types():
    use = usage(7, 3, cached_tokens=4)
    assert use == {
        "prompt_tokens": 7,
        "completion_tokens": 3,
        "total_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    choices = [{"text": "a", "finish_reason": "length"}, {"text": "b", "finish_reason": "stop"}]
    c = ot.Completion.model_validate(completion_response("cmpl-1", 1, "m", choices=choices, use=use))
    assert [ch.text for ch in c.choices] == ["a", "b"] and c.usage.total_tokens == 10
    assert c.usage.prompt_tokens_details.cached_tokens == 4
    r = otc.ChatCompletion.model_validate(chat_response("chatcmpl-1", 1, "m", choices=choices[:1], use=use))
    assert r.choices[0].message.content == "a" and r.choices[0].message.role == "assistant"
    role = {"role": "assistant", "content": ""}
    chunk = chat_chunk("x", 1, "m", index=0, delta=role, finish=None, with_usage=True)
    chunk = otc.ChatCompletionChunk.model_validate(chunk)
    assert chunk.choices[0].delta.role == "assistant" and chunk.usage is None
    last = otc.ChatCompletionChunk.model_validate(usage_chunk("x", 1, "m", obj="chat.completion.chunk", use=use))
    assert last.choices == [] and last.usage.completion_tokens == 3
    # (openai's Completion type does not allow the null finish_reason of mid-stream chunks)
    end = completion_chunk("x", 1, "m", index=0, text="tok", finish="length", with_usage=False)
    end = ot.Completion.model_validate(end)
    assert end.object == "text_completion" and end.choices[0].text == "tok"


def test_sse_framing():
    event = sse({"text": "é\n"})
    assert event.startswith(b"data: ") and event.endswith(b"\n\n") and event.count(b"\n") == 2
    assert json.loads(event[len(b"data: ") :]) == {"text": "é\n"}
    assert SSE_DONE == b"data: [DONE]\n\n"


def test_json_bytes_is_compact_json_of_the_same_body():
    entries = [{"token": "é", "top": [1, 2.5]}] * 7  # longer than a slice
    body = {"id": "x", "choices": [{"text": "é\n", "logprobs": {"content": entries}}, {"text": ""}], "usage": {}}
    for slice_items in (2, 3, 256):
        got = asyncio.run(json_bytes(body, slice_items=slice_items))
        assert got == json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    assert json.loads(asyncio.run(json_bytes({"choices": []}))) == {"choices": []}
    with pytest.raises(ValueError):  # as JSONResponse: no NaN in a body
        asyncio.run(json_bytes({"choices": [{"logprob": float("nan")}]}))


def test_logprobs_built_in_slices_equal_those_built_whole(monkeypatch):
    from raymoe.actors.engine.messages import Logprob
    from raymoe.deploy import openai_logprobs as lp

    texts = {i: "ab"[: i % 3] + "é" * (i % 2) for i in range(50)}  # tokens of 0-3 characters
    logprobs = [Logprob(i, -0.5 * i, ((i + 1, -1.0), (i + 2, float("-inf")))) for i in range(11)]
    prompt = [None, *logprobs[:4]]
    ids = [x.token_id for x in logprobs]
    to_bytes = lambda i: texts[i].encode()  # noqa: E731
    whole_chat = lp.chat_logprobs(logprobs, texts.__getitem__, to_bytes)
    whole_completion = lp.completion_logprobs([0, *ids[:4], *ids], [*prompt, *logprobs], texts.__getitem__, 3)
    monkeypatch.setattr(lp, "SLICE_TOKENS", 4)  # offsets carried across slices
    assert asyncio.run(lp.chat_logprobs_in_slices(logprobs, texts.__getitem__, to_bytes)) == whole_chat
    sliced = lp.completion_logprobs_in_slices([0, *ids[:4], *ids], [*prompt, *logprobs], texts.__getitem__, 3)
    assert asyncio.run(sliced) == whole_completion


def _grammar(body: dict, model=ChatRequest):
    base = {"messages": [{"role": "user", "content": "x"}]} if model is ChatRequest else {"prompt": "x"}
    return grammar_spec(parse_request(model, json.dumps({**base, **body}).encode()))


def test_structured_output_fields_become_grammars():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}}
    assert _grammar({"response_format": fmt}) == GrammarSpec("json", json.dumps(schema), "response_format")
    assert _grammar({"response_format": {"type": "json_object"}}, CompletionRequest) == GrammarSpec("json", "")
    assert _grammar({"response_format": {"type": "text"}}) is None and _grammar({}) is None
    choice = _grammar({"structured_outputs": {"choice": ["a", "b"]}}, CompletionRequest)
    assert choice == GrammarSpec("choice", '["a", "b"]', "structured_outputs.choice")
    assert _grammar({"structured_outputs": {"regex": "[0-9]+"}}).kind == "regex"
    assert _grammar({"structured_outputs": {"grammar": 'root ::= "a"'}}).kind == "ebnf"
    assert _grammar({"structured_outputs": {"json": schema}}).source == json.dumps(schema)


@pytest.mark.parametrize(
    "body,param",
    [
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "t"}}}, "response_format"),
        # fields that would be dropped: a schema given to json_object, a strict that is not a boolean
        ({"response_format": {"type": "json_object", "schema": {"type": "object"}}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}},
            "response_format",
        ),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "shcema": {}}}}, "response_format"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"structured_outputs": {"regex": 5}}, "structured_outputs.regex"),
        ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a" * 70000}}, "structured_outputs.regex"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"enum": ["x" * 70000]}}}},
            "response_format",
        ),
    ],
)
def test_bad_structured_output_fields_are_400s_naming_them(body, param):
    with pytest.raises(APIError) as e:
        _grammar(body)
    assert (e.value.status, e.value.param) == (400, param)


def test_unknown_structured_outputs_keys_are_named_a_few_at_a_time():
    """A million unknown keys made an error body of 8.9 MB listing each."""
    with pytest.raises(APIError) as e:
        _grammar({"structured_outputs": {"regex": "a", **{f"k{i:07d}": 1 for i in range(100_000)}}})
    assert e.value.param == "structured_outputs" and len(e.value.message) < 300
    assert "k0000000, k0000001, k0000002, k0000003, k0000004 and 99995 more" in e.value.message


def test_min_tokens_is_checked_against_the_max_tokens_the_request_gives():
    """Before the prompt is tokenised the default max_tokens is unknown; a request's own is not."""
    for body in ({"prompt": "x", "max_tokens": 2, "min_tokens": 3}, {"prompt": "x", "max_tokens": 2, "min_tokens": -1}):
        with pytest.raises(APIError) as e:
            parse_request(CompletionRequest, json.dumps(body).encode())
        assert e.value.param == "min_tokens" and "max_tokens=2]" in e.value.message, e.value.message


def test_the_completions_route_refuses_the_fan_out_before_any_prompt_work():
    """300,000 one-character prompts: 400 naming ``prompt`` before the first is tokenised (each
    took the ingress's event loop for tens of microseconds: 26 s of a stalled endpoint)."""

    from raymoe.deploy.openai_server import OpenAIServer

    tokenised = []

    async def tokenize(prompt, param="prompt"):
        tokenised.append(prompt)
        return [1]

    client = SimpleNamespace(tokenize=tokenize, info=SimpleNamespace(token_limit=100, max_model_len=100))
    server = OpenAIServer(client, "m", "m", max_queued_requests=1024)
    body = json.dumps({"prompt": ["a"] * 300_000, "max_tokens": 1}).encode()
    with pytest.raises(APIError) as e:
        asyncio.run(server.completions(body))
    assert e.value.status == 400 and e.value.param == "prompt" and tokenised == []


def test_error_messages_stay_short_whatever_the_value():
    """A refused value is quoted back, cut to a few hundred characters (2,000 logit biases
    were quoted whole)."""
    huge_bias = {str(i): 1.0 for i in range(2000)}
    for body, param in (
        ({"prompt": "x", "logit_bias": huge_bias}, "logit_bias"),
        ({"prompt": "x", "stop": [""]}, "stop"),
    ):
        e = _err(CompletionRequest, body)
        assert e.param == param and len(e.message) < 400, e.message
        assert "tuple" not in e.message


HOSTILE_ITEMS = 20_000
BAD_BIASES = {str(i): "x" for i in range(HOSTILE_ITEMS)}


@pytest.mark.parametrize(
    "model,fields,param",
    [
        (CompletionRequest, {"prompt": [1.5] * HOSTILE_ITEMS}, "prompt"),
        (CompletionRequest, {"prompt": [[1], "a"] * HOSTILE_ITEMS}, "prompt"),
        (CompletionRequest, {"prompt": "hi", "stop": [1] * HOSTILE_ITEMS}, "stop"),
        (CompletionRequest, {"prompt": "hi", "stop_token_ids": [1.5] * HOSTILE_ITEMS}, "stop_token_ids.0"),
        (
            CompletionRequest,
            {"prompt": "hi", "logit_bias": BAD_BIASES},
            "logit_bias.0",
        ),
        (ChatRequest, {"messages": [1] * HOSTILE_ITEMS}, "messages.0"),
        (ChatRequest, {"messages": [{"role": "user", "content": [1] * HOSTILE_ITEMS}]}, "messages.0.content"),
        (ChatRequest, {"messages": [{"role": "user", "content": "hi"}], "tools": [1] * HOSTILE_ITEMS}, "tools.0"),
        (ChatRequest, {"messages": [{"role": "user", "content": "hi"}], "metadata": {"k": 1}}, "metadata.k"),
    ],
)
def test_a_field_of_many_bad_items_stops_at_the_first(model, fields, param):
    """Pydantic reports every bad item of a list unless told to stop at the first, about 10 us
    each: a 30 MiB body of them held the ingress (and every stream on it) for minutes."""
    body = json.dumps({"model": "m", **fields}).encode()
    with pytest.raises(ValidationError) as e:
        model.model_validate_json(body)
    assert e.value.error_count() <= 4, "one error per union member at most, not one per item"
    assert _err(model, body).param == param


def test_tokenize_and_detokenize_stop_at_the_first_bad_item():
    from raymoe.deploy.openai_tokenize import DetokenizeRequest, TokenizeRequest

    for model, fields in (
        (DetokenizeRequest, {"tokens": [1.5] * HOSTILE_ITEMS}),
        (TokenizeRequest, {"messages": [1] * HOSTILE_ITEMS}),
    ):
        with pytest.raises(ValidationError) as e:
            model.model_validate_json(json.dumps(fields))
        assert e.value.error_count() == 1


def test_tokenize_parses_the_body_once_and_names_what_is_wrong():
    """Either shape in one parse: a body nested past the JSON parser's depth is a 400 (the
    shape was first sniffed with json.loads, whose RecursionError was no ValueError)."""
    from raymoe.deploy import openai_tokenize

    seen = []

    async def tokenize(prompt, add_special_tokens=True):
        seen.append(("prompt", prompt, add_special_tokens))
        return [7, 8]

    async def tokenize_chat(messages, kwargs):
        seen.append(("chat", messages[0]["content"], kwargs))
        return [9]

    pieces = SimpleNamespace(backend=SimpleNamespace(id_to_token={7: "Ġa", 8: "b", 9: "<|x|>"}.get))
    client = SimpleNamespace(
        tokenize=tokenize, tokenize_chat=tokenize_chat, info=SimpleNamespace(max_model_len=64), tokenizer=pieces
    )

    def call(body):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return asyncio.run(openai_tokenize.tokenize(client, raw))

    assert call({"model": "m", "prompt": "hi", "add_special_tokens": False}) == (
        "m",
        {"count": 2, "max_model_len": 64, "tokens": [7, 8], "token_strs": None},
    )
    assert call({"messages": [{"role": "user", "content": "yo"}], "chat_template_kwargs": {"a": 1}})[1]["tokens"] == [9]
    assert seen == [("prompt", "hi", False), ("chat", "yo", {"a": 1})]
    assert call({"prompt": "hi", "return_token_strs": True})[1]["token_strs"] == ["Ġa", "b"]
    chat = {"messages": [{"role": "user", "content": "yo"}], "return_token_strs": True}
    assert call(chat)[1]["token_strs"] == ["<|x|>"]
    seen.clear()
    deep = b'{"prompt": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    refused = [
        (deep, None),
        ({"model": "m"}, "prompt"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
        ({"messages": [{"role": "user", "content": "b"}], "add_special_tokens": True}, "add_special_tokens"),
        ({"prompt": "a", "chat_template_kwargs": {}}, "chat_template_kwargs"),
        ({"prompt": "a", "frobnicate": 1}, "frobnicate"),
        ({"prompt": "a", "messages": None}, "messages"),
    ]
    for body, param in refused:
        with pytest.raises(APIError) as e:
            call(body)
        assert e.value.status == 400 and e.value.param == param, (body if param else "deep", e.value)
    assert not seen


def test_rebalance_refuses_a_body_nested_past_the_parser_with_a_400():
    from raymoe.deploy.openai_server import OpenAIServer

    server = OpenAIServer(SimpleNamespace(info=SimpleNamespace()), "m", "m", max_queued_requests=1)
    for body in (b"[" * 200_000 + b"]" * 200_000, b"[1]", b"{"):
        with pytest.raises(APIError) as e:
            asyncio.run(server.rebalance(body))
        assert e.value.status == 400


def test_detokenize_takes_at_most_max_model_len_ids_and_decodes_long_lists_off_the_loop():
    import threading

    from raymoe.deploy import openai_tokenize

    where = []

    def decode(ids):
        where.append(threading.current_thread() is threading.main_thread())
        return "x" * len(ids)

    info = SimpleNamespace(max_model_len=10_000, vocab_size=100)
    client = SimpleNamespace(tokenizer=SimpleNamespace(decode=decode), info=info)

    def call(ids):
        return asyncio.run(openai_tokenize.detokenize(client, json.dumps({"tokens": ids}).encode()))

    assert call([1, 2]) == (None, {"prompt": "xx"})
    assert call([3] * 10_000)[1]["prompt"] == "x" * 10_000
    assert where == [True, False]
    for ids in ([3] * 10_001, [1, 100]):
        with pytest.raises(APIError) as e:
            call(ids)
        assert e.value.status == 400 and e.value.param == "tokens"
    assert len(where) == 2


class _StreamedRequest:
    """What _read_body reads of a Starlette request: its headers and its body in chunks."""

    def __init__(self, chunks: list[bytes], declared: int | None = None) -> None:
        self.chunks = chunks
        self.headers = {} if declared is None else {"content-length": str(declared)}

    async def stream(self):
        for chunk in self.chunks:
            yield chunk


def test_a_body_in_many_chunks_is_read_whole_and_refused_past_the_limit(monkeypatch):
    from raymoe.deploy import http_request

    chunks = [bytes([i % 251]) * 1000 for i in range(3000)]
    assert asyncio.run(http_request.read_body(_StreamedRequest(chunks))) == b"".join(chunks)
    monkeypatch.setattr(http_request, "MAX_BODY_BYTES", 2_500_000)
    with pytest.raises(APIError) as e:  # no length declared: refused while it streams in
        asyncio.run(http_request.read_body(_StreamedRequest(chunks)))
    assert e.value.status == 413 and e.value.body()["error"]["code"] == "body_too_large"
    with pytest.raises(APIError) as e:  # declared too long: refused before reading
        asyncio.run(http_request.read_body(_StreamedRequest([], declared=2_500_001)))
    assert e.value.status == 413


class _TrickledRequest(_StreamedRequest):
    """A body sent a chunk every ``pause_s`` (a slowloris client)."""

    def __init__(self, chunks: list[bytes], pause_s: float) -> None:
        super().__init__(chunks)
        self.pause_s = pause_s

    async def stream(self):
        for chunk in self.chunks:
            await asyncio.sleep(self.pause_s)
            yield chunk


def test_a_compressed_body_is_a_415():
    from raymoe.deploy import http_request

    request = _StreamedRequest([b"\x1f\x8b..."])
    request.headers["content-encoding"] = "gzip"
    with pytest.raises(APIError) as e:
        asyncio.run(http_request.read_body(request))
    assert e.value.status == 415 and "uncompressed" in e.value.message
    request.headers["content-encoding"] = "identity"
    assert asyncio.run(http_request.read_body(request)) == b"\x1f\x8b..."


def test_a_body_that_trickles_in_is_a_408_after_the_read_timeout(monkeypatch):
    from raymoe.deploy import http_request

    monkeypatch.setattr(http_request, "BODY_TIMEOUT_S", 0.3)
    assert asyncio.run(http_request.read_body(_TrickledRequest([b"a", b"b"], pause_s=0.01))) == b"ab"
    t0 = time.monotonic()
    with pytest.raises(APIError) as e:
        asyncio.run(http_request.read_body(_TrickledRequest([b"a"] * 1000, pause_s=0.1)))
    assert e.value.status == 408 and e.value.body()["error"]["code"] == "request_timeout"
    assert time.monotonic() - t0 < 1.0


class _CountingMetrics:
    def __init__(self) -> None:
        self.counted: list[tuple[str, int]] = []

    def count(self, endpoint: str, status: int) -> None:
        self.counted.append((endpoint, status))


def test_a_client_gone_before_its_body_arrived_is_counted_499_not_a_500():
    """Starlette raises ClientDisconnect from the body read: it was logged with its traceback
    and counted as a server error (4,720 of them under a load of such clients)."""
    from raymoe.deploy import fastapi_app

    server = SimpleNamespace(authorize=lambda header: None, metrics=_CountingMetrics(), completions=None)
    app = fastapi_app.build_fastapi_app(server)
    messages = [{"type": "http.request", "body": b'{"pro', "more_body": True}, {"type": "http.disconnect"}]
    sent = []

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8000),
    }
    asyncio.run(app(scope, receive, send))
    assert server.metrics.counted == [("completions", 499)]
    assert sent[0]["status"] == 499


@pytest.mark.parametrize("body", [b'{"\\ud800": 1}', b'{"logical_load": [["\\udfff"]]}'])
def test_a_rebalance_body_with_a_lone_surrogate_is_a_400_that_encodes(body):
    """json.loads took a lone UTF-16 surrogate, and the 400 naming it as an unknown field could
    not be encoded as UTF-8: Starlette answered a bare 500."""
    from starlette.responses import JSONResponse

    from raymoe.deploy.openai_server import OpenAIServer

    server = OpenAIServer(SimpleNamespace(info=SimpleNamespace()), "m", "m")
    with pytest.raises(APIError) as e:
        asyncio.run(server.rebalance(body))
    assert e.value.status == 400 and "body must be a JSON object" in e.value.message
    assert JSONResponse(e.value.body(), status_code=400).body


def test_an_unknown_model_s_404_quotes_at_most_100_characters_of_its_name():
    """The 404 quoted the name whole (a 30 MiB body's name came back in the error)."""
    from raymoe.deploy.openai_server import OpenAIServer

    server = OpenAIServer(SimpleNamespace(info=SimpleNamespace()), "m", "m")
    for call in (
        lambda: server.model("x" * 5000),
        lambda: asyncio.run(server.completions(b'{"model": "' + b"x" * 5000 + b'", "prompt": "a"}')),
    ):
        with pytest.raises(APIError) as e:
            call()
        assert e.value.status == 404 and "x" * 100 + "... (5,000 characters)" in e.value.message
        assert len(e.value.message) < 300


def test_messages_reach_the_template_as_sent_extras_and_all():
    """Messages are validated as TypedDicts (no model per message): each keeps every field the
    client sent, in order, for the chat template; nulls are dropped, content parts joined."""
    body = {
        "messages": [
            {"role": "user", "content": "a", "name": None, "x_extra": {"k": [1, None]}},
            {"role": "assistant", "tool_calls": [_PAST_CALL], "reasoning_content": "r"},
            {
                "role": "tool",
                "tool_call_id": "c1",
                "content": [{"type": "text", "text": "4"}, {"type": "text", "text": "2"}],
            },
        ]
    }
    req = parse_request(ChatRequest, json.dumps(body).encode())
    assert all(type(m) is dict for m in req.messages)
    assert chat_messages(req) == [
        {"role": "user", "content": "a", "x_extra": {"k": [1, None]}},
        {
            "role": "assistant",
            "tool_calls": [_PAST_CALL],
            "reasoning_content": "r",
            "content": "",
        },
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]


def test_too_many_logit_biases_are_refused_by_their_count_before_their_keys_are_read():
    bias = {"not an id": 1.0, **{str(i): 1.0 for i in range(1024)}}
    err = _err(CompletionRequest, {"prompt": "x", "logit_bias": bias})
    assert err.param == "logit_bias" and "at most 1024" in err.message and "1025" in err.message


@pytest.mark.parametrize(
    "metadata,ok",
    [
        ({str(i): "v" for i in range(16)}, True),
        ({str(i): "v" for i in range(17)}, False),
        ({"k" * 64: "v" * 512}, True),
        ({"k" * 65: "v"}, False),
        ({"k": "v" * 513}, False),
    ],
)
def test_metadata_keeps_to_openais_bounds(metadata, ok):
    body = {"messages": [{"role": "user", "content": "x"}], "metadata": metadata}
    if ok:
        assert parse_request(ChatRequest, json.dumps(body).encode()).metadata == metadata
    else:
        assert _err(ChatRequest, body).param == "metadata"


def test_a_client_that_leaves_cancels_its_handler():
    """The ingress watches the connection itself while a request runs: when the client
    closes it, the handler is cancelled (its clean-up aborts the engine requests) and the
    answer is ClientDisconnect; a handler that finishes first answers, unwatched from then on."""
    from starlette.requests import ClientDisconnect, Request

    from raymoe.deploy.http_request import unless_client_leaves

    def request(leaves_after_s):
        async def receive():
            if leaves_after_s is None:
                await asyncio.Event().wait()  # never
            await asyncio.sleep(leaves_after_s)
            return {"type": "http.disconnect"}

        return Request({"type": "http", "method": "POST", "headers": []}, receive)

    cleaned_up = []

    async def handler(run_s):
        try:
            await asyncio.sleep(run_s)
            return "answer"
        finally:
            cleaned_up.append(run_s)

    async def answer(leaves_after_s, run_s):
        return await unless_client_leaves(request(leaves_after_s), handler(run_s))

    with pytest.raises(ClientDisconnect):
        asyncio.run(answer(0.05, 30))
    assert cleaned_up == [30]  # cancelled, and its clean-up ran before the answer
    assert asyncio.run(answer(None, 0.01)) == "answer"
    assert asyncio.run(answer(5, 0.01)) == "answer"


def test_metrics_answer_while_the_controller_does_not():
    """A dead or hung controller: /metrics still gives this replica's own metrics, and says
    the engine did not answer (it was a 500 after a 10 s wait)."""
    from prometheus_client.parser import text_string_to_metric_families

    from raymoe.actors.engine.messages import EngineStats
    from raymoe.deploy.openai_server import OpenAIServer

    async def hangs():
        await asyncio.Event().wait()

    def remote(answer):
        return SimpleNamespace(remote=answer)

    async def value(x):
        return x

    stats = EngineStats(
        waiting=[3],
        running=[1],
        kv_usage=[0.5],
        prefix_cache_hit_tokens=[0],
        prefix_cache_query_tokens=[0],
        steps=7,
        preemptions=0,
        polls=0,
        submit_calls=0,
        restarts=0,
        recovering=False,
        error=None,
    )
    answering = SimpleNamespace(stats=remote(lambda: value(stats)), eplb_status=remote(lambda: value({})))
    hung = SimpleNamespace(stats=remote(hangs), eplb_status=remote(lambda: value({})))

    reconnects = []

    async def reconnect():
        reconnects.append(1)

    def scrape(controller):
        engine = SimpleNamespace(controller=controller, reconnect=reconnect)
        client = SimpleNamespace(info=SimpleNamespace(), engine=engine, controllers_lost=0)
        server = OpenAIServer(client, "m", "m", max_queued_requests=1)
        server.metrics.count("completions", 200)

        async def text():
            body = await server.metrics_text(timeout_s=0.2)
            await asyncio.sleep(0)  # a reconnect it started runs
            return body.decode()

        return {s.name: s.value for f in text_string_to_metric_families(asyncio.run(text())) for s in f.samples}

    up = scrape(answering)
    assert not reconnects
    down = scrape(hung)
    assert reconnects == [1]  # to the controller the engine host may have started
    assert up["raymoe_engine_unreachable"] == 0 and up["raymoe_requests_waiting"] == 3
    assert down["raymoe_engine_unreachable"] == 1 and "raymoe_requests_waiting" not in down
    assert down["raymoe_requests_total"] == up["raymoe_requests_total"] == 1  # the replica's own
