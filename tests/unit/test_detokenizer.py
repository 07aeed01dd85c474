"""IncrementalDetokenizer: streamed deltas add up to tokenizer.decode (the `tokenizers`
library's full decode is the reference), UTF-8 split across tokens is held until
complete, stop strings cut exactly and hold back only what could still match."""

import random

import pytest

from raymoe.actors.engine.detokenizer import IncrementalDetokenizer
from raymoe.actors.engine.tokenizer import Tokenizer
from raymoe.actors.models.builtin import ensure_builtin

TEXTS = [
    "The lighthouse keeper woke before the sun, as she had done for thirty years.",
    "Emoji 🚀🔥 and CJK 日本語の文字, café — done.",
    "Two lines\nwith\ttabs and 12345 numbers!",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.from_dir(ensure_builtin("tiny-qwen3-moe", tmp_path_factory.mktemp("cache")))


def stream(detok, ids):
    """Feed ids one by one; return (add deltas, flush delta)."""
    deltas = [detok.add(t) for t in ids]
    return deltas, detok.flush()


def first_stop_cut(tok, ids, stops):
    """Reference: (index of the token that completes a stop, expected text) by full re-decoding."""
    for k in range(len(ids)):
        text = tok.decode(ids[: k + 1])
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            return k, text[: min(hits)]
    return None, tok.decode(ids)


@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_concatenate_to_full_decode(tok, skip):
    """Random ids from the whole vocabulary: byte tokens split and break UTF-8, specials interleave."""
    rng = random.Random(1)
    prompt = tok.encode("The keeper said")
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        detok = IncrementalDetokenizer(tok, prompt, stop=(), skip_special_tokens=skip)
        expected = tok.decode(ids, skip_special_tokens=skip)
        deltas = []
        for t in ids:
            deltas.append(detok.add(t))
            assert expected.startswith(detok.text)
            assert not deltas[-1].endswith("\ufffd")  # never released mid-character
        deltas.append(detok.flush())
        assert "".join(deltas) == expected == detok.text
        assert not detok.stopped


def test_multibyte_character_released_only_when_complete(tok):
    ids = tok.encode("🚀")
    assert len(ids) > 1  # the test needs a character split across byte tokens
    deltas, tail = stream(IncrementalDetokenizer(tok, [], stop=()), ids)
    assert deltas == [""] * (len(ids) - 1) + ["🚀"] and tail == ""


def test_incomplete_character_at_end_is_flushed_as_replacement(tok):
    ids = tok.encode("ok 日")[:-1]
    detok = IncrementalDetokenizer(tok, [], stop=())
    deltas, tail = stream(detok, ids)
    assert "".join(deltas) + tail == tok.decode(ids)
    assert "".join(deltas).startswith("ok") and "\ufffd" not in "".join(deltas)
    assert tail.endswith("\ufffd")


@pytest.mark.parametrize("text", TEXTS)
def test_natural_text_streams_exactly(tok, text):
    ids = tok.encode(text)
    for prompt in ([], tok.encode("prefix text"), tok.encode("ends mid 🚀")[:-1]):
        deltas, tail = stream(IncrementalDetokenizer(tok, prompt, stop=()), ids)
        assert "".join(deltas) + tail == tok.decode(ids) == text
        assert "\ufffd" not in "".join(deltas)


def test_prompt_ending_mid_character_does_not_swallow_output(tok):
    rocket = tok.encode("🚀")
    prompt, ids = rocket[:-1], rocket[-1:] + tok.encode("ok")
    deltas, tail = stream(IncrementalDetokenizer(tok, prompt, stop=()), ids)
    assert "".join(deltas) + tail == tok.decode(ids) == "\ufffdok"


def test_work_per_token_is_bounded(tok):
    """Each step decodes a short window, not the whole output."""

    class Spy:
        def __init__(self):
            self.lengths = []

        def decode(self, ids, skip_special_tokens=True):
            self.lengths.append(len(ids))
            return tok.decode(ids, skip_special_tokens)

        def decodes_to_nothing(self, token_id, skip_special_tokens=True):
            return tok.decodes_to_nothing(token_id, skip_special_tokens)

    spy = Spy()
    ids = tok.encode(" ".join(TEXTS) * 20)
    deltas, tail = stream(IncrementalDetokenizer(spy, tok.encode(TEXTS[0] * 5), stop=()), ids)
    assert "".join(deltas) + tail == tok.decode(ids)
    assert len(ids) > 500 and max(spy.lengths) <= 12


def test_stop_string_spanning_tokens_cuts_exactly(tok):
    text = TEXTS[0]
    ids = tok.encode(text)
    stop = "keeper woke"
    k, expected = first_stop_cut(tok, ids, [stop])
    assert stop not in tok.decode([ids[k]])  # spans several tokens
    assert expected == text[: text.find(stop)]
    detok = IncrementalDetokenizer(tok, [], stop=(stop,))
    deltas = []
    for i, t in enumerate(ids):
        deltas.append(detok.add(t))
        assert detok.stopped == (i >= k)
    assert "".join(deltas) == expected == detok.text
    assert detok.stop_reason == stop and detok.flush() == ""
    assert stop not in "".join(deltas)


def test_partial_match_is_held_then_released(tok):
    text = "the keeper kept the keys to the keepsake box"
    stop = "keepsakes"  # "kee", "keep", "keeps..." all start matching, then diverge
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, [], stop=(stop,))
    released = ""
    held_at_some_point = False
    for k, t in enumerate(ids):
        released += detok.add(t)
        so_far = tok.decode(ids[: k + 1])
        hold = max(n for n in range(len(stop)) if so_far.endswith(stop[:n]))
        assert released == so_far[: len(so_far) - hold]
        held_at_some_point |= hold > 0
    assert held_at_some_point and not detok.stopped
    assert released + detok.flush() == text


