"""The admission rule: the scheduler's check and the clients' token limit are one rule."""

from __future__ import annotations

import itertools

import pytest

from raymoe.actors.engine.admission import blocks_to_fit, check_fits_alone, token_limit
from raymoe.actors.engine.messages import ModelInfo


def test_a_request_fits_exactly_when_it_is_within_the_token_limit():
    for max_model_len, num_blocks, block_size in itertools.product((1, 7, 20), (1, 3, 4), (1, 4, 5)):
        kw = dict(max_model_len=max_model_len, num_blocks=num_blocks, block_size=block_size)
        limit = token_limit(**kw)
        for n_prompt, max_tokens in itertools.product(range(1, 25), range(1, 25)):
            try:
                check_fits_alone(n_prompt, max_tokens, **kw)
                fits = True
            except ValueError:
                fits = False
            assert fits == (n_prompt + max_tokens <= limit), (kw, n_prompt, max_tokens)


def test_the_last_token_is_never_cached():
    assert blocks_to_fit(16, 1, block_size=4) == 4  # 16 prompt tokens cached, the one output never
    assert blocks_to_fit(16, 2, block_size=4) == 5
    assert token_limit(max_model_len=100, num_blocks=4, block_size=4) == 17


def test_errors_name_the_field_to_change():
    kw = dict(max_model_len=20, num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match=r"^prompt_token_ids: the prompt has 21 tokens, more than max_model_len=20$"):
        check_fits_alone(21, 1, **kw)
    with pytest.raises(ValueError, match=r"^max_tokens: .*exceeds max_model_len=20; use max_tokens <= 5$"):
        check_fits_alone(15, 6, **kw)
    with pytest.raises(ValueError, match=r"^max_tokens: .*needs 5 KV blocks of 4 tokens but the whole cache has 4"):
        check_fits_alone(16, 2, **kw)


def test_model_info_gives_clients_the_same_limit():
    info = ModelInfo(
        model="m", architecture="a", vocab_size=10, max_model_len=100, kv_blocks_per_replica=4, block_size=4, load_s=0.0
    )
    assert info.token_limit == token_limit(max_model_len=100, num_blocks=4, block_size=4) == 17
