"""Whether a user's JSON schema is one at all: checked by the ``jsonschema`` library against the
metaschema of the draft its ``$schema`` names, as ``check_schema`` does it, formats left out (the
format checks jsonschema runs depend on optional packages installed on the host, and its "regex"
check runs Python's ``re``, which refuses JSON Schema's ECMA-262 dialect). A schema that names no
draft (or one jsonschema does not know) passes if the metaschema of any draft from 6 on takes it:
clients send draft-07 schemas (tuple ``items``, ``definitions``) without saying so. (Draft 4, whose
metaschema does not know ``$ref``, would take ``{"$ref": 3}``.) xgrammar takes invalid schemas
without a word and makes up a meaning for them (``{"type": []}`` and ``{"allOf": []}`` became
"any value"); every draft refuses those.

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
    """None when ``schema`` is valid against its draft's metaschema (any draft's, where it names
    none jsonschema knows), else "<draft> at <JSON path>: <reason>", jsonschema's own words for the
    named draft or Draft 2020-12 (cut short: they quote values, which may be huge)."""
    import jsonschema

    declared = schema.get("$schema") if isinstance(schema, dict) else None
    named = jsonschema.validators.validator_for(schema, default=None) if isinstance(declared, str) else None
    drafts = [named] if named is not None else _drafts()
    first = None
    for validator in drafts:
        try:
            validator.check_schema(schema, format_checker=None)
            return None
        except jsonschema.SchemaError as e:
            draft = validator.__name__.removesuffix("Validator")
            first = first or f"{draft} at {_cut(e.json_path)}: {_cut(e.message)}"
        except RecursionError:
            return "the schema nests too deep to check"
    return first


def _drafts() -> list[Any]:
    import jsonschema

    return [
        jsonschema.Draft202012Validator,
        jsonschema.Draft201909Validator,
        jsonschema.Draft7Validator,
        jsonschema.Draft6Validator,
    ]


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
