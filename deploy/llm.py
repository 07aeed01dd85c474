"""The offline Python API: ``LLM(config).generate(prompts, sampling)``.

    from raymoe.deploy import LLM, SamplingParams
    with LLM() as llm:                       # built-in tiny model on CPU
        print(llm.generate("Hello", SamplingParams(max_tokens=16, temperature=0))[0].text)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import ray

from raymoe.actors.engine.request import SamplingParams
from raymoe.cluster.config import Config, load_config
from raymoe.deploy.launch import start_controller

Prompt = Union[str, Sequence[int], Sequence[dict]]


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    num_prompt_tokens: int
    logits: list[Any] = field(default_factory=list)  # per output token, when collect_logits=True


class LLM:
    def __init__(
        self, config: Union[Config, str, None] = None, address: Optional[str] = None, collect_logits: bool = False
    ) -> None:
        self.config = config if isinstance(config, Config) else load_config(config)
        self.controller = start_controller(self.config, address)
        try:
            self.info = ray.get(self.controller.load_model.remote(collect_logits))
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
        results = ray.get(self.controller.generate.remote(prompts, list(sampling)))
        return [Completion(**r) for r in results]

    def chat(self, messages: Sequence[dict], sampling: Optional[SamplingParams] = None) -> Completion:
        """Answer one conversation (a list of {"role", "content"} messages)."""
        return self.generate([list(messages)], sampling)[0]

    def shutdown(self) -> None:
        if getattr(self, "controller", None) is not None:
            try:
                ray.get(self.controller.shutdown.remote())
            finally:
                ray.kill(self.controller)
                self.controller = None

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
