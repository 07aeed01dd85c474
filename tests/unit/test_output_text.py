"""OutputText: the engine's token deltas, in chunks of any size (a consumer that fell
behind takes several steps at once), give the text and token counts of the one-token-
at-a-time path: ``tokenizer.decode`` of the output (the `tokenizers` library is the
reference), cut before the first stop string at the token that completed it, with the
stop token of a STOP finish counted but not shown. IncrementalDetokenizer.add_many
agrees with add."""

import random

import pytest

from raymoe.actors.engine.detokenizer import IncrementalDetokenizer
from raymoe.actors.engine.messages import Finish
from raymoe.actors.engine.output_text import OutputText
from raymoe.actors.engine.tokenizer import Tokenizer
from raymoe.actors.models.builtin import ensure_builtin


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.from_dir(ensure_builtin("tiny-qwen3-moe", tmp_path_factory.mktemp("cache")))


def _chunks(rng: random.Random, ids: list[int]) -> list[list[int]]:
    out, i = [], 0
    while i < len(ids):
        n = rng.choice([1, 1, 2, 3, 7])
        out.append(ids[i : i + n])
        i += n
    return out


def _feed(text: OutputText, ids: list[int], finish: Finish, rng: random.Random) -> tuple[str, list[int], list]:
    """Feed ids in random chunks, the last one carrying ``finish``; (text, tokens, deltas).
    ``text.last_chunk_start``: where that last chunk began."""
    chunks = _chunks(rng, ids)
    deltas = [text.add(c, finish if i == len(chunks) - 1 else Finish.RUNNING) for i, c in enumerate(chunks)]
    text.last_chunk_start = len(ids) - len(chunks[-1])
    return "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids], deltas


def test_chunks_of_any_size_give_the_full_decode(tok):
    rng = random.Random(3)
    prompt = tok.encode("The keeper said")
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        text = OutputText(tok, prompt)
        got, tokens, deltas = _feed(text, ids, Finish.LENGTH, rng)
        assert got == tok.decode(ids) and tokens == ids
        assert all(not d.text.endswith("\ufffd") for d in deltas[:-1])  # never released mid-character
        assert deltas[-1].finish_reason == "length" and all(d.finish_reason is None for d in deltas[:-1])
        assert text.num_output_tokens == len(ids) == deltas[-1].num_output_tokens and not text.needs_abort


def test_a_stop_token_is_counted_but_not_shown(tok):
    rng = random.Random(4)
    ids = tok.encode("Down in the village, the baker")
    eos = next(iter(tok.eos_token_ids))
    text = OutputText(tok, [])
    got, tokens, deltas = _feed(text, ids + [eos], Finish.STOP, rng)
    assert got == tok.decode(ids) and tokens == ids + [eos]
    assert deltas[-1].finish_reason == "stop" and text.num_output_tokens == len(ids) + 1 and not text.needs_abort


def test_stop_strings_cut_where_the_one_token_path_cuts(tok):
    """Reference: the first k whose decode(ids[:k]) holds a stop string; the text is that
    decode cut before the earliest occurrence; k tokens are counted."""
    rng = random.Random(5)
    base = tok.encode("She climbed the spiral stairs, counted the steps, and checked the great lamp.")
    cases = 0
    for _ in range(200):
        ids = base[: rng.randrange(5, len(base))] + [rng.randrange(tok.vocab_size) for _ in range(3)]
        full = tok.decode(ids)
        start = rng.randrange(0, max(1, len(full) - 3))
        stop = full[start : start + rng.choice([1, 2, 4])].strip().replace("\ufffd", "") or "e"
        k = next((k for k in range(1, len(ids) + 1) if stop in tok.decode(ids[:k])), None)
        text = OutputText(tok, [], (stop,))
        got, tokens, deltas = _feed(text, ids, Finish.LENGTH, rng)
        if k is None:
            assert got == full and text.finish_reason == "length"
            continue
        cases += 1
        cut = tok.decode(ids[:k])
        assert got == cut[: cut.index(stop)] and tokens == ids[:k] and text.num_output_tokens == k
        assert text.finish_reason == "stop"
        # the engine still runs it unless the stop came in the chunk that carried its finish
        assert text.needs_abort == (k <= text.last_chunk_start)
        assert text.add([1, 2], Finish.RUNNING).token_ids == []  # what the engine sampled after the stop
    assert cases > 100


def test_a_stop_string_before_the_engine_finish_asks_for_an_abort(tok):
    ids = tok.encode("The sea was calm this morning")
    text = OutputText(tok, [], ("calm",))
    delta = text.add(ids, Finish.RUNNING)
    assert delta.finish_reason == "stop" and text.needs_abort and delta.text == "The sea was "
    done = OutputText(tok, [], ("calm",))
    assert done.add(ids, Finish.LENGTH).finish_reason == "stop" and not done.needs_abort  # the engine is done already


def test_add_many_equals_add(tok):
    rng = random.Random(6)
    prompt = tok.encode("Numbers matter at sea")
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        one, many = IncrementalDetokenizer(tok, prompt), IncrementalDetokenizer(tok, prompt)
        a = "".join(one.add(t) for t in ids) + one.flush()
        b = "".join(many.add_many(c) for c in _chunks(rng, ids)) + many.flush()
        assert a == b == tok.decode(ids)


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_stop_strings_in_the_first_min_tokens_tokens_stop_nothing(tok, chunk):
    """vLLM's min_tokens: a stop string holds off, as EOS does, until min_tokens tokens are out;
    an occurrence ending past them stops the output (it stopped at the first occurrence)."""
    ids = tok.encode("The keeper said the sea was calm this morning")
    pieces = [tok.decode(ids[:k]) for k in range(len(ids) + 1)]
    for min_tokens in (0, 3, len(ids) - 1, len(ids)):
        text = OutputText(tok, [], ("e",), min_tokens)
        deltas = [text.add(ids[i : i + chunk], Finish.RUNNING) for i in range(0, len(ids), chunk)]
        got = "".join(d.text for d in deltas)
        # the first token past min_tokens whose text completes an "e" (in text after the min_tokens-th)
        k = next((k for k in range(min_tokens + 1, len(ids) + 1) if "e" in pieces[k][len(pieces[min_tokens]) :]), None)
        if k is None:
            assert got == pieces[-1] and text.finish_reason is None
            continue
        cut = pieces[k]
        assert got == cut[: cut.index("e", len(pieces[min_tokens]))] and text.finish_reason == "stop"
        assert text.num_output_tokens == k and text.needs_abort
