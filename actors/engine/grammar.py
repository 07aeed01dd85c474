"""Structured output: grammars that constrain what a request may generate (a JSON schema,
any JSON object, a regex, a fixed choice of strings, an EBNF grammar), through xgrammar.

The engine's policy side (``EngineCore``) keeps one matcher per constrained request: it
writes the request's allowed next tokens as a packed bitmask (``grammar_masks``), and after
each step advances the matcher by the sampled token. The ranks only unpack the bitmask and
set the disallowed logits to -inf (``apply_token_bitmask``), so a constrained request can
only produce text its grammar accepts; the grammar ending ends the request. No torch here
but what xgrammar itself needs.

A matcher needs the request's last token before it can mask the next one. When that token
is still pending on the ranks (pipelined steps), the step goes out without the masks and
the ranks run its forward pass; the masks follow with the next call to the ranks, once the
step before is back, and the ranks sample then (``StepInput.grammar_late``). The masks are
computed while the device runs the forward, so constrained requests run every step.
"""

from __future__ import annotations

import functools
import json
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

import numpy as np

from raymoe.actors.engine.json_schema import (
    MAX_SCHEMA_DEPTH,
    check_schema,
    check_schema_shape,
    json_schema_grammar,
    pattern_without_surrogates,
)
from raymoe.actors.engine.regex_scan import regex_atoms, unsupported_regex

GrammarKind = Literal["json", "regex", "choice", "ebnf", "tagged_json"]
_CACHE_SIZE = 256  # compiled grammars kept (a JSON schema's compiled form is ~100 KB-1 MB)
MAX_GRAMMAR_CHARS = 64 * 1024  # a schema, regex or grammar longer than this is refused (compile time)
# One request's mask for one step may take this much CPU time; a grammar whose first mask takes
# more is refused. JSON schemas, regexes and choices take well under a millisecond; xgrammar's
# parser can be driven into far more (a chain of 2,800 alternatives: 8 s a step), and every step
# waits for the masks of all its rows.
GRAMMAR_FILL_BUDGET_S = 0.02
# A step's masks taking longer than this (wall time) have the requests whose own masks take over
# GRAMMAR_FILL_BUDGET_S failed (``slow_matchers``): a grammar can be fast at its start only.
GRAMMAR_STEP_BUDGET_S = 0.05


@dataclass(frozen=True)
class GrammarSpec:
    """What a request's output must match. ``source``: the JSON schema as text ("" for any
    JSON object), the regex, the JSON list of choices, the EBNF grammar (root rule
    ``root``), or for ``tagged_json`` a JSON object {"begin", "schema", "end"}: a JSON value
    of that schema between two literal strings (a tool call). ``field``: the API field it
    came from, named in errors."""

    kind: GrammarKind
    source: str
    field: str = "response_format"

    def __post_init__(self) -> None:
        if self.kind not in ("json", "regex", "choice", "ebnf", "tagged_json"):
            raise ValueError(f"{self.field}: unknown grammar kind {self.kind!r}")
        if len(self.source) > MAX_GRAMMAR_CHARS:
            raise ValueError(f"{self.field}: at most {MAX_GRAMMAR_CHARS} characters of schema or grammar")


