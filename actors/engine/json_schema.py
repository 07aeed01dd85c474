"""JSON schemas for structured output: walking their subschemas, the keywords xgrammar
(0.2.9) compiles without enforcing or into invalid JSON (refused by name, as the output would
not match), and the grammar of a schema with its strings held to JSON's characters in valid
UTF-8."""

from __future__ import annotations

import itertools
import json
from typing import Any, Callable, Iterator

from raymoe.actors.engine.regex_scan import escaped_code, has_lookaround, regex_atoms, unsupported_regex

# JSON schema keywords xgrammar (0.2.9) compiles without enforcing them (or, `contains`, while
# refusing valid arrays), found by compiling a schema with each and testing an instance that
# breaks it: a request using them would get output its schema rejects.
_UNENFORCED = (
    "not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies", "contains", "minContains",
    "maxContains", "$dynamicRef", "$recursiveRef",
)  # fmt: skip
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMAS = (
    "additionalProperties", "items", "contains", "not", "if", "then", "else", "propertyNames", "additionalItems",
    "unevaluatedProperties", "unevaluatedItems",
)  # fmt: skip
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")  # items: a schema, or a list of them

# constraints a node's $ref or combinator drops, and those that need a type to be enforced
_CONSTRAINTS = frozenset(
    {
        "type", "enum", "const", "properties", "required", "additionalProperties", "patternProperties",
        "items", "prefixItems", "minItems", "maxItems", "minimum", "maximum", "exclusiveMinimum",
        "exclusiveMaximum", "multipleOf", "minLength", "maxLength", "pattern", "format", "minProperties",
        "maxProperties",
    }
)  # fmt: skip
_TYPED = frozenset(
    {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength", "maxLength",
     "pattern", "format", "minItems", "maxItems", "minProperties", "maxProperties"}
)  # fmt: skip
_COMBINATORS = frozenset({"$ref", "anyOf", "oneOf", "allOf"})
# past this many integers between its bounds xgrammar drops a multipleOf
MULTIPLE_OF_MAX_RANGE = 10_000
# formats of JSON schema that xgrammar compiles as any string
_UNENFORCED_FORMATS = frozenset({"idn-email", "idn-hostname", "iri", "iri-reference", "regex"})
# formats whose grammar takes no empty string: a minLength of 1 beside them holds (pydantic's AnyUrl)
_NONEMPTY_FORMATS = frozenset(
    {"uri", "email", "hostname", "ipv4", "ipv6", "date", "time", "date-time", "duration", "uuid",
     "relative-json-pointer"}
)  # fmt: skip


MAX_SCHEMA_DEPTH = 64  # subschemas within subschemas (OpenAI's strict mode allows 10)


def _subschemas(schema: Any) -> Iterator[tuple[dict, int, str]]:
    """Every schema object in ``schema`` (itself included) with its depth and the keyword it
    sits under ("" for the root), walked without recursion (a hostile schema may nest
    thousands deep)."""
    stack = [(schema, 1, "")]
    while stack:
        node, depth, under = stack.pop()
        if not isinstance(node, dict):
            continue
        yield node, depth, under
        for key in _SUBSCHEMA_MAPS:
            if isinstance(node.get(key), dict):
                stack.extend((sub, depth + 1, key) for sub in node[key].values())
        for key in _SUBSCHEMAS:
            stack.append((node.get(key), depth + 1, key))
        for key in _SUBSCHEMA_LISTS:
            if isinstance(node.get(key), list):
                stack.extend((sub, depth + 1, key) for sub in node[key])


