"""One request's output as its client sees it: token deltas from the engine -> text deltas.

The engine reports tokens and token-level finishes (EOS or stop_token_ids: ``STOP``,
whose token is not text; ``LENGTH``); this turns them into text with the request's
incremental detokenizer, cuts it at the first stop string and counts the output
tokens. A stop string ends the request here, before the engine knows: the caller
then aborts it in the engine (``needs_abort``), and whatever the engine sampled
after that token is dropped. So the text and the token count are exactly those of
a request stopped at the token that completed the stop string.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from raymoe.actors.engine.detokenizer import IncrementalDetokenizer
from raymoe.actors.engine.messages import Finish, Logprob
from raymoe.actors.engine.tokenizer import Tokenizer


@dataclass(kw_only=True)
class Delta:
    """What changed for one request since its last delta."""

    token_ids: list[int]
    text: str
    finish_reason: Optional[str]  # "stop" | "length" | "abort" once finished, else None
    num_output_tokens: int  # output tokens so far, these included
    logits: list[Any] = field(default_factory=list)  # one row per token, when the engine collects logits
    logprobs: list[Logprob] = field(default_factory=list)  # one per token, when the request asks
    prompt_logprobs: Optional[list[Optional[Logprob]]] = None  # in the first delta, when the request asks
    cached_tokens: Optional[int] = None  # in the first delta: prompt tokens the prefix cache gave

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class OutputText:
    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], stop: tuple[str, ...] = (), min_tokens: int = 0
    ) -> None:
        """``min_tokens``: the request's; stop strings in its first that many tokens' text stop nothing."""
        self._detok = IncrementalDetokenizer(tokenizer, prompt_token_ids, stop, min_tokens=min_tokens)
        self._has_stop_strings = bool(stop)
        self.num_output_tokens = 0
        self.finish_reason: Optional[str] = None
        self.needs_abort = False  # stopped by a stop string: the engine still runs it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(
        self,
        token_ids: list[int],
        finish: Finish,
        logits: Optional[list[Any]] = None,
        logprobs: Optional[list[Logprob]] = None,
    ) -> Delta:
        """Take the engine's next tokens for this request and its state after them."""
        if self.finished:
            # sampled after a stop string
            return Delta(token_ids=[], text="", finish_reason=None, num_output_tokens=self.num_output_tokens)
        texts = token_ids[:-1] if finish == Finish.STOP else token_ids
        if self._has_stop_strings:
            taken, text = self._add_until_stop(texts)
        else:
            taken, text = len(texts), self._detok.add_many(texts)
        if self._detok.stopped:
            token_ids, self.finish_reason, self.needs_abort = token_ids[:taken], "stop", finish == Finish.RUNNING
        elif finish != Finish.RUNNING:
            text += self._detok.flush()
            self.finish_reason = finish.reason
        self.num_output_tokens += len(token_ids)
        return Delta(
            token_ids=token_ids,
            text=text,
            finish_reason=self.finish_reason,
            num_output_tokens=self.num_output_tokens,
            logits=list(logits or [])[: len(token_ids)],
            logprobs=list(logprobs or [])[: len(token_ids)],
        )

    def _add_until_stop(self, token_ids: list[int]) -> tuple[int, str]:
        """Tokens one at a time up to the one that completes a stop string; (taken, text)."""
        parts = []
        for n, token in enumerate(token_ids, 1):
            parts.append(self._detok.add(token))
            if self._detok.stopped:
                return n, "".join(parts)
        return len(token_ids), "".join(parts)
