"""Incremental detokenization with stop strings, one instance per request.

Token ids arrive one at a time; ``add`` returns the text that may be streamed
to the client now. Two things hold text back:

1. Incomplete characters. Byte-level tokens can end in the middle of a UTF-8
   sequence. We decode a short window of recent tokens twice -- up to the last
   released token (``_read``) and up to the newest one -- and release the
   difference only once it does not end in U+FFFD. The window starts a few
   tokens back (``_prefix``) so decoders that treat the first token specially
   (leading-space handling) see context. Work per token is bounded by the
   window, not the output length: past ``_MAX_UNRELEASED`` tokens held, the text
   before the last three (no character's incomplete bytes span more) is released
   where it splits from them cleanly, so a run of invalid bytes (U+FFFD, final)
   does not grow the window.
2. Stop strings. Text that could still be the start of a stop string is held
   until it either completes one (the request stops; the text is cut right
   before the earliest occurrence and the stop string is never emitted) or
   diverges (then it is released). Text of the first ``min_tokens`` tokens stops nothing
   (vLLM's ``min_tokens``): only an occurrence that ends past them does.

Invariant: the concatenation of every ``add`` result plus ``flush()`` equals
``tokenizer.decode(output_ids)``, cut before the first stop-string occurrence
if there is one.
"""

from __future__ import annotations

from typing import Optional, Sequence

from raymoe.actors.engine.tokenizer import Tokenizer

_PROMPT_CONTEXT = 5  # prompt tokens kept as decoding context for the first output token
# tokens held for an incomplete character before the text ahead of the last 3 is released (a
# run of invalid bytes held them all, each token decoding the whole run again: 2,000 tokens of
# lone continuation bytes, which logit_bias can force, took 0.3 s, quadratic in the run)
_MAX_UNRELEASED = 8
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Streams one request's output text; see the module docstring."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        stop: tuple[str, ...] = (),
        skip_special_tokens: bool = True,
        min_tokens: int = 0,
    ) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty; remove empty strings from `stop`")
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._stop = tuple(stop)
        self._max_hold = max((len(s) for s in stop), default=1) - 1
        self._min_tokens = min_tokens
        self._num_tokens = 0  # output tokens taken so far
        context = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        if self._decode(context).endswith(_REPLACEMENT):
            context = []  # a prompt ending mid-character would garble the first output character
        self._window: list[int] = context  # token ids from the prefix offset on
        self._read = len(context)  # window index: tokens before it have been turned into text
        self._pending = ""  # decoded text not yet released (stop-string candidates)
        self._released: list[str] = []
        self.stopped = False
        self.stop_reason: Optional[str] = None  # the stop string that ended the request

    @property
    def text(self) -> str:
        """All text released so far."""
        return "".join(self._released)

    def add(self, token_id: int) -> str:
        """Take the next output token; return the newly releasable text ("" once stopped)."""
        if self.stopped:
            return ""
        self._num_tokens += 1
        if self._tok.decodes_to_nothing(int(token_id), self._skip):
            return ""  # no text, and joins none (a skipped special token): the window need not hold it
        self._window.append(int(token_id))
        prefix_text = self._decode(self._window[: self._read])
        full_text = self._decode(self._window)
        if len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT):
            return self._release_settled(prefix_text, full_text)  # a character may still be incomplete
        new_text = full_text[len(prefix_text) :]
        # Slide the window: the tokens just decoded become the next prefix.
        self._window = self._window[self._read :]
        self._read = len(self._window)
        return self._release(new_text, final=False)

    def _release_settled(self, prefix_text: str, full_text: str) -> str:
        """Past _MAX_UNRELEASED held tokens, the text of all but the last 3 when it is final: it
        and the last 3 tokens' text make the whole, and that text is not empty (its first byte
        ends whatever character the text before it left incomplete: a continuation byte would
        have joined it, so the two would not make the whole); else "". (Tokens that decode to
        nothing anywhere never enter the window: behind an incomplete character they passed
        this check and released its U+FFFD before the bytes that complete it came.)"""
        if len(self._window) - self._read <= _MAX_UNRELEASED:
            return ""
        cut = len(self._window) - 3
        settled, rest = self._decode(self._window[:cut]), self._decode(self._window[cut:])
        if not rest or len(settled) < len(prefix_text) or settled + rest != full_text:
            return ""
        # the tokens released become the next prefix; the last 3 stay held
        self._window, self._read = self._window[self._read :], cut - self._read
        return self._release(settled[len(prefix_text) :], final=False)

    def add_many(self, token_ids: list[int]) -> str:
        """``add`` each token in turn and join the results, with two decodes in all where
        the last token completes its character (the usual case) instead of two per token.
        The text is the same either way; with stop strings, callers that need the token at
        which one completed use ``add``."""
        if self.stopped or not token_ids:
            return ""
        if len(token_ids) == 1:
            return self.add(token_ids[0])
        self._num_tokens += len(token_ids)
        self._window.extend(int(t) for t in token_ids)
        prefix_text = self._decode(self._window[: self._read])
        full_text = self._decode(self._window)
        if len(full_text) > len(prefix_text) and not full_text.endswith(_REPLACEMENT):
            new_text = full_text[len(prefix_text) :]
            self._window = self._window[self._read :]
            self._read = len(self._window)
            return self._release(new_text, final=False)
        del self._window[-len(token_ids) :]  # an incomplete last character: one at a time
        self._num_tokens -= len(token_ids)
        return "".join(self.add(t) for t in token_ids)

    def flush(self) -> str:
        """At the end of a request that finished for another reason: release all held text.

        An incomplete trailing character is released as U+FFFD, as ``decode`` gives it.
        """
        if self.stopped:
            return ""
        prefix_text = self._decode(self._window[: self._read])
        new_text = self._decode(self._window)[len(prefix_text) :]
        self._window, self._read = [], 0
        return self._release(new_text, final=True)

    def _release(self, new_text: str, final: bool) -> str:
        text = self._pending + new_text
        # an occurrence must end in the new text: one inside the held text came in the first
        # min_tokens tokens' text (any other was found when it came)
        hit = self._earliest_stop(text, len(self._pending)) if self._num_tokens > self._min_tokens else None
        if hit is not None:
            cut, self.stop_reason = hit
            self.stopped = True
            out, self._pending = text[:cut], ""
        else:
            hold = 0 if final else self._partial_stop_len(text)
            out, self._pending = text[: len(text) - hold], text[len(text) - hold :]
        if out:
            self._released.append(out)
        return out

    def _earliest_stop(self, text: str, held: int) -> Optional[tuple[int, str]]:
        """(start, stop string) of the earliest stop-string occurrence in ``text`` that ends past
        its first ``held`` characters, if any.

        Only ``text`` (held + new) needs searching: released text was never a
        prefix of a stop string, so no occurrence can start inside it.
        """
        best: Optional[tuple[int, str]] = None
        for s in self._stop:
            i = text.find(s, max(0, held - len(s) + 1))
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        return best

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        for n in range(min(self._max_hold, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip) if ids else ""