def rebuild_schema(schema: Any, node_fn: Callable[[dict], dict]) -> Any:
    """A copy of ``schema`` with ``node_fn`` applied to each schema object in it, children
    first, at the positions _subschemas walks (not inside values such as ``const`` or
    ``enum``). Recursive: the caller bounds the depth."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: rebuild_schema(sub, node_fn) for name, sub in out[key].items()}
    for key in _SUBSCHEMAS:
        if isinstance(out.get(key), dict):
            out[key] = rebuild_schema(out[key], node_fn)
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [rebuild_schema(sub, node_fn) for sub in out[key]]
    return node_fn(out)


def count_subschemas(schema: Any, limit: int) -> int:
    """The schema objects in ``schema`` (itself included), counted up to ``limit`` + 1."""
    return sum(1 for _ in itertools.islice(_subschemas(schema), limit + 1))


def unenforced_keywords(schema: Any) -> list[str]:
    """The keywords of a JSON schema (its subschemas included) that compile but are not
    enforced, or that let invalid JSON through, sorted; property names are names, not keywords."""
    found: set[str] = set()
    for node, _, under in _subschemas(schema):
        found.update(k for k in _UNENFORCED if k in node)
        found.update(_unenforced_in(node, names_only=under == "propertyNames"))
    return sorted(found)


def _unenforced_in(node: dict, *, names_only: bool) -> Iterator[str]:
    """unenforced_keywords of one schema object, its subschemas aside; ``names_only``: it is a
    propertyNames schema, whose instances are strings."""
    if node.get("uniqueItems") is True:
        yield "uniqueItems"
    ref = node.get("$ref")
    if isinstance(ref, str) and ref != "#" and not ref.startswith("#/"):
        yield "$ref (to another document or an $anchor)"
    if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:
        yield "allOf (of more than one schema)"
    constraints = _CONSTRAINTS.intersection(node)
    # a $ref or a combinator takes the node's place: its other constraints are dropped
    for combinator in sorted(_COMBINATORS.intersection(node)):
        if constraints:
            yield f"{combinator} (beside {', '.join(sorted(constraints))})"
    values = [node["const"]] if "const" in node else node["enum"] if isinstance(node.get("enum"), list) else None
    if values is not None:  # a const or an enum is written as its values alone
        if constraints - {"type", "enum", "const"}:
            yield "enum/const (beside other constraints)"
        types = node.get("type")
        allowed = {types} if isinstance(types, str) else _strings(types) if isinstance(types, list) else None
        if allowed is not None and not all(_json_types(v) & allowed for v in values):
            yield "enum/const (with values its type excludes)"
    elif "type" not in node and not names_only and not _COMBINATORS.intersection(node):
        untyped = sorted(_TYPED.intersection(node))
        if untyped:
            yield f"{', '.join(untyped)} (without a type)"
    properties = node.get("properties")
    names = properties if isinstance(properties, dict) else {}
    required = _strings(node.get("required")) if isinstance(node.get("required"), list) else set()
    if any(name not in names for name in required):
        yield "required (of a name not in properties)"
    if "multipleOf" in node and not _whole_multiple(node):
        yield "multipleOf (but of integers, with both bounds or none)"
    if ("minLength" in node or "maxLength" in node) and ("pattern" in node or "format" in node):
        nonempty = "pattern" not in node and "maxLength" not in node and str(node.get("format")) in _NONEMPTY_FORMATS
        if not (nonempty and _number(node.get("minLength"), default=2) <= 1):
            yield "minLength/maxLength (with a pattern or format)"
    if isinstance(node.get("format"), str) and node["format"] in _UNENFORCED_FORMATS:
        yield f"format {node['format']}"
    # xgrammar's strict mode closes an object without additionalProperties to its properties
    other_names = node.get("additionalProperties", False) is not False or "patternProperties" in node
    fixed = sum(name in names for name in required)
    if other_names and _number(node.get("minProperties"), default=0) > max(1, fixed):
        # past the required names it counts other names, and the grammar lets a name repeat
        yield "minProperties (past the required names, where other names are allowed: a name may repeat)"
    if "propertyNames" in node and (
        {"properties", "patternProperties"}.intersection(node) or node.get("additionalProperties") is False
    ):
        yield "propertyNames (beside properties, patternProperties or additionalProperties false)"
    pattern_names = node.get("patternProperties")
    # a name in properties that a pattern matches is held to the properties' schema alone; the
    # user's regexes are not run here to find out (a hostile one backtracks for hours)
    if isinstance(pattern_names, dict) and pattern_names and names:
        yield "patternProperties (beside properties)"
    patterns = [node.get("pattern"), *(pattern_names if isinstance(pattern_names, dict) else ())]
    patterns = [p for p in patterns if isinstance(p, str)]
    # xgrammar compiles a pattern's lookaround as if it were not there (a regex grammar refuses it)
    if any(has_lookaround(p) for p in patterns):
        yield "pattern (with a lookahead or lookbehind)"
    unsupported = next(filter(None, map(unsupported_regex, patterns)), None)
    if unsupported is not None:
        yield f"pattern (with {unsupported})"
    # ... and writes a quote, backslash or control character a pattern names as is: invalid JSON
    if any(_names_raw_json_char(p) for p in patterns):
        yield "pattern (naming a quote, backslash or control character)"


def without_raw_char_patterns(node: dict) -> dict:
    """A schema object without the patterns that name a character xgrammar would write raw in
    a JSON string (see _names_raw_json_char): for rebuild_schema, where the output must parse
    more than it must match (a tool's non-strict parameters)."""
    out = {k: v for k, v in node.items() if not (k == "pattern" and isinstance(v, str) and _names_raw_json_char(v))}
    if isinstance(out.get("patternProperties"), dict):
        out["patternProperties"] = {p: v for p, v in out["patternProperties"].items() if not _names_raw_json_char(p)}
    return out


def _strings(values: list) -> set[str]:
    """The strings among a schema's list values (a hostile one may hold anything)."""
    return {v for v in values if isinstance(v, str)}


def _json_types(value: Any) -> set[str]:
    if isinstance(value, bool):
        return {"boolean"}
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return {"integer", "number"}
    return {float: {"number"}, str: {"string"}, type(None): {"null"}, list: {"array"}, dict: {"object"}}.get(
        type(value), set()
    )


def _whole_multiple(node: dict) -> bool:
    """A multipleOf xgrammar enforces: a whole number on integers (1: any), unbounded, or
    bounded on both sides with at most MULTIPLE_OF_MAX_RANGE integers between."""
    step, types = node["multipleOf"], node.get("type")
    types = [types] if isinstance(types, str) else types if isinstance(types, list) else []
    if not ("integer" in types and "number" not in types and type(step) is int and step > 0):
        return False
    low = _number(node.get("minimum"), node.get("exclusiveMinimum"))
    high = _number(node.get("maximum"), node.get("exclusiveMaximum"))
    if step == 1 or (low is None and high is None):
        return True
    return low is not None and high is not None and high - low < MULTIPLE_OF_MAX_RANGE


def _number(*values: Any, default: Any = None) -> Any:
    """The first of ``values`` that is a number (not a bool), else ``default``."""
    return next((v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)), default)


