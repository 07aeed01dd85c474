"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds.

Random choices are a function of (request seed, output index) only, so a
request samples the same tokens alone or in any batch, before or after a
preemption.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from raymoe.actors.engine.logprobs import token_logprobs
from raymoe.actors.engine.sampling_controls import apply_controls
from raymoe.actors.engine.step import StepInput


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
    """
    assert logits.shape[0] == len(temperature)
    out = logits.argmax(dim=-1)
    for i in np.flatnonzero(temperature > 0).tolist():
        out[i] = _sample_row(
            logits[i],
            temperature=float(temperature[i]),
            top_k=int(top_k[i]),
            top_p=float(top_p[i]),
            seed=int(seeds[i]),
            step=int(output_index[i]),
        )
    return out


def _sample_row(
    logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float, seed: int, step: int
) -> torch.Tensor:
    scores = filter_logits(logits / temperature, top_k, top_p)
    probs = torch.softmax(scores, dim=-1)
    gen = torch.Generator(device=logits.device).manual_seed(_mix(seed, step))
    # exponential race: argmax(p / E) with E ~ Exp(1) draws from p
    noise = torch.empty_like(probs).exponential_(generator=gen)
    return torch.argmax(probs / noise)


def filter_logits(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set scores outside the top-k and outside the top-p nucleus to -inf. scores [vocab]."""
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cum = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop_sorted = (cum - torch.softmax(sorted_scores, dim=-1)) >= top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def _mix(seed: int, step: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9) % (2**63 - 1)


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """``logits`` [R, vocab] with the tokens that ``bitmask`` [G, words] (int32, bit t % 32 of
    word t // 32 set = token t allowed; ``grammar.token_bitmask``) disallows in rows ``rows``
    [G] set to -inf (a new tensor). Plain torch: any device, any vocabulary size."""
    vocab = logits.shape[-1]
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :vocab]
    out = logits.clone()
    out[rows] = out[rows].masked_fill(~allowed, float("-inf"))
    return out


def sample_step(logits: torch.Tensor, step: StepInput, last_sampled: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sample`` for the rows of ``step`` that sample (``step.sample``), in order: logits
    [rows that sample, vocab], after the step's logit controls if it has any
    (``last_sampled``: the ranks' last sampled tokens, for pending history tokens)."""
    s = step.sample
    if step.controls is not None:
        assert last_sampled is not None, "logit controls need the last sampled tokens"
        logits = apply_controls(logits, step.controls, last_sampled)
    if step.grammar_rows is not None:
        rows = torch.from_numpy(step.grammar_rows).to(logits.device)
        logits = apply_token_bitmask(logits, rows, torch.from_numpy(step.grammar_bitmask).to(logits.device))
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
    rows = torch.tensor(np.flatnonzero(asked >= 0), device=logits.device)
    return token_logprobs(logits[rows], tokens[rows], int(asked.max()))
