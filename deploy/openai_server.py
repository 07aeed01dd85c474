"""What each OpenAI endpoint does, independent of the web framework and of Ray Serve.

``OpenAIServer`` turns a validated request into engine streams (one per prompt), and
``ChoiceWriter`` (openai_choices.py) the streams into a JSON response or server-sent
events. Each delta is written
as soon as it arrives (no batching delay; a stream whose consumer fell behind gets
the tokens of several steps as one delta); a streaming response is started only
once the first token exists, so a request the engine refuses (full queue, too long)
still gets a proper HTTP error instead of a broken stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import time
import uuid
from typing import Any, Optional

import pydantic_core
import ray

from raymoe.actors.engine.eplb import RebalanceRefused
from raymoe.actors.engine.messages import EngineStats
from raymoe.actors.engine.metaschema import MetaschemaCache
from raymoe.deploy.api_error import APIError, bad_request
from raymoe.deploy.choice_progress import Echo
from raymoe.deploy.engine_client import EngineClient
from raymoe.deploy.metrics import ServeMetrics
from raymoe.deploy.openai_api import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    chat_messages,
    check_fan_out,
    choice_params,
    completion_prompts,
    parse_request,
    resolve_max_tokens,
    sampling_params,
)
from raymoe.deploy.openai_choices import ChoiceWriter
from raymoe.deploy.openai_constraints import request_schemas, tool_choice
from raymoe.deploy.openai_request_models import ChatRequest, CompletionRequest
from raymoe.deploy.openai_responses import (
    model_card,
)
from raymoe.deploy.openai_tokenize import detokenize, tokenize
from raymoe.deploy.tool_calls import tool_parser

log = logging.getLogger(__name__)


def _shown(name: str) -> str:
    """A name the client sent, as an error quotes it: cut to 100 characters (a body may carry a
    30 MiB one, which the 404 sent back whole)."""
    return name if len(name) <= 100 else f"{name[:100]}... ({len(name):,} characters)"


class OpenAIServer:
    def __init__(
        self,
        client: EngineClient,
        model_name: str,
        model_root: str,
        api_key: Optional[str] = None,
        reasoning_parser: Optional[str] = None,
        tool_parser_name: str = "hermes",
        max_queued_requests: int = 1024,
    ) -> None:
        """``reasoning_parser``: a chat answer's ``<think>`` block goes to ``reasoning_content``
        (see deploy/reasoning.py); None: all of it is content. ``max_queued_requests``: the
        engine's queue (serve.max_queued_requests), the most engine requests one HTTP request
        may make (a prompt and choice each)."""
        self.max_queued_requests = max_queued_requests
        self.tool_parser = tool_parser(tool_parser_name)
        self.client = client
        self.model_name = model_name
        self.model_root = model_root
        self.api_key = api_key
        self.metrics = ServeMetrics(model_name)
        self.created = int(time.time())
        self.schemas = MetaschemaCache()
        self.choices = ChoiceWriter(
            client, self.metrics, model_name, reasoning_parser=reasoning_parser, tool_parser=self.tool_parser
        )

    @property
    def controller(self) -> Any:
        """The controller actor now (stats, EPLB, health): the engine client's, which follows
        the controller when the engine host replaces it."""
        return self.client.engine.controller

    # ---- checks -----------------------------------------------------------------------

    async def check_schemas(self, req: Any) -> None:
        """400 naming the field and the place in it where a JSON schema of ``req`` is not valid
        against its draft's metaschema; checked once a request, in a worker thread (pure Python,
        about 10 ms a kilobyte of schema; a schema checked before is answered at once)."""
        schemas = request_schemas(req)
        if not schemas:
            return
        try:
            await asyncio.to_thread(self.schemas.check, schemas)
        except ValueError as e:
            raise bad_request(str(e), str(e).partition(":")[0], "invalid_value") from None

    def authorize(self, authorization: Optional[str]) -> None:
        """401 unless ``Authorization: Bearer <api key>`` matches (when a key is set)."""
        if self.api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            message = "Incorrect or missing API key: send 'Authorization: Bearer <key>'"
            raise APIError(401, message, code="invalid_api_key")

    def _check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.model_name:
            message = f"The model '{_shown(model)}' does not exist; this server serves '{self.model_name}'"
            raise APIError(404, message, param="model", code="model_not_found")

    # ---- endpoints -------------------------------------------------------------------------

    def models(self) -> dict[str, Any]:
        card = model_card(self.model_name, self.created, self.model_root, self.client.info.max_model_len)
        return {"object": "list", "data": [card]}

    def model(self, name: str) -> dict[str, Any]:
        if name != self.model_name:
            raise APIError(404, f"The model '{_shown(name)}' does not exist", param="model", code="model_not_found")
        return model_card(self.model_name, self.created, self.model_root, self.client.info.max_model_len)

    async def completions(self, body: bytes) -> Any:
        """POST /v1/completions: a dict (JSON) or an async iterator of SSE bytes."""
        t0 = time.perf_counter()
        req = parse_request(CompletionRequest, body)
        self._check_model(req.model)
        prompts = completion_prompts(req)
        check_fan_out(len(prompts), req.n or 1, self.max_queued_requests)
        await self.check_schemas(req)
        ids = await self.client.tokenize_prompts(prompts)
        limits = dict(limit=self.client.info.token_limit, default=DEFAULT_COMPLETION_MAX_TOKENS)
        limits.update(param="max_tokens", prompt_param="prompt")
        drop_output = bool(req.echo) and req.max_tokens == 0  # the prompt's logprobs alone (lm-eval)
        max_tokens = 1 if drop_output else req.max_tokens
        n = req.n or 1
        params = [
            choice
            for x in ids
            for choice in choice_params(sampling_params(req, resolve_max_tokens(max_tokens, len(x), **limits)), n)
        ]
        echo = None
        if req.echo:
            texts = [p if isinstance(p, str) else self.client.tokenizer.decode(p, False) for p in prompts]
            lead = None
            if n > 1 and params[0].prompt_logprobs is not None:
                # a prompt's logprobs are the same for all its choices: its first choice alone
                # computes them (a logit row per prompt token, and no prefix cache)
                lead = [i - i % n for i in range(len(params))]
                params = [
                    p if i == j else dataclasses.replace(p, prompt_logprobs=None)
                    for i, (p, j) in enumerate(zip(params, lead))
                ]
            echo = Echo([t for t in texts for _ in range(n)], [x for x in ids for _ in range(n)], drop_output, lead)
        rid = f"cmpl-{uuid.uuid4().hex}"
        prompt_tokens = sum(map(len, ids))
        ids = [x for x in ids for _ in range(n)]  # choices prompt by prompt, as OpenAI orders them
        return await self.choices.run(
            req,
            chat=False,
            rid=rid,
            ids=ids,
            params=params,
            t0=t0,
            echo=echo,
            prompt_tokens=prompt_tokens,
            per_prompt=n,
        )

    async def chat(self, body: bytes) -> Any:
        """POST /v1/chat/completions: a dict (JSON) or an async iterator of SSE bytes."""
        t0 = time.perf_counter()
        req = parse_request(ChatRequest, body)
        self._check_model(req.model)
        check_fan_out(1, req.n or 1, self.max_queued_requests)
        tools, (mode, forced) = req.tools or [], tool_choice(req)  # tools checked by parse_request
        # the template tells the model about the tools it may call
        ids = await self.client.tokenize_chat(
            chat_messages(req), req.chat_template_kwargs, tools=tools if mode != "none" else None
        )
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        limit = resolve_max_tokens(
            requested, len(ids), limit=self.client.info.token_limit, default=None, param=param, prompt_param="messages"
        )
        await self.check_schemas(req)  # after the prompt's length: the tools' schemas are in it
        n = req.n or 1
        params = sampling_params(req, limit)
        if mode in ("required", "function"):  # one call, written as the parser reads it
            try:
                params = dataclasses.replace(params, grammar=self.tool_parser.forced_call(tools, forced))
            except ValueError as e:  # the tools' schemas are too large to force
                raise bad_request(f"tools: {str(e).partition(': ')[2]}", "tools", "invalid_value") from None
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        return await self.choices.run(
            req,
            chat=True,
            rid=rid,
            ids=[ids] * n,
            params=choice_params(params, n),
            t0=t0,
            prompt_tokens=len(ids),
            per_prompt=n,
            tool_calls=mode != "none",
            one_tool_call=req.parallel_tool_calls is False,
        )

    async def tokenize(self, body: bytes) -> dict[str, Any]:
        """POST /tokenize (vLLM's shape)."""
        model, response = await tokenize(self.client, body)
        self._check_model(model)
        return response

    async def detokenize(self, body: bytes) -> dict[str, Any]:
        """POST /detokenize (vLLM's shape)."""
        model, response = await detokenize(self.client, body)
        self._check_model(model)
        return response

    async def stats(self) -> EngineStats:
        return await self.controller.stats.remote()

    async def metrics_text(self, timeout_s: float) -> bytes:
        """Prometheus text; this replica's own metrics also while the controller does not
        answer within ``timeout_s`` (dead, or hung), when they matter most."""
        try:
            answers = asyncio.gather(self.controller.stats.remote(), self.controller.eplb_status.remote())
            stats, eplb = await asyncio.wait_for(answers, timeout_s)
        except Exception as e:  # noqa: BLE001 -- any failure to reach the engine is reported, not raised
            log.warning("metrics: the controller does not answer: %r", e)
            asyncio.create_task(self.client.engine.reconnect())  # to the one its host may have started
            stats, eplb = None, None
        return self.metrics.render(stats, eplb, controllers_lost=self.client.controllers_lost)

    async def eplb_status(self, body: bytes) -> dict[str, Any]:
        return await self.controller.eplb_status.remote()

    async def rebalance(self, body: bytes) -> dict[str, Any]:
        """Start a rebalance; optional JSON body {"logical_load": [[...] per MoE layer]}."""
        load = None
        if body.strip():
            try:
                # pydantic's parser, as every other body's: it refuses lone UTF-16 surrogates
                # ("\ud800"), which json.loads takes, and an error naming one could not be encoded (a 500)
                fields = pydantic_core.from_json(body)
                unknown = sorted(set(fields) - {"logical_load"})
                load = fields.get("logical_load")
            except (ValueError, TypeError, AttributeError):
                raise APIError(400, 'body must be a JSON object, e.g. {} or {"logical_load": [[...]]}') from None
            if unknown:
                field = str(unknown[0])[:40]
                raise APIError(400, f"{field}: unknown field; the body takes logical_load", param=field)
        try:
            return await self.controller.rebalance.remote(load)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, RebalanceRefused):
                raise APIError(409, str(e.cause), type="conflict_error") from None
            if isinstance(e.cause, ValueError):
                raise APIError(400, str(e.cause), param="logical_load" if load is not None else None) from None
            raise
