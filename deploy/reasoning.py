"""A chat answer's reasoning (``<think>...</think>``) apart from its content, as text streams in.

``qwen3``: the model opens the block itself (``<think>`` at the start of its answer); an
answer that does not start with it is all content (thinking off: the template closed an
empty block in the prompt). ``deepseek_r1``: the template opened the block in the prompt,
so the answer starts in reasoning (an ``<think>`` it repeats is dropped). Text after
``</think>`` is content, its leading newlines dropped. An answer cut off inside the block is
all reasoning.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"
REASONING_PARSERS = ("qwen3", "deepseek_r1")


class ReasoningSplitter:
    """``feed`` each text delta, then ``flush`` once: (reasoning, content) pieces; text that
    may be the start of a tag is held back until the next delta decides it."""

    def __init__(self, parser: str) -> None:
        if parser not in REASONING_PARSERS:
            raise ValueError(f"serve.reasoning_parser: one of {REASONING_PARSERS}, got {parser!r}")
        self._state = "reasoning" if parser == "deepseek_r1" else "start"
        self._may_open = True  # an opening tag may still come first
        self._after_close = False  # content right after the closing tag: drop its leading newlines
        self._held = ""

    def feed(self, text: str) -> tuple[str, str]:
        buf, self._held = self._held + text, ""
        reasoning, content = "", ""
        while buf:
            if self._may_open:
                if OPEN.startswith(buf):
                    self._held = buf  # "<thi": wait for more
                    return reasoning, content
                self._may_open = False
                if buf.startswith(OPEN):
                    buf, self._state = buf[len(OPEN) :], "reasoning"
                    continue
                if self._state == "start":
                    self._state = "content"
            if self._state == "reasoning":
                end = buf.find(CLOSE)
                if end >= 0:
                    reasoning += buf[:end]
                    buf, self._state, self._after_close = buf[end + len(CLOSE) :], "content", True
                    continue
                keep = _partial_suffix(buf, CLOSE)
                reasoning += buf[: len(buf) - keep]
                self._held = buf[len(buf) - keep :]
                return reasoning, content
            if self._after_close:
                buf = buf.lstrip("\n")
                if not buf:
                    return reasoning, content
                self._after_close = False
            content += buf
            buf = ""
        return reasoning, content

    def flush(self) -> tuple[str, str]:
        """What was held back, at the end of the answer."""
        held, self._held = self._held, ""
        if self._state == "reasoning":
            return held, ""
        return "", held

    @staticmethod
    def split(parser: str, text: str) -> tuple[str, str]:
        """A whole answer: (reasoning, content)."""
        splitter = ReasoningSplitter(parser)
        r1, c1 = splitter.feed(text)
        r2, c2 = splitter.flush()
        return r1 + r2, c1 + c2


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that begins ``tag`` (a tag cut between deltas)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
