"""Reasoning apart from content: whole answers, and the same answers streamed in every
possible split (tags cut between deltas), for both parsers."""

from __future__ import annotations

import random

import pytest

from raymoe.deploy.reasoning import ReasoningSplitter

CASES = [
    # parser, answer, (reasoning, content)
    ("qwen3", "<think>\nLet me see.\n</think>\n\nParis.", ("\nLet me see.\n", "Paris.")),
    ("qwen3", "Paris.", ("", "Paris.")),  # thinking off: no block
    ("qwen3", "<think>cut off", ("cut off", "")),  # max_tokens inside the block
    ("qwen3", "<thi", ("", "<thi")),  # not a tag after all
    ("qwen3", "a <think>b</think>", ("", "a <think>b</think>")),  # a tag later on is content
    ("qwen3", "<think></think>answer </think>", ("", "answer </think>")),
    ("deepseek_r1", "Hmm.</think>\n\nYes", ("Hmm.", "Yes")),
    ("deepseek_r1", "<think>Hmm.</think>Yes", ("Hmm.", "Yes")),  # a repeated opening tag is dropped
    ("deepseek_r1", "still thinking </th", ("still thinking </th", "")),
    ("deepseek_r1", "", ("", "")),
]


@pytest.mark.parametrize("parser,answer,expected", CASES)
def test_whole_answers(parser, answer, expected):
    assert ReasoningSplitter.split(parser, answer) == expected


@pytest.mark.parametrize("parser,answer,expected", CASES)
def test_streamed_in_any_split_equals_whole(parser, answer, expected):
    rng = random.Random(len(answer))
    for _ in range(30):
        cuts = sorted(rng.sample(range(len(answer) + 1), min(len(answer) + 1, rng.randint(0, 6))))
        pieces = [answer[a:b] for a, b in zip([0] + cuts, cuts + [len(answer)])]
        splitter = ReasoningSplitter(parser)
        got = [splitter.feed(p) for p in pieces] + [splitter.flush()]
        assert ("".join(r for r, _ in got), "".join(c for _, c in got)) == expected, pieces


def test_every_single_character_delta():
    answer = "<think>a</think>\n\nb"
    splitter = ReasoningSplitter("qwen3")
    got = [splitter.feed(ch) for ch in answer] + [splitter.flush()]
    assert ("".join(r for r, _ in got), "".join(c for _, c in got)) == ("a", "b")


def test_unknown_parser_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="serve.reasoning_parser"):
        ReasoningSplitter("o1")