@pytest.mark.parametrize(
    "stops, expected_reason",
    [
        (("keeper", "light"), "light"),  # listed second, occurs first
        (("house", "lighthouse"), "lighthouse"),  # overlapping: the earlier start wins
        (("sun", "e"), "e"),  # single character, inside the first word
    ],
)
def test_earliest_stop_wins(tok, stops, expected_reason):
    ids = tok.encode(TEXTS[0])
    k, expected = first_stop_cut(tok, ids, stops)
    detok = IncrementalDetokenizer(tok, [], stop=stops)
    deltas, tail = stream(detok, ids)
    assert "".join(deltas) + tail == expected == TEXTS[0][: TEXTS[0].find(expected_reason)]
    assert detok.stop_reason == expected_reason and detok.stopped


def test_random_stop_strings_match_reference(tok):
    rng = random.Random(2)
    for _ in range(150):
        text = rng.choice(TEXTS)
        ids = tok.encode(text)
        full = tok.decode(ids)
        stops = []
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.8:
                i = rng.randrange(len(full))
                stops.append(full[i : i + rng.randint(1, 8)])
            else:
                stops.append(rng.choice(["zzz", "keepers", "🚀🚀", "\n\n"]))  # may never match
        detok = IncrementalDetokenizer(tok, tok.encode("prompt"), stop=tuple(stops))
        deltas, tail = stream(detok, ids)
        k, expected = first_stop_cut(tok, ids, stops)
        assert "".join(deltas) + tail == expected, (text, stops)
        assert detok.stopped == (k is not None)
        if k is not None:
            assert expected + detok.stop_reason == tok.decode(ids[: k + 1])[: len(expected) + len(detok.stop_reason)]


def test_stop_string_with_split_character(tok):
    text = TEXTS[1]
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, [], stop=("🔥",))
    deltas, tail = stream(detok, ids)
    assert "".join(deltas) == text[: text.find("🔥")] and tail == "" and detok.stopped


def test_after_stop_nothing_more_is_released(tok):
    detok = IncrementalDetokenizer(tok, [], stop=("keeper",))
    stream(detok, tok.encode(TEXTS[0]))
    text = detok.text
    assert detok.add(tok.encode(" more")[0]) == "" and detok.flush() == "" and detok.text == text


