"""A structured-output regex read atom by atom (ECMA-262, as JSON Schema writes them): its
characters, escapes and classes, the character codes escapes name, lookarounds, and what of it
xgrammar parses without implementing (anchors it would drop where they matter, escapes it
reads otherwise)."""

from __future__ import annotations

import re
from typing import Iterator

# a regex escape's character code: the ones a JSON string cannot hold raw
ESCAPED_CODES = {
    "n": 0x0A,
    "r": 0x0D,
    "t": 0x09,
    "f": 0x0C,
    "v": 0x0B,
    "a": 0x07,
    "e": 0x1B,
    "0": 0x00,
    "\\": 0x5C,
    '"': 0x22,
}


def regex_atoms(pattern: str) -> Iterator[tuple[int, str, bool, bool]]:
    """The regex's characters and escapes (a backslash and the character after it), each with
    where it starts, whether it is inside a character class and whether that class is negated.
    Classes are ECMA-262's, as JSON Schema's: "[]" is empty, a "]" always ends one."""
    i, in_class, negated = 0, False, False
    while i < len(pattern):
        atom = pattern[i : i + 2] if pattern[i] == "\\" else pattern[i]
        yield i, atom, in_class, negated
        if in_class:
            in_class = atom != "]"
        elif atom == "[":
            in_class, negated = True, pattern.startswith("^", i + 1)
        i += len(atom)


def escaped_code(pattern: str, at: int, in_class: bool) -> int | None:
    """The character code of the regex escape at ``at`` where it names one (``\\n``, ``\\x1f``,
    ``\\u0022``, ``\\u{5c}``, ``\\cJ``, ``\\\\``; ``\\b`` in a class), else None."""
    escape = pattern[at + 1 : at + 2]
    if escape == "b" and in_class:
        return 0x08
    if escape in ("x", "u"):
        digits = re.match(r"\{([0-9a-fA-F]{1,6})\}|([0-9a-fA-F]{2,4})", pattern[at + 2 :])
        if not digits:
            return None
        return int(digits.group(1) or digits.group(2)[: 2 if escape == "x" else 4], 16)
    if escape == "c":
        return 0x01  # a control character, whichever letter
    return ESCAPED_CODES.get(escape)


def has_lookaround(pattern: str) -> bool:
    """Whether the regex has a group (?=, (?!, (?<= or (?<!, outside escapes and
    character classes (``\\(?=`` is an optional "(" then "=")."""
    lookarounds = ("?=", "?!", "?<=", "?<!")
    return any(
        atom == "(" and not in_class and pattern.startswith(lookarounds, at + 1)
        for at, atom, in_class, _ in regex_atoms(pattern)
    )


# Python's and PCRE's anchors, which xgrammar reads as the letters (ECMA-262's identity escapes)
_LETTER_ANCHORS = frozenset({"\\A", "\\Z", "\\z", "\\G"})


def unsupported_regex(pattern: str) -> str | None:
    """What of the regex xgrammar (0.2.9) parses without implementing it, named, or None: an
    anchor ^ or $ that could be met past the start or before the end of the whole match (see
    _anchors_redundant: "^a|^b", "(?:^|\\s)x" and "(^a)?b" are taken; xgrammar drops every anchor,
    so "a$^b", which matches nothing, took "ab", and "(^a)+" took "aa"), PCRE's hex escape in
    braces (xgrammar reads \\x{41} as ECMA-262's legacy "x" 41 times, and "[^\\x00-\\x{10FFFF}]"
    took "\u0106"), an octal escape (\\012 is NUL then "12" to it) or \\A, \\Z, \\z, \\G (read
    as letters)."""
    atoms = [(at, atom) for at, atom, in_class, _ in regex_atoms(pattern) if not in_class or atom[0] == "\\"]
    for at, atom in atoms:
        if atom == "\\x" and pattern.startswith("{", at + 2):
            return "a hex escape in braces (\\x{...}; write \\u{...} or \\uXXXX)"
        if atom == "\\0" and pattern[at + 2 : at + 3].isdigit():
            return "an octal escape (\\0 followed by digits; write \\xXX)"
    tokens = _regex_tokens(pattern)
    if any(t in _LETTER_ANCHORS for t in tokens):
        letter = next(t for t in tokens if t in _LETTER_ANCHORS)
        return f"the anchor {letter} (read as a letter; write ^ or $ at the start or end)"
    if not _anchors_redundant(tokens):
        return "an anchor (^ or $) where it is not at the start or end of the whole match"
    return None


