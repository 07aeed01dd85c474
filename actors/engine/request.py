"""Requests as the engine sees them: user sampling parameters and per-request state.

Pure Python (no torch, no ray): the scheduler and block manager work on these objects,
the runner only ever sees the frozen `ScheduledChunk`s built from them.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from raymoe.actors.engine.grammar import GrammarSpec

FINISH_REASONS = ("stop", "length", "abort")

# Bounds of what the engine packs into its step columns (int64 seeds, float32 sampling
# parameters) and of what one request may ask for. A request past them is refused when it
# is built, so nothing a client sends can fail a step.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
TOP_K_MAX = 2**31 - 1
GREEDY_BELOW = 1e-5  # temperatures under this are greedy (float32 division by them overflows)
TOP_P_MIN = 1e-6  # smaller top_p keeps the top token alone, as this does (float32 rounds below to 0)
MAX_STOP_STRINGS = 64
MAX_STOP_LENGTH = 1024  # characters per stop string
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGPROBS = 20  # top alternatives per position (OpenAI's chat limit)
PENALTY_RANGE = (-2.0, 2.0)  # presence and frequency penalties (OpenAI's range)
# vLLM's repetition penalty divides (or multiplies) logits by it in float32: bounded so that it
# stays a normal float32 number, with room (1.0-1.5 is the useful range)
REPETITION_PENALTY_RANGE = (1e-3, 1e3)
LOGIT_BIAS_RANGE = (-100.0, 100.0)
MAX_LOGIT_BIAS = 1024  # entries


def _fail(name: str, rule: str, value: Any) -> None:
    shown = repr(value)
    if len(shown) > 200:  # the message goes back to the client: a hostile value stays out of it
        shown = f"{shown[:200]}... ({len(shown):,} characters)"
    raise ValueError(f"{name}: {rule}, got {shown}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def first_invalid_token_id(ids: Sequence[Any], vocab_size: Optional[int] = None) -> Optional[Any]:
    """The first entry of ``ids`` that is not an int in [0, vocab_size) (no upper bound when
    None); None when all are. Vectorised for the usual list of plain ints (long prompts)."""
    if set(map(type, ids)) <= {int}:
        try:
            arr = np.array(ids, dtype=np.int64)
        except OverflowError:  # beyond int64: found below
            arr = None
        if arr is not None:
            bad = (arr < 0) | (arr >= vocab_size) if vocab_size is not None else arr < 0
            return ids[int(bad.argmax())] if bad.any() else None
    return next((t for t in ids if not _is_int(t) or t < 0 or (vocab_size is not None and t >= vocab_size)), None)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to sample one request. Immutable; build from user input with `create`."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0.0 = greedy (so is anything below GREEDY_BELOW)
    top_k: int = -1  # -1 = no top-k
    top_p: float = 1.0  # (0, 1]
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()  # stop strings (cut from the output text)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # the next fields change the logits before sampling (``sampling_controls``): 0 / 1 / () = off
    presence_penalty: float = 0.0  # subtracted once from each token the output holds
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # vLLM's: seen (prompt or output) logits / p if > 0 else * p
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens are out (stop strings wait too)
    # log-probabilities (of the raw float32 logits): None = none; k = the token's and the top k
    logprobs: Optional[int] = None  # of each output token
    prompt_logprobs: Optional[int] = None  # of each prompt token but the first
    grammar: Optional[GrammarSpec] = None  # structured output: what the text must match (``grammar``)

    @classmethod
    def create(cls, **kwargs: Any) -> "SamplingParams":
        """Build from user input: lists become tuples, a lone stop string becomes a 1-tuple,
        unknown names are a ValueError; the result is validated."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown sampling parameter; valid ones are {sorted(known)}")
        if isinstance(kwargs.get("stop"), str):
            kwargs["stop"] = (kwargs["stop"],)
        for name in ("stop", "stop_token_ids"):
            if isinstance(kwargs.get(name), list):
                kwargs[name] = tuple(kwargs[name])
        if isinstance(kwargs.get("logit_bias"), dict):
            kwargs["logit_bias"] = tuple(sorted(kwargs["logit_bias"].items()))
        return cls(**kwargs).validate()

    def validate(self) -> "SamplingParams":
        """Return self, or raise ValueError naming the bad field and its valid range."""
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            _fail("max_tokens", "must be an integer >= 1", self.max_tokens)
        temp = self.temperature
        if isinstance(temp, bool) or not isinstance(temp, (int, float)) or not (math.isfinite(temp) and temp >= 0):
            _fail("temperature", "must be a finite number >= 0 (0 = greedy)", temp)
        if not _is_int(self.top_k) or not (self.top_k == -1 or 1 <= self.top_k <= TOP_K_MAX):
            _fail("top_k", f"must be -1 (disabled) or an integer in [1, {TOP_K_MAX}]", self.top_k)
        top_p = self.top_p
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not (0 < top_p <= 1):
            _fail("top_p", "must be in (0, 1]", top_p)
        if self.seed is not None and not (_is_int(self.seed) and INT64_MIN <= self.seed <= INT64_MAX):
            _fail("seed", "must be a 64-bit signed integer or None", self.seed)
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            _fail("stop", "must be non-empty strings", self.stop)
        if len(self.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_LENGTH for s in self.stop):
            _fail(
                "stop",
                f"at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_LENGTH} characters",
                f"{len(self.stop)} strings, the longest {max(map(len, self.stop))} characters",
            )
        ids = self.stop_token_ids
        if not isinstance(ids, tuple) or not all(_is_int(t) and 0 <= t <= INT64_MAX for t in ids):
            _fail("stop_token_ids", "must be a tuple of integers >= 0", ids)
        if len(ids) > MAX_STOP_TOKEN_IDS:
            _fail("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids", f"{len(ids)} ids")
        if not isinstance(self.ignore_eos, bool):
            _fail("ignore_eos", "must be a bool", self.ignore_eos)
        self._validate_controls()
        if self.grammar is not None and not isinstance(self.grammar, GrammarSpec):
            _fail("grammar", "must be a GrammarSpec or None", self.grammar)
        return self

    def _validate_controls(self) -> None:
        low, high = PENALTY_RANGE
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not low <= value <= high:
                _fail(name, f"must be a number in [{low:g}, {high:g}]", value)
        rep, (low, high) = self.repetition_penalty, REPETITION_PENALTY_RANGE
        if not _is_number(rep) or not low <= rep <= high:
            _fail("repetition_penalty", f"must be a number in [{low:g}, {high:g}] (1 = off)", rep)
        low, high = LOGIT_BIAS_RANGE
        bias = self.logit_bias
        if not isinstance(bias, tuple) or len(bias) > MAX_LOGIT_BIAS:
            count = len(bias) if isinstance(bias, tuple) else bias  # the count, not a long quote
            _fail("logit_bias", f"must map at most {MAX_LOGIT_BIAS} token ids to biases", count)
        for entry in bias:
            if not (isinstance(entry, tuple) and len(entry) == 2 and _is_int(entry[0]) and entry[0] >= 0):
                _fail("logit_bias", "keys must be token ids (integers >= 0)", entry)
            if not _is_number(entry[1]) or not low <= entry[1] <= high:
                _fail("logit_bias", f"values must be numbers in [{low:g}, {high:g}]", entry[1])
        if len({t for t, _ in bias}) != len(bias):
            _fail("logit_bias", "each token id at most once", bias)
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            _fail("min_tokens", f"must be an integer in [0, max_tokens={self.max_tokens}]", self.min_tokens)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and 0 <= value <= MAX_LOGPROBS):
                _fail(name, f"must be None or an integer in [0, {MAX_LOGPROBS}]", value)

    @property
    def uses_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def controls_logits(self) -> bool:
        """The logits are changed before sampling (penalties, logit_bias, min_tokens)."""
        return self.uses_penalties or bool(self.logit_bias) or self.min_tokens > 0

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


