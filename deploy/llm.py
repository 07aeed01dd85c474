"""The offline Python API: ``LLM(config).generate(prompts, sampling)``; ``config`` as
``raymoe generate --config`` takes it.

    from raymoe.deploy import LLM, SamplingParams
    with LLM() as llm:                       # built-in tiny model on CPU
        print(llm.generate("Hello", SamplingParams(max_tokens=16, temperature=0))[0].text)

It is an engine client like an ingress replica (``EngineClient``: tokenising, batched
submission, one poll per step, detokenising here), minus HTTP. The client runs on an
event loop of its own in a background thread, so ``generate`` works from plain scripts
and from notebooks (whose own loop is already running) alike.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import ray

from raymoe.actors.engine.request import SamplingParams
from raymoe.actors.engine.tokenizer import encode_chat, encode_prompt
from raymoe.cluster.config import Config, resolve_config
from raymoe.deploy.engine_client import EngineClient
from raymoe.deploy.launch import start_controller
from raymoe.deploy.ray_engine import RayEngine
from raymoe.deploy.request_stream import RequestRejected

Prompt = Union[str, Sequence[int], Sequence[dict]]


@dataclass(kw_only=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    num_prompt_tokens: int
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    logits: list[Any] = field(default_factory=list)  # per output token, when collect_logits=True
    logprobs: list[Any] = field(default_factory=list)  # per output token (Logprob), when params.logprobs is set
    # per prompt token (None for the first), when params.prompt_logprobs is set
    prompt_logprobs: Optional[list[Any]] = None


class LLM:
    def __init__(
        self,
        config: Union[Config, str, None] = None,
        address: Optional[str] = None,
        collect_logits: bool = False,
        controller: Any = None,
    ) -> None:
        """Start a controller for ``config`` (a Config, a YAML path or a shipped config's name,
        e.g. ``"tiny"``; None: the built-in tiny model) and load its model; or, given
        ``controller`` (a running controller's handle, e.g. a server's), use that one and
        leave it running."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="raymoe-llm-client", daemon=True)
        self._thread.start()
        self._owns_controller = controller is None
        try:
            if controller is None:
                self.config = resolve_config(config)
                self.controller = start_controller(self.config, address)
                self.info = ray.get(self.controller.load_model.remote(collect_logits))
            else:
                self.controller = controller
                self.info = ray.get(self.controller.get_model_info.remote())
            tokenizer = ray.get(self.controller.get_tokenizer.remote())
            self.client = self._run(_make_client(self.controller, tokenizer, self.info))
        except BaseException:
            self.shutdown()
            raise

    def generate(
        self,
        prompts: Union[Prompt, Sequence[Prompt]],
        sampling: Union[SamplingParams, Sequence[SamplingParams], None] = None,
    ) -> list[Completion]:
        """Complete each prompt (text, token ids, or a chat as a list of messages)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], (int, dict))):
            prompts = [prompts]  # one prompt
        prompts = list(prompts)
        if sampling is None or isinstance(sampling, SamplingParams):
            sampling = [(sampling or SamplingParams()).validate()] * len(prompts)
        if len(sampling) != len(prompts):
            raise ValueError(f"sampling: {len(sampling)} parameter sets for {len(prompts)} prompts")
        ids = [self._tokenize(p) for p in prompts]
        return self._run(_generate(self.client, ids, list(sampling)))

    def chat(self, messages: Sequence[dict], sampling: Optional[SamplingParams] = None) -> Completion:
        """Answer one conversation (a list of {"role", "content"} messages)."""
        return self.generate([list(messages)], sampling)[0]

    def shutdown(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            self.client = None
            self._run(client.close())
        if getattr(self, "controller", None) is not None and self._owns_controller:
            try:
                ray.get(self.controller.shutdown.remote())
            finally:
                ray.kill(self.controller)
                self.controller = None
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()

    def _tokenize(self, prompt: Prompt) -> list[int]:
        tokenizer = self.client.tokenizer
        if prompt and isinstance(prompt[0], dict):
            return encode_chat(tokenizer, list(prompt))
        return encode_prompt(tokenizer, prompt, self.info.vocab_size)

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


async def _make_client(controller: Any, tokenizer: Any, info: Any) -> EngineClient:
    return EngineClient(RayEngine(controller), tokenizer, info)  # its events belong to this loop


async def _generate(client: EngineClient, ids: list[list[int]], sampling: list[SamplingParams]) -> list[Completion]:
    async def one(prompt_ids: list[int], params: SamplingParams) -> Completion:
        out = Completion(text="", token_ids=[], finish_reason="", num_prompt_tokens=len(prompt_ids))
        try:
            async for delta in client.stream(prompt_ids, params):
                out.text += delta.text
                out.token_ids += delta.token_ids
                out.logits += delta.logits
                out.logprobs += delta.logprobs
                if delta.prompt_logprobs is not None:
                    out.prompt_logprobs = delta.prompt_logprobs
                out.finish_reason = delta.finish_reason or ""
                if delta.cached_tokens is not None:
                    out.num_cached_tokens = delta.cached_tokens
        except RequestRejected as e:  # a request that can never run: the caller's mistake
            raise (ValueError(str(e)) if e.kind.value == "invalid" else RuntimeError(str(e))) from None
        return out

    return list(await asyncio.gather(*(one(x, s) for x, s in zip(ids, sampling))))