def _names_raw_json_char(pattern: str) -> bool:
    """Whether the regex names a character xgrammar writes raw where a JSON string holds it only
    escaped: a backslash or U+0000-U+001F outside a negated class, a quote outside any class (a
    class drops it)."""
    for at, atom, in_class, negated in regex_atoms(pattern):
        code = (
            escaped_code(pattern, at, in_class)
            if atom[0] == "\\"
            else ord(atom)
            if atom == '"' or ord(atom) < 0x20
            else None
        )
        if code is not None and not (in_class and (negated or code == 0x22)) and (code < 0x20 or code in (0x22, 0x5C)):
            return True
    return False


# xgrammar's (0.2.9) string characters in its grammar text, and what they become: a string
# with minLength/maxLength counts characters that include U+0000-U+001F, which a JSON string
# cannot hold raw (invalid JSON); both kinds take UTF-16 surrogates (U+D800-U+DFFF), whose
# UTF-8 bytes are no valid UTF-8 (they decode to U+FFFD each, past a maxLength).
_STRING_CHARS = {
    r"[^\"\\\r\n]": r"[^\0-\x1f\"\\\uD800-\uDFFF]",  # length-bounded
    r"[^\0-\x1f\"\\\r\n]": r"[^\0-\x1f\"\\\uD800-\uDFFF]",  # any length
}


# a pattern's classes that take UTF-16 surrogates, as classes that do not (outside other classes)
_NO_SURROGATES = r"\uD800-\uDFFF"
_PATTERN_CLASSES = {
    ".": rf"[^\n\r\u2028\u2029{_NO_SURROGATES}]",  # ECMA-262's "." (xgrammar's takes U+2028/9 too)
    r"\D": rf"[^0-9{_NO_SURROGATES}]",
    r"\S": rf"[^\s{_NO_SURROGATES}]",
    r"\W": rf"[^\w{_NO_SURROGATES}]",
}


