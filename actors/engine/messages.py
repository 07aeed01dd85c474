"""What crosses the actor boundary between the engine (controller) and its clients.

A client is an ingress replica or the offline ``LLM``. It submits requests in batches
(``NewRequest``, answered with a ``Rejection`` for each one the engine refuses), aborts
them by handle, and polls for its outputs: one ``OutputBatch`` holding every step's new
token ids and finish states of that client's requests since its last poll, as flat
columns. So the Ray calls per step never grow with the number of running requests, and
a client receives only its own requests' outputs. Text (detokenisation, stop strings)
is the client's work, not the engine's.

Pure data: no torch, no ray.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple, Optional

import numpy as np

from raymoe.actors.engine.admission import token_limit
from raymoe.actors.engine.request import SamplingParams


class Finish(enum.IntEnum):
    """A request's state after an output entry."""

    RUNNING = 0
    STOP = 1  # its last token is an EOS or one of stop_token_ids: a token, but no text
    LENGTH = 2  # max_tokens or max_model_len reached: its last token is text
    ABORT = 3  # the engine dropped it (its client went silent)
    FAILED = 4  # the engine failed while it ran (OutputBatch.failure says why): an error, not a finish

    @property
    def reason(self) -> Optional[str]:
        """The OpenAI finish_reason, None while running (and for FAILED, which is an error)."""
        return _REASONS[self]


_REASONS = {
    Finish.RUNNING: None,
    Finish.STOP: "stop",
    Finish.LENGTH: "length",
    Finish.ABORT: "abort",
    Finish.FAILED: None,
}


@dataclass(frozen=True)
class NewRequest:
    seq: int  # the client's handle for the request, unique among its live requests
    prompt_token_ids: list[int]
    sampling: SamplingParams


class RejectKind(str, enum.Enum):
    INVALID = "invalid"  # the request can never run (too long for the context or the cache)
    QUEUE_FULL = "queue_full"  # serve.max_queued_requests are already waiting
    ENGINE_FAILED = "engine_failed"  # the step loop has failed
    INTERNAL = "internal"  # taking the request raised unexpectedly (a bug: the controller's log has it)


@dataclass(frozen=True)
class Rejection:
    seq: int
    kind: RejectKind
    message: str


class Logprob(NamedTuple):
    """One position's log-probabilities (raw float32 logits): of its token, and the top
    alternatives, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class Entry(NamedTuple):
    """One request's outputs from one step."""

    seq: int
    token_ids: list[int]
    finish: "Finish"
    logits: Optional[list[Any]]  # one row per token, when the engine collects logits
    logprobs: list[Logprob]  # one per token when the request asks for them, else empty
    prompt_logprobs: Optional[list[Optional[Logprob]]]  # with the first output token (None: the first)
    cached_tokens: Optional[int] = None  # with the first output token: prompt tokens from the prefix cache


@dataclass(frozen=True, kw_only=True)
class OutputBatch:
    """One client's outputs since its last poll: an entry per request per step, in step
    order. A request may have several entries (several steps), and its last entry
    carries its finish state."""

    seqs: np.ndarray  # [n] int64: the request of each entry
    num_tokens: np.ndarray  # [n] int64: new tokens of each entry
    token_ids: np.ndarray  # [sum(num_tokens)] int64: the entries' tokens, entry after entry
    finish: np.ndarray  # [n] int8: Finish after each entry
    logits: Optional[list[Any]] = (
        None  # one [vocab] float32 row (CPU tensor) per token, when the engine collects logits
    )
    error: Optional[str] = None  # the engine failed for good: every request of this client is over
    failure: Optional[str] = None  # why the FAILED entries failed (no internal ids: it goes to clients)
    logprobs: Optional[dict[int, Logprob]] = None  # index into token_ids -> its logprobs, where asked
    prompt_logprobs: Optional[dict[int, list]] = None  # entry index -> its request's prompt logprobs
    cached_tokens: Optional[dict[int, int]] = None  # entry index -> its prompt tokens from the prefix cache

    @property
    def num_entries(self) -> int:
        return int(self.seqs.shape[0])

    def entries(self) -> Iterator[Entry]:
        ends = np.cumsum(self.num_tokens).tolist()
        tokens = self.token_ids.tolist()
        logprobs, prompt, cached = self.logprobs or {}, self.prompt_logprobs or {}, self.cached_tokens or {}
        start = 0
        for i, (seq, end, finish) in enumerate(zip(self.seqs.tolist(), ends, self.finish.tolist())):
            rows = self.logits[start:end] if self.logits is not None else None
            lps = [logprobs[t] for t in range(start, end) if t in logprobs] if logprobs else []
            yield Entry(seq, tokens[start:end], Finish(finish), rows, lps, prompt.get(i), cached.get(i))
            start = end


def empty_batch(error: Optional[str] = None) -> OutputBatch:
    none = np.zeros(0, dtype=np.int64)
    return OutputBatch(seqs=none, num_tokens=none, token_ids=none, finish=np.zeros(0, dtype=np.int8), error=error)


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """What the engine serves, for its clients."""

    model: str  # the checkpoint directory
    architecture: str
    vocab_size: int  # the model's (embedding rows); the tokenizer may know fewer ids
    max_model_len: int
    kv_blocks_per_replica: int
    block_size: int
    load_s: float

    @property
    def token_limit(self) -> int:
        """Most tokens (prompt + output) one request may hold (see admission)."""
        return token_limit(
            max_model_len=self.max_model_len, num_blocks=self.kv_blocks_per_replica, block_size=self.block_size
        )


@dataclass(frozen=True, kw_only=True)
class EngineStats:
    """The engine's state now; lists hold one value per DP replica."""

    waiting: list[int]
    running: list[int]
    kv_usage: list[float]
    prefix_cache_hit_tokens: list[int]  # tokens of starting requests whose KV came from the cache
    prefix_cache_query_tokens: list[int]  # tokens of starting requests (new or resumed)
    steps: int
    preemptions: int
    polls: int  # poll calls answered since start (all clients)
    submit_calls: int  # submit calls answered since start (all clients)
    restarts: int  # rank-group restarts after failures since start
    recovering: bool  # a restart is under way
    error: Optional[str]  # why the engine stopped for good, None while it serves