def _json_or_none(text: str, field: str) -> Any:
    """The parsed schema, or None when it is not JSON (xgrammar's compile then says why)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{field}: the schema nests deeper than {MAX_SCHEMA_DEPTH} levels") from None
    except ValueError:
        return None


def _dot_without_newline(regex: str) -> str:
    """``regex`` with each "." that matches any character as "[^\\n]": xgrammar's "." also
    matches a newline, Python's and ECMA-262's do not."""
    return "".join("[^\\n]" if atom == "." and not in_class else atom for _, atom, in_class, _ in regex_atoms(regex))


def choice_grammar(choices: Sequence[str]) -> str:
    """EBNF accepting exactly one of ``choices`` (JSON string escapes are EBNF's)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class GrammarCompiler:
    """Compiles ``GrammarSpec``s for one tokenizer and vocabulary (cached, thread-safe: the
    step loop compiles in a worker thread) and makes matchers."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int]) -> None:
        self.vocab_size = vocab_size
        self._tokenizer = tokenizer
        self._eos = sorted(eos_token_ids)
        # Masks cover the ids the tokenizer has (and the stop ids): a model vocabulary padded past
        # them (the built-in tokenizer's 512 ids under a 151,936-row shape) has ids no text maps to,
        # which no grammar allows, and xgrammar scans such ids on every fill and accept (64 masks:
        # 15 ms with 151k of them, 0.24 ms for a real 149k-token vocabulary); the sampler
        # disallows every id past the mask (sampler.apply_token_bitmask).
        known = max(tokenizer.backend.get_vocab(with_added_tokens=True).values(), default=-1)
        self.mask_vocab_size = min(vocab_size, max([known, *self._eos]) + 1)
        self._compiler: Any = None  # built at the first grammar (imports xgrammar, reads the vocabulary)
        self._cache: OrderedDict[GrammarSpec, Any] = OrderedDict()
        self._lock = threading.Lock()

    def _xgrammar_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                import transformers
                import xgrammar

                backend = self._tokenizer.backend
                hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend)
                info = xgrammar.TokenizerInfo.from_huggingface(
                    hf, vocab_size=self.mask_vocab_size, stop_token_ids=self._eos or None
                )
                # special tokens but the stops are text to xgrammar here, and decoding drops them
                # (a grammar's "<|im_start|>" came back as ""): as empty strings it never allows them
                vocab = [""] * self.mask_vocab_size
                for token, i in hf.get_vocab().items():  # as from_huggingface reads it
                    if i < self.mask_vocab_size:
                        vocab[i] = token
                added = backend.get_added_tokens_decoder().items()
                special = [i for i, t in added if t.special and i not in self._eos and i < self.mask_vocab_size]
                if special:
                    for i in special:
                        vocab[i] = ""
                    info = xgrammar.TokenizerInfo.from_vocab_and_metadata(vocab, info.dump_metadata())
                # no cache of its own (by default unbounded: the process grew with every new
                # schema); compiled grammars are cached here, _CACHE_SIZE of them
                self._compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
            return self._compiler

    def is_cached(self, spec: GrammarSpec) -> bool:
        """Whether ``compile(spec)`` answers at once (compiled before, still cached)."""
        with self._lock:
            return spec in self._cache

    def compile(self, spec: GrammarSpec) -> Any:
        """The compiled grammar of ``spec``; ValueError naming ``spec.field`` when it is invalid
        (cached as well: a refused grammar may have taken seconds to find out, and the engine
        asks again on its event loop)."""
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                compiled = self._cache[spec]
                if isinstance(compiled, ValueError):
                    raise ValueError(*compiled.args)
                return compiled
        try:
            compiled = self._compile(spec)
        except ValueError as e:
            compiled = e
        with self._lock:
            self._cache[spec] = compiled
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        if isinstance(compiled, ValueError):
            raise compiled
        return compiled

    def matcher(self, compiled: Any) -> "GrammarMatcher":
        import xgrammar

        return GrammarMatcher(xgrammar.GrammarMatcher(compiled))

    def _compile(self, spec: GrammarSpec) -> Any:
        c = self._xgrammar_compiler()
        if spec.kind == "json" and spec.source:
            check_schema(_json_or_none(spec.source, spec.field), spec.field)
        why = unsupported_regex(spec.source) if spec.kind == "regex" else None
        if why is not None:  # xgrammar would compile it and let through text it does not match
            raise ValueError(f"{spec.field}: invalid regex for structured output: it has {why}")
        if spec.kind == "tagged_json":  # tool schemas: their unenforced keywords were always let through
            check_schema_shape(json.loads(spec.source)["schema"], spec.field)
        try:
            if spec.kind == "json":
                compiled = c.compile_grammar(json_schema_grammar(spec.source or json.dumps({"type": "object"})))
            elif spec.kind == "regex":
                compiled = c.compile_regex(pattern_without_surrogates(_dot_without_newline(spec.source)))
            elif spec.kind == "choice":
                compiled = c.compile_grammar(choice_grammar(json.loads(spec.source)))
            elif spec.kind == "tagged_json":
                compiled = c.compile_grammar(self._tagged_json(json.loads(spec.source)))
            else:
                compiled = c.compile_grammar(spec.source)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"{spec.field}: invalid {_NAMES[spec.kind]}: {_reason(e)}") from None
        # a grammar that allows no first token (not even the end: "root ::= root") would have the
        # sampler draw from a row of -inf
        allows, seconds = self._first_mask(compiled)
        if not allows:
            raise ValueError(f"{spec.field}: the {_NAMES[spec.kind]} accepts no output at all")
        if seconds > GRAMMAR_FILL_BUDGET_S:
            raise ValueError(
                f"{spec.field}: the {_NAMES[spec.kind]} takes {seconds * 1e3:.0f} ms to find the tokens allowed "
                f"at one step (at most {GRAMMAR_FILL_BUDGET_S * 1e3:.0f} ms); simplify it"
            )
        return compiled

    def _first_mask(self, compiled: Any) -> tuple[bool, float]:
        """Whether the grammar allows any first token, and how long its mask took."""
        import torch  # xgrammar fills torch tensors
        import xgrammar

        mask = torch.zeros((1, bitmask_words(self.mask_vocab_size)), dtype=torch.int32)
        matcher = xgrammar.GrammarMatcher(compiled)
        start = time.thread_time()  # CPU time: a busy host preempting this thread does not count
        matcher.fill_next_token_bitmask(mask)
        return bool(mask.any()), time.thread_time() - start

    @staticmethod
    def _tagged_json(source: dict) -> Any:
        from xgrammar import Grammar

        literal = lambda text: Grammar.from_ebnf(f"root ::= {json.dumps(text, ensure_ascii=False)}")  # noqa: E731
        schema = json_schema_grammar(json.dumps(source["schema"]))
        return Grammar.concat(literal(source["begin"]), schema, literal(source["end"]))


_NAMES = {"json": "JSON schema", "regex": "regex", "choice": "choice", "ebnf": "grammar", "tagged_json": "tool schema"}


def _reason(e: Exception) -> str:
    """xgrammar's message without its source location prefix."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", text)


class GrammarMatcher:
    """One request's position in its grammar."""

    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher

    def accept(self, token: int) -> bool:
        """Advance by a sampled token; False if the grammar does not allow it."""
        return bool(self._matcher.accept_token(int(token)))

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted."""
        return bool(self._matcher.is_terminated())


def bitmask_words(vocab_size: int) -> int:
    return -(-vocab_size // 32)


@dataclass(frozen=True)
class GrammarMasks:
    """The tokens each sampled row under a grammar may take next, for one step (it crosses
    Ray to the ranks, which apply it in ``sampler.py``). Rows in the same grammar state share
    one mask (a batch of one schema's requests mostly does), so the distinct masks travel once."""

    rows: np.ndarray  # [G] int64: indices among the step's sampled rows
    mask_of_row: np.ndarray  # [G] int64: each row's mask in ``bitmask``
    bitmask: np.ndarray  # [U, bitmask_words(vocab)] int32: bit t % 32 of word t // 32 set = token t allowed


def grammar_masks(rows: Sequence[tuple[int, GrammarMatcher]], vocab_size: int) -> GrammarMasks:
    """The masks of these (sampled row, its request's matcher) pairs, filled by xgrammar's
    threads in parallel (a row can take a few hundred microseconds inside a JSON string)."""
    import torch  # xgrammar fills torch tensors

    mask = torch.zeros((len(rows), bitmask_words(vocab_size)), dtype=torch.int32)
    if rows:
        _mask_filler().batch_fill_next_token_bitmask([m._matcher for _, m in rows], mask)
    filled = mask.numpy()
    first_with: dict[bytes, int] = {}
    mask_of_row = np.array([first_with.setdefault(r.tobytes(), len(first_with)) for r in filled], dtype=np.int64)
    distinct = np.zeros(len(first_with), dtype=np.int64)
    distinct[mask_of_row] = np.arange(len(filled))
    rows_ids = np.array([row for row, _ in rows], dtype=np.int64)
    return GrammarMasks(rows_ids, mask_of_row, np.ascontiguousarray(filled[distinct]))


GrammarRows = Sequence[tuple[int, GrammarMatcher]]  # (sampled row, its request's matcher) of one step


def fill_masks(rows: Sequence[GrammarRows | None], vocab_size: int) -> list[GrammarMasks | None]:
    """``grammar_masks`` of each DP replica's rows (None: that replica needs none)."""
    return [None if r is None else grammar_masks(r, vocab_size) for r in rows]


def slow_matchers(matchers: Iterable[GrammarMatcher], vocab_size: int) -> list[tuple[GrammarMatcher, float]]:
    """The matchers whose next mask alone takes over GRAMMAR_FILL_BUDGET_S of CPU time, with that
    time: after a step's masks outlasted GRAMMAR_STEP_BUDGET_S, which requests made it slow."""
    import torch  # xgrammar fills torch tensors

    mask = torch.zeros((1, bitmask_words(vocab_size)), dtype=torch.int32)
    slow = []
    for matcher in matchers:
        start = time.thread_time()
        matcher._matcher.fill_next_token_bitmask(mask)
        seconds = time.thread_time() - start
        if seconds > GRAMMAR_FILL_BUDGET_S:
            slow.append((matcher, seconds))
    return slow


@functools.cache
def _mask_filler() -> Any:
    import xgrammar

    return xgrammar.BatchGrammarMatcher(max_threads="auto")
