"""Whether a user's JSON schema is one at all: checked by the ``jsonschema`` library against the
metaschema of the draft its ``$schema`` names (Draft 2020-12 where it names none or one
jsonschema does not know), as ``check_schema`` does it, formats included but "regex" (see
``_formats_but_regex``). xgrammar takes invalid schemas without a word and makes up a meaning for them
(``{"type": []}`` and ``{"allOf": []}`` became "any value").

The check is pure Python and slow (about 10 ms a kilobyte of schema): ``MetaschemaCache``
remembers its answers by the schema's text (clients send the same schemas request after
request), and the ingress runs the ones it does not know in a worker thread."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any, Optional

CACHE_SIZE = 256  # answers kept, each under the text of a schema of at most CACHED_CHARS
CACHED_CHARS = 64 * 1024
# of schema text one request may have checked (about 10 s of CPU on a slow host; a tool's
# schemas all reach the prompt, which the context bounds, unless tool_choice is "none")
MAX_CHECKED_CHARS = 1024 * 1024
_SHOWN_CHARS = 200  # of jsonschema's reason and of the path, which quote the schema's values


def metaschema_error(schema: Any) -> Optional[str]:
    """None when ``schema`` is valid against its draft's metaschema, else "<draft> at <JSON path>:
    <reason>", jsonschema's own words (cut short: they quote values, which may be huge)."""
    import jsonschema

    # an unknown $schema is checked as Draft 2020-12, as jsonschema does where it is told a
    # default; so is one that is not even a string (which that metaschema refuses)
    declared = schema if isinstance(schema, dict) and isinstance(schema.get("$schema"), str) else {}
    validator = jsonschema.validators.validator_for(declared, default=jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema, format_checker=_formats_but_regex(validator))
    except jsonschema.SchemaError as e:
        draft = validator.__name__.removesuffix("Validator")
        return f"{draft} at {_cut(e.json_path)}: {_cut(e.message)}"
    except RecursionError:
        return "the schema nests too deep to check"
    return None


def _formats_but_regex(validator: Any) -> Any:
    """The draft's format checker without "regex": jsonschema runs a ``pattern`` through
    Python's ``re``, which refuses ECMA-262 (JSON Schema's dialect: ``[^]``, ``\\cJ``,
    ``(?<name>...)``); xgrammar's own parser refuses a bad one when the grammar compiles."""
    import jsonschema

    checker = jsonschema.FormatChecker(formats=())
    checker.checkers = {k: v for k, v in validator.FORMAT_CHECKER.checkers.items() if k != "regex"}
    return checker


def _cut(text: str) -> str:
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."


class MetaschemaCache:
    """``metaschema_error`` of schemas given as JSON text, the last CACHE_SIZE answers
    remembered by text (thread-safe: the ingress checks in worker threads)."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self._size = size
        self._answers: OrderedDict[str, Optional[str]] = OrderedDict()
        self._lock = threading.Lock()

    def knows(self, text: str) -> bool:
        """Whether ``error(text)`` answers at once."""
        with self._lock:
            return text in self._answers

    def error(self, text: str) -> Optional[str]:
        """``metaschema_error`` of the schema ``text`` holds; None too when it is not JSON (the
        grammar's compile then says so)."""
        with self._lock:
            if text in self._answers:
                self._answers.move_to_end(text)
                return self._answers[text]
        try:
            answer = metaschema_error(json.loads(text))
        except RecursionError:
            answer = "the schema nests too deep to check"
        except ValueError:
            answer = None
        if len(text) <= CACHED_CHARS:
            with self._lock:
                self._answers[text] = answer
                while len(self._answers) > self._size:
                    self._answers.popitem(last=False)
        return answer

    def check(self, schemas: list[tuple[str, Any]]) -> None:
        """ValueError "<field>: invalid JSON schema (<draft> at <path>: <reason>)" for the first of
        these (field, schema or its JSON text) pairs whose schema is not valid against its
        metaschema, or naming the field past MAX_CHECKED_CHARS of schema text in all."""
        total = 0
        for field, schema in schemas:
            text = schema if isinstance(schema, str) else json.dumps(schema)
            total += len(text)
            if total > MAX_CHECKED_CHARS:
                raise ValueError(
                    f"{field}: the request's JSON schemas hold over {MAX_CHECKED_CHARS} characters in all; "
                    "send fewer or smaller ones"
                )
            error = self.error(text)
            if error is not None:
                raise ValueError(f"{field}: invalid JSON schema ({error})")
