"""Tool calls in a chat model's output: parsers by name (``serve.tool_parser``), each
splitting the generated text into content and calls, whole or as it streams, and saying
how a call is written (so ``tool_choice`` "required" or a named function can force one
through a grammar, whose arguments then always parse).

Registered: ``hermes``, the format of Qwen2.5, Qwen3 and Hermes models: each call is
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from raymoe.actors.engine.grammar import GrammarSpec
from raymoe.actors.engine.json_schema import rebuild_schema, without_raw_char_patterns


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of the arguments object
    id: str

    def to_openai(self, index: Optional[int] = None) -> dict[str, Any]:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


class HermesToolParser:
    begin, end = "<tool_call>", "</tool_call>"

    def call_from(self, body: str) -> Optional[ToolCall]:
        """The call written between the tags; None when it is not one (left as content)."""
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError):  # the model's text: any of it, nested any depth
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except (ValueError, RecursionError):
                return None
        if not isinstance(args, dict):
            return None
        return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False), f"call_{uuid.uuid4().hex[:24]}")

    def forced_call(self, tools: Sequence[dict], name: Optional[str]) -> GrammarSpec:
        """A grammar for exactly one call: of function ``name``, or of any of ``tools``."""
        options = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
        defs: dict = {}
        schemas = [
            {
                "type": "object",
                "properties": {"name": {"const": f["name"]}, "arguments": _arguments_schema(f, i, defs)},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for i, f in enumerate(options)
        ]
        schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
        if defs:
            schema = {**schema, "$defs": defs}
        source = json.dumps({"begin": self.begin + "\n", "schema": schema, "end": "\n" + self.end})
        return GrammarSpec("tagged_json", source, "tools")  # what a refused schema came from


def _arguments_schema(function: dict, index: int, defs: dict) -> dict:
    """A tool's parameters as the arguments of a call inside the call's schema, whose root is
    not the tool's: a tool with local ``$ref``s ("#", "#/$defs/...", as pydantic writes nested
    models) goes into ``defs`` under a name of its own, its ``$defs`` and ``definitions`` beside
    it, and its refs are rewritten to point there. Patterns naming a character the grammar would
    write raw are dropped: a non-strict tool's arguments must parse more than they must match
    (a strict tool's are refused before)."""
    parameters = function.get("parameters") or {"type": "object"}
    own = f"tool{index}"
    sections = {"#/$defs/": f"#/$defs/{own}_defs_", "#/definitions/": f"#/$defs/{own}_definitions_"}

    def moved(node: dict) -> dict:
        ref = node.get("$ref")
        if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):  # "#name" (an $anchor) stays
            prefix = next((p for p in sections if ref.startswith(p)), None)
            node["$ref"] = sections[prefix] + ref[len(prefix) :] if prefix else f"#/$defs/{own}{ref[1:]}"
        return node

    try:
        text = json.dumps(parameters)
        if '"pattern' in text:
            parameters = rebuild_schema(parameters, without_raw_char_patterns)
        if '"$ref"' not in text:
            return parameters
        for section in ("$defs", "definitions"):
            subschemas = parameters.get(section)
            for key, sub in subschemas.items() if isinstance(subschemas, dict) else ():
                defs[f"{own}_{section.lstrip('$')}_{key}"] = rebuild_schema(sub, moved)
        root = {k: v for k, v in parameters.items() if k not in ("$defs", "definitions")}
        defs[own] = rebuild_schema(root, moved)
    except RecursionError:
        raise ValueError(f"tools: the parameters of {function['name']!r} nest too deep") from None
    return {"$ref": f"#/$defs/{own}"}


PARSERS = {"hermes": HermesToolParser}


def tool_parser(name: str) -> HermesToolParser:
    if name not in PARSERS:
        raise ValueError(f"serve.tool_parser: unknown parser {name!r}; known: {sorted(PARSERS)}")
    return PARSERS[name]()