def _regex_tokens(pattern: str) -> list[str]:
    """The regex as the anchors' check reads it, outside character classes: "(" (with its
    modifiers, "(?:", "(?<name>"...), ")", "|", "^", "$", "Q" (a quantifier that may repeat),
    "Q1" (?, at most once), the letter anchors, "C" (anything that takes characters: a class,
    a character, an escape)."""
    atoms = [atom for _, atom, in_class, _ in regex_atoms(pattern) if not in_class]
    tokens, i = [], 0
    while i < len(atoms):
        atom = atoms[i]
        if atom == "(":
            if i + 1 < len(atoms) and atoms[i + 1] == "?":  # its modifiers: ?: ?= ?! ?<= ?<! ?<name>
                i += 2
                if i < len(atoms) and atoms[i] == "<" and i + 1 < len(atoms) and atoms[i + 1] not in "=!":
                    while i < len(atoms) and atoms[i] != ">":
                        i += 1
                elif i < len(atoms) and atoms[i] == "<":
                    i += 1
            tokens.append("(")
        elif atom == "{" and _quantifier_at(atoms, i):
            i = atoms.index("}", i)
            tokens.append("Q")
        elif atom in ("*", "+"):
            tokens.append("Q")
        elif atom == "?":
            tokens.append("Q1")
        elif atom in (")", "|", "^", "$") or atom in _LETTER_ANCHORS:
            tokens.append(atom)
        else:
            tokens.append("C")
        i += 1
    return tokens


def _quantifier_at(atoms: list[str], i: int) -> bool:
    """Whether atoms[i], a "{", opens a quantifier ({n}, {n,}, {n,m})."""
    text = "".join(atoms[i : i + 24])
    return re.match(r"\{\d+(,\d*)?\}", text) is not None


def _anchors_redundant(tokens: list[str]) -> bool:
    r"""Whether every ^ can only be met before any character is taken, and every $ only after
    the last, so that dropping them (as xgrammar does) leaves the language a whole match of the
    regex has: a ^ at the start of an alternative whose enclosing groups all start there too
    ("(?:^|\s)x"), not in a group that repeats ("(^a)+"), and $ alike from the end."""
    # a group holding an anchor may not repeat (its second time round is past the start)
    depth_anchor = [False]
    for k, t in enumerate(tokens):
        if t == "(":
            depth_anchor.append(False)
        elif t in ("^", "$"):
            depth_anchor[-1] = True
            if k + 1 < len(tokens) and tokens[k + 1] == "Q":
                return False
        elif t == ")" and len(depth_anchor) > 1:
            held = depth_anchor.pop()
            depth_anchor[-1] = depth_anchor[-1] or held
            if held and k + 1 < len(tokens) and tokens[k + 1] == "Q":
                return False
    return _anchor_at_ends(tokens, "^", "(", ")") and _anchor_at_ends(tokens[::-1], "$", ")", "(")


def _anchor_at_ends(tokens: list[str], anchor: str, opener: str, closer: str) -> bool:
    """Reading ``tokens`` in order: every ``anchor`` comes where nothing can have been taken
    (each open group's alternative so far takes nothing, and so did everything before it)."""
    frames = [[True, False]]  # per open group: it starts where nothing is taken, its alternative took some
    for t in tokens:
        frame = frames[-1]
        if t == opener:
            frames.append([frame[0] and not frame[1], False])
        elif t == closer and len(frames) > 1:
            frames.pop()
            frames[-1][1] = True  # the group may take characters
        elif t == "|":
            frame[1] = False
        elif t == anchor:
            if not frame[0] or frame[1]:
                return False
        elif t == "C":
            frame[1] = True
    return True
