"""The admission rule: a request must fit alone, its prompt plus max_tokens within the
context (max_model_len) and within the whole KV cache. Its last sampled token never
enters the cache (no step runs after it), so a request of n tokens holds at most n - 1.

The scheduler refuses a request that breaks the rule (it would wait forever); clients
check prompts and max_tokens against ``token_limit`` before they send them.
"""

from __future__ import annotations


def max_cached_tokens(num_prompt_tokens: int, max_tokens: int) -> int:
    """The most tokens a request ever holds in the KV cache: all but its last sampled one."""
    return num_prompt_tokens + max_tokens - 1


def blocks_to_fit(num_prompt_tokens: int, max_tokens: int, block_size: int) -> int:
    """KV blocks of ``block_size`` tokens that a request needs to run to max_tokens."""
    return -(-max_cached_tokens(num_prompt_tokens, max_tokens) // block_size)


def token_limit(*, max_model_len: int, num_blocks: int, block_size: int) -> int:
    """Most tokens (prompt + output) one request may hold: the context, and alone the KV
    cache of ``num_blocks`` blocks."""
    return min(max_model_len, num_blocks * block_size + 1)


def check_fits_alone(
    num_prompt_tokens: int, max_tokens: int, *, max_model_len: int, num_blocks: int, block_size: int
) -> None:
    """ValueError naming the field to change when the request breaks the rule; passes
    exactly when num_prompt_tokens + max_tokens <= token_limit(...)."""
    if num_prompt_tokens > max_model_len:
        raise ValueError(
            f"prompt_token_ids: the prompt has {num_prompt_tokens} tokens, more than max_model_len={max_model_len}"
        )
    if num_prompt_tokens + max_tokens > max_model_len:
        raise ValueError(
            f"max_tokens: prompt ({num_prompt_tokens}) + max_tokens ({max_tokens}) exceeds "
            f"max_model_len={max_model_len}; use max_tokens <= {max_model_len - num_prompt_tokens}"
        )
    need = blocks_to_fit(num_prompt_tokens, max_tokens, block_size)
    if need > num_blocks:
        raise ValueError(
            f"max_tokens: prompt ({num_prompt_tokens}) + max_tokens ({max_tokens}) needs {need} KV blocks of "
            f"{block_size} tokens but the whole cache has {num_blocks}; shorten the request"
        )