def test_eos_special_token_is_skipped(tok):
    eos = tok.token_to_id("<|im_end|>")
    ids = tok.encode("done") + [eos]
    deltas, tail = stream(IncrementalDetokenizer(tok, [], stop=()), ids)
    assert "".join(deltas) + tail == "done"
    deltas, tail = stream(IncrementalDetokenizer(tok, [], stop=(), skip_special_tokens=False), ids)
    assert "".join(deltas) + tail == "done<|im_end|>"


def test_empty_stop_string_rejected(tok):
    with pytest.raises(ValueError, match="stop"):
        IncrementalDetokenizer(tok, [], stop=("",))


@pytest.mark.parametrize("piece", [bytes([0x80]), "<|im_start|>"])
def test_a_long_run_without_a_complete_character_is_streamed_in_linear_time(tok, piece):
    """Tokens that never complete a character (a lone continuation byte, as logit_bias can force)
    or have no text (a skipped special token) were all held, each new one decoding the whole run
    again: quadratic in the output (2,000 tokens: 0.3 s of the ingress's event loop, 50 s at 32k).
    The text stays that of the full decode, released as it becomes final."""
    import time

    token = next(i for i in range(tok.vocab_size) if tok.token_bytes(i) == piece or tok.decode([i], False) == piece)
    lead = tok.encode("Hi €")[-1]  # a token whose character completes only with the next ones
    ids = [token] * 6000 + tok.encode("é a") + [token] * 20 + [lead]
    detok = IncrementalDetokenizer(tok, [], stop=())
    t0 = time.monotonic()
    deltas = [detok.add(t) for t in ids]
    elapsed = time.monotonic() - t0
    assert "".join(deltas) + detok.flush() == tok.decode(ids)
    assert sum(map(len, deltas[:6000])) >= 5990 or piece != bytes([0x80])  # released as it comes
    assert elapsed < 1.0, elapsed


@pytest.mark.parametrize("filler", ["<|im_start|>", "unknown id"])
def test_a_character_completed_after_a_long_run_of_textless_tokens_is_not_garbled(tok, filler):
    """A character's first byte, then more than 8 tokens that decode to nothing (skipped special
    tokens; ids the tokenizer does not know), then the bytes that complete it: the held tokens'
    release let the U+FFFD of the incomplete character go before its last bytes came ("\ufffd"
    streamed, then more garbage, where the full decode is "€")."""
    byte = {tok.token_bytes(i): i for i in range(tok.vocab_size)}
    filler_id = tok.token_to_id(filler) if filler.startswith("<") else tok.vocab_size + 7
    ids = [byte[b"\xe2"]] + [filler_id] * 12 + [byte[b"\x82"], byte[b"\xac"]] + tok.encode(" ok")
    detok = IncrementalDetokenizer(tok, [], stop=())
    out = "".join(detok.add(t) for t in ids) + detok.flush()
    assert out == tok.decode(ids) == "€ ok"


def test_a_stop_string_in_the_first_min_tokens_tokens_held_for_a_longer_one_stops_nothing(tok):
    """Stop strings "\n" and "\n\n": a "\n" in the first min_tokens tokens' text is held (it may
    begin "\n\n"); the next token's text stopped the output at it, though it came before
    min_tokens were out (vLLM's min_tokens: only an occurrence ending past them stops)."""
    head, tail = tok.encode("Hi there\n"), tok.encode("Good day")
    ids = head + tail
    for min_tokens in (len(head), len(head) + 1):
        detok = IncrementalDetokenizer(tok, [], stop=("\n", "\n\n"), min_tokens=min_tokens)
        out = "".join(detok.add(t) for t in ids) + detok.flush()
        assert out == tok.decode(ids) and not detok.stopped
    detok = IncrementalDetokenizer(tok, [], stop=("\n", "\n\n"), min_tokens=len(head) - 1)
    out = "".join(detok.add(t) for t in ids) + detok.flush()
    assert out == "Hi there" and detok.stop_reason == "\n"
