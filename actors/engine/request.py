"""Requests as the engine sees them: user sampling parameters and per-request state.

Pure Python (no torch, no ray): the scheduler and block manager work on these objects,
the runner only ever sees the frozen `ScheduledChunk`s built from them.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Optional

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


def _fail(name: str, rule: str, value: Any) -> None:
    raise ValueError(f"{name}: {rule}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
            _fail("stop", "must be a tuple of non-empty strings", self.stop)
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
        return self

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

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("prompt_token_ids: the prompt must hold at least one token")
        if not all(_is_int(t) and t >= 0 for t in self.prompt_token_ids):
            raise ValueError("prompt_token_ids: every token id must be an integer >= 0")
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.eos_token_ids = frozenset(self.eos_token_ids)
        assert self.sampling.seed is None or self.sampling.seed == self.seed, "seed must honour sampling.seed"

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
