"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds.

Random choices are a function of (request seed, output index) only, so a
request samples the same tokens alone or in any batch, before or after a
preemption.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from raymoe.actors.engine.logprobs import token_logprobs
from raymoe.actors.engine.sampling_controls import apply_controls
from raymoe.actors.engine.step import StepInput
from raymoe.actors.engine.upload import to_device


def sample(
    logits: torch.Tensor,
    *,
    temperature: np.ndarray,
    top_k: np.ndarray,
    top_p: np.ndarray,
    seeds: np.ndarray,
    output_index: np.ndarray,
) -> torch.Tensor:
    """logits [n, vocab] float32 -> one token id per row (int64 [n], on the logits' device:
    nothing here waits for the device).

    Per row: temperature (0 = greedy), top_k (-1 = off), top_p, the request's seed and
    how many tokens it has output so far (the random draw depends on these alone).
    Vectorised over the rows that sample at random.
    """
    assert logits.shape[0] == len(temperature)
    out = logits.argmax(dim=-1)
    rows = np.flatnonzero(temperature > 0)
    if rows.size == 0:
        return out
    dev = logits.device
    on_device = to_device(rows, dev)
    scores = logits[on_device].float() / to_device(temperature[rows], dev)[:, None]
    k, vocab = top_k[rows], logits.shape[1]
    if ((k > 0) & (k < vocab)).any() or (top_p[rows] < 1.0).any():
        width = int(k.max()) if ((k > 0) & (k < vocab)).all() else vocab
        scores = filter_logits(scores, top_k=to_device(k, dev), top_p=to_device(top_p[rows], dev), width=width)
    keys = np.array([_mix(int(s), int(i)) for s, i in zip(seeds[rows], output_index[rows])], dtype=np.int64)
    # Gumbel-max: argmax(scores + Gumbel noise) draws from softmax(scores)
    out[on_device] = torch.argmax(scores + gumbel_noise(to_device(keys, dev), logits.shape[1]), dim=-1)
    return out


def filter_logits(scores: torch.Tensor, *, top_k: torch.Tensor, top_p: torch.Tensor, width: int) -> torch.Tensor:
    """Per row, set the scores outside its top-k, then outside the top-p nucleus of what
    is left, to -inf. scores [R, vocab]; top_k [R] int64 (<= 0 or >= vocab: off); top_p [R];
    ``width``: at least every row's top_k (the vocabulary if one has none): only the best
    ``width`` scores of each row are sorted."""
    vocab = scores.shape[1]
    if width < vocab:
        sorted_scores, order = torch.topk(scores, width, dim=-1)
    else:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    ranks = torch.arange(sorted_scores.shape[1], device=scores.device)[None, :]
    sorted_scores = sorted_scores.masked_fill(ranks >= k[:, None], float("-inf"))
    probs = torch.softmax(sorted_scores, dim=-1)
    # drop a token when the tokens before it already reach top_p (the first always stays;
    # top_p 1 keeps all, whatever float32 sums round to)
    drop_sorted = ((probs.cumsum(dim=-1) - probs) >= top_p[:, None]) & (top_p < 1.0)[:, None]
    drop_sorted[:, 0] = False
    kept = sorted_scores.masked_fill(drop_sorted, float("-inf"))
    return torch.full_like(scores, float("-inf")).scatter(1, order, kept)


def gumbel_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """[R, vocab] float32 standard Gumbel noise, a pure function of each row's key [R] int64
    and the token id (a counter-based hash, SplitMix64's finaliser), so a row draws the same
    whatever else is in the batch and on any device."""
    x = keys[:, None] + (torch.arange(1, vocab + 1, device=keys.device) * _GOLDEN)[None, :]
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    x = x ^ _shift_right(x, 31)
    # 23 random bits, in (0, 1) exactly in float32 (with 24, the top value rounds to 1: infinite noise)
    u = (_shift_right(x, 41).float() + 0.5) * 2.0**-23
    return -torch.log(-torch.log(u))


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> keeps the sign)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MIX1, _MIX2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _mix(seed: int, step: int) -> int:
    """A row's key, as int64: for one step, distinct int64 seeds give distinct keys (times an
    odd constant is a bijection modulo 2^64)."""
    return _signed((seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9) % (1 << 64))


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """``logits`` [R, vocab] with the tokens that ``bitmask`` [G, words] (int32, bit t % 32 of
    word t // 32 set = token t allowed; ``grammar.GrammarMasks``) disallows in rows ``rows``
    [G] set to -inf (a new tensor); ids past the mask's 32 * words are disallowed. Plain
    torch: any device, any vocabulary size."""
    vocab = logits.shape[-1]
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :vocab]
    allowed = F.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    out = logits.clone()
    out[rows] = out[rows].masked_fill(~allowed, float("-inf"))
    return out


def sample_step(logits: torch.Tensor, step: StepInput, last_sampled: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sample`` for the rows of ``step`` that sample (``step.sample``), in order: logits
    [rows that sample, vocab], after the step's logit controls if it has any
    (``last_sampled``: the ranks' last sampled tokens, for pending history tokens)."""
    s = step.sample
    plain = logits
    if step.controls is not None:
        assert last_sampled is not None, "logit controls need the last sampled tokens"
        logits = apply_controls(logits, step.controls, last_sampled)
    g = step.grammar
    if g is not None and g.rows.size:
        dev = logits.device
        bitmask = to_device(g.bitmask, dev)[to_device(g.mask_of_row, dev)]
        logits = apply_token_bitmask(logits, to_device(g.rows, dev), bitmask)
        plain = apply_token_bitmask(plain, to_device(g.rows, dev), bitmask) if step.controls is not None else plain
    if step.controls is not None and step.controls.banned_row.size:
        # min_tokens yields where its bans leave nothing (a grammar that can only end, every id
        # a stop id): those rows sample without the controls, rather than an arbitrary id
        nothing_left = torch.isneginf(logits).all(dim=-1, keepdim=True)
        logits = torch.where(nothing_left, plain.to(logits.dtype), logits)
    return sample(
        logits,
        temperature=step.temperature[s],
        top_k=step.top_k[s],
        top_p=step.top_p[s],
        seeds=step.seed[s],
        output_index=step.output_index[s],
    )


def sampled_logprobs(logits: torch.Tensor, tokens: torch.Tensor, step: StepInput) -> Optional[dict[str, torch.Tensor]]:
    """``token_logprobs`` of the sampled rows whose requests ask (``step.logprobs`` >= 0), in
    order, from the raw logits [rows that sample, vocab]; None when no row asks."""
    if step.logprobs is None:
        return None
    asked = step.logprobs[step.sample]
    rows = to_device(np.flatnonzero(asked >= 0), logits.device)
    return token_logprobs(logits[rows], tokens[rows], int(asked.max()))