# the same inside a class that is not negated, as ranges: from U+0020 and without the backslash,
# which xgrammar leaves out of its own \\S, \\D and \\W in a JSON string (named, it writes them raw)
_IN_CLASS = {
    r"\S": r"\u0021-\u005B\u005D-\u009F\u00A1-\u167F\u1681-\u1FFF\u200B-\u2027\u202A-\u202E\u2030-\u205E"
    r"\u2060-\u2FFF\u3001-\uD7FF\uE000-\uFEFE\uFF00-\u{10FFFF}",
    r"\D": r"\u0020-\u002F\u003A-\u005B\u005D-\uD7FF\uE000-\u{10FFFF}",
    r"\W": r"\u0020-\u002F\u003A-\u0040\u005B\u005D\u005E\u0060\u007B-\uD7FF\uE000-\u{10FFFF}",
}


def pattern_without_surrogates(pattern: str) -> str:
    """``pattern`` with its ".", \\D, \\S, \\W and negated classes held off UTF-16 surrogates,
    whose UTF-8 bytes xgrammar writes but which are no valid UTF-8 (a range over them, as in
    "[\\u0080-\\uFFFF]", still takes them)."""
    out = []
    for at, atom, in_class, negated in regex_atoms(pattern):
        if in_class and negated and pattern[at - 1 : at + 1] == "[^":
            out.append("^" + _NO_SURROGATES)  # first in the class: a "-" ending it stays a "-"
        elif in_class:
            out.append(atom if negated else _IN_CLASS.get(atom, atom))
        else:
            out.append(_PATTERN_CLASSES.get(atom, atom))
    return "".join(out)


def _patterns_without_surrogates(node: dict) -> dict:
    out = dict(node)
    if isinstance(out.get("pattern"), str):
        out["pattern"] = pattern_without_surrogates(out["pattern"])
    if isinstance(out.get("patternProperties"), dict):
        out["patternProperties"] = {pattern_without_surrogates(p): v for p, v in out["patternProperties"].items()}
    return out


def json_schema_grammar(schema: str) -> Any:
    """xgrammar's grammar of a JSON schema without free whitespace (a model cannot pad its
    output with spaces forever), its strings held to JSON's characters in valid UTF-8.
    Recursive where the schema has patterns: the caller bounds its depth."""
    from xgrammar import Grammar

    if '"pattern' in schema:
        schema = json.dumps(rebuild_schema(json.loads(schema), _patterns_without_surrogates))
    grammar = Grammar.from_json_schema(schema, any_whitespace=False)
    text = original = str(grammar)
    for chars, json_chars in _STRING_CHARS.items():
        text = text.replace(chars, json_chars)
    return Grammar.from_ebnf(text) if text != original else grammar


def check_schema_shape(schema: Any, field: str) -> None:
    """ValueError naming ``field`` when the schema nests past MAX_SCHEMA_DEPTH (xgrammar
    compiles deep schemas for minutes), or holds an empty ``anyOf`` or ``oneOf``: no value
    matches one (JSON Schema requires them non-empty), and xgrammar writes nothing in its place
    ('{"a": }', invalid JSON)."""
    nodes = list(_subschemas(schema))
    if max((depth for _, depth, _ in nodes), default=0) > MAX_SCHEMA_DEPTH:
        raise ValueError(f"{field}: the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
    for node, _, _ in nodes:
        empty = next((k for k in ("anyOf", "oneOf") if node.get(k) == []), None)
        if empty is not None:
            raise ValueError(f"{field}: invalid JSON schema: {empty} must hold at least one schema (got [])")


def check_schema(schema: Any, field: str) -> None:
    """check_schema_shape, and ValueError naming ``field`` when the schema uses keywords
    structured output does not enforce."""
    check_schema_shape(schema, field)
    unenforced = unenforced_keywords(schema)
    if unenforced:
        raise ValueError(
            f"{field}: the schema uses JSON schema keywords that structured output does not enforce: "
            f"{', '.join(unenforced)}; describe the output without them"
        )