# An output token sampled by the ranks in a step still in flight (see Scheduler.advance)
PENDING_TOKEN = -1


@dataclass(eq=False)
class Request:
    """Mutable engine-side state of one request.

    Invariant kept by the scheduler: the KV cache holds the first `num_computed_tokens`
    of `all_token_ids`, and `block_ids` covers exactly those (plus, between schedule and
    advance, the tokens scheduled this step). Between advance and fill the last output
    is PENDING_TOKEN. `arrival` orders requests (FCFS, preemption).
    `seed` is the resolved seed: `sampling.seed` if the user gave one, else one the
    engine drew.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    _: KW_ONLY
    seed: int
    arrival: float
    eos_token_ids: frozenset[int] = frozenset()
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: Optional[str] = None
    num_preemptions: int = 0
    num_overtaken: int = 0  # later requests started before it while it did not fit (bounded)
    overtook: bool = False  # it started before an older request that did not fit
    # prompt positions whose next-token logprobs a step computes or computed (prompt_logprobs)
    num_prompt_logprob_rows: int = 0
    prompt_logprobs: list = field(default_factory=list)  # gathered until the first output token goes out
    block_keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of its leading full blocks
    num_cached_prompt_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (usage)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("prompt_token_ids: the prompt must hold at least one token")
        if first_invalid_token_id(self.prompt_token_ids) is not None:
            raise ValueError("prompt_token_ids: every token id must be an integer >= 0")
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.eos_token_ids = frozenset(self.eos_token_ids)
        assert self.sampling.seed is None or self.sampling.seed == self.seed, "seed must honour sampling.seed"

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_array(self) -> np.ndarray:
        """``all_token_ids`` as int64 numpy (the prompt converted once)."""
        return np.concatenate((self._prompt_array, np.array(self.output_token_ids, dtype=np.int64)))

    @functools.cached_property
    def _prompt_array(self) -> np.ndarray:
        return np.array(self.prompt_token_ids, dtype=np.int64)

    def token_ids(self, start: int, end: int) -> list[int]:
        """``all_token_ids[start:end]`` without building the whole list."""
        split = len(self.prompt_token_ids)
        if end <= split:
            return self.prompt_token_ids[start:end]
        if start >= split:
            return self.output_token_ids[start - split : end - split]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - split]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