def split_tool_calls(
    parser: HermesToolParser, text: str, max_calls: Optional[int] = None
) -> tuple[Optional[str], list[ToolCall]]:
    """A whole output -> (content, or None when only calls remain; the calls in order, at most
    ``max_calls``)."""
    stream = ToolCallStream(parser, max_calls)
    content, calls = stream.add(text)
    if not calls:
        return text, []
    rest, more = stream.finish()
    content = (content + rest).strip()
    calls += more
    return (content or None) if calls else content, calls


class ToolCallStream:
    """One choice's text as it streams: content to send now, and the calls completed so far.
    Text that may open a call is held back until it does or cannot. Past ``max_calls`` calls
    (1 for a request with ``parallel_tool_calls: false``, as OpenAI promises it) further calls
    are dropped, neither calls nor content."""

    def __init__(self, parser: HermesToolParser, max_calls: Optional[int] = None) -> None:
        self.parser = parser
        self.max_calls = max_calls
        self._buffer = ""
        self._in_call = False
        self._scan = _JsonScan()  # the open call's text read so far
        self.num_calls = 0

    def add(self, text: str) -> tuple[str, list[ToolCall]]:
        # inside a call, only the new text (and a tag it may complete) is searched again
        search_from = max(0, len(self._buffer) - len(self.parser.end) + 1) if self._in_call else 0
        self._buffer += text
        content, calls = "", []
        p = self.parser
        while True:
            if self._in_call:
                end = self._buffer.find(p.end, search_from)
                while end >= 0 and self._scan.in_string_at(self._buffer, end):  # the tag is text inside the call
                    end = self._buffer.find(p.end, end + 1)
                if end < 0:
                    break
                body, self._buffer, self._in_call = self._buffer[:end], self._buffer[end + len(p.end) :], False
                call = p.call_from(body)
                if call is None:
                    content += p.begin + body + p.end
                elif self.max_calls is None or self.num_calls + len(calls) < self.max_calls:
                    calls.append(call)
                continue
            start = self._buffer.find(p.begin)
            if start >= 0:
                content += self._buffer[:start]
                self._buffer, self._in_call, search_from = self._buffer[start + len(p.begin) :], True, 0
                self._scan = _JsonScan()
                continue
            keep = _partial_suffix(self._buffer, p.begin)
            content += self._buffer[: len(self._buffer) - keep]
            self._buffer = self._buffer[len(self._buffer) - keep :]
            break
        self.num_calls += len(calls)
        return content, calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The output ended: what was held back is content (an unclosed call included)."""
        rest = (self.parser.begin if self._in_call else "") + self._buffer
        self._buffer, self._in_call = "", False
        return rest, []


class _JsonScan:
    """Whether a call's text up to an end tag is inside a string of the JSON object it starts
    with: the tag is then part of its arguments. Outside a string the tag ends the call, whether
    the object closed or not (a model that left a bracket open). The text is read on from where
    the last tag was, each character once (read from its start at every tag, 8,000 end tags in
    an argument held the event loop 11 s)."""

    def __init__(self) -> None:
        self.pos, self.depth, self.in_string, self.escaped = 0, 0, False, False
        self.opened: Optional[bool] = None  # whether its first character but spaces is "{" (None: none yet)
        self.closed = False  # the object closed before the text read so far ended

    def in_string_at(self, text: str, end: int) -> bool:
        """For ``text[:end]``, ``end`` at or past the last call's (``text`` only grows meanwhile)."""
        assert end >= self.pos, "a call's text is read forwards"
        if self.opened is not False and not self.closed:
            self._read(text[self.pos : end])
        self.pos = end
        return bool(self.opened) and not self.closed and self.in_string

    def _read(self, chars: str) -> None:
        for c in chars:
            if self.opened is None:
                if c.isspace():
                    continue
                self.opened = c == "{"
                if not self.opened:
                    break
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:  # the object closed before the tag
                    self.closed = True
                    break


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that begins ``tag``."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
