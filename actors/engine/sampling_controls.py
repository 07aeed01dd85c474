"""Logit controls before sampling: presence, frequency and repetition penalties,
logit_bias, min_tokens. Packed as numpy columns for the rows that use them (a step
with none carries no controls at all), applied on the device, vectorised over rows.

Definitions (vLLM's, after OpenAI's):
- repetition_penalty p: a token seen in the prompt or the output so far has its logit
  divided by p when positive, multiplied by p otherwise;
- then frequency_penalty f and presence_penalty r over the output so far:
  logit -= f * count + r * (count > 0);
- then logit_bias is added; then tokens banned by min_tokens (EOS, stop_token_ids) go to -inf.

The penalties count the request's tokens from its history as the step sends it (prompt
and outputs), so nothing lives on the ranks between steps and preemption changes
nothing. The last output may still be pending on the device (a pipelined step): it is
taken from the ranks' last sampled tokens, as the step's input tokens are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from raymoe.actors.engine.request import PENDING_TOKEN


@dataclass(frozen=True, kw_only=True)
class SamplingControls:
    rows: np.ndarray  # [R] int64: rows among the step's sampled rows that use a control
    presence: np.ndarray  # [R] float32
    frequency: np.ndarray  # [R] float32
    repetition: np.ndarray  # [R] float32
    # every token of the histories of rows with penalties, flat
    history_row: np.ndarray  # [H] int64: index into rows
    history_token: np.ndarray  # [H] int64 (PENDING_TOKEN: see history_prev)
    history_prev: np.ndarray  # [H] int64: row of the last step's sampled tokens for a pending token, else -1
    history_is_output: np.ndarray  # [H] bool
    bias_row: np.ndarray  # [L] int64: index into rows
    bias_token: np.ndarray  # [L] int64
    bias_value: np.ndarray  # [L] float32
    banned_row: np.ndarray  # [M] int64: index into rows
    banned_token: np.ndarray  # [M] int64


def pack_controls(chunks: Sequence, prev_rows: Sequence[int]) -> Optional[SamplingControls]:
    """The controls of the chunks that sample (``ScheduledChunk``s); None when none uses any."""
    sampled = [(c, p) for c, p in zip(chunks, prev_rows) if c.sample]
    used = [(row, c, p) for row, (c, p) in enumerate(sampled) if c.sampling.controls_logits]
    if not used:
        return None
    hist_row, hist_token, hist_prev, hist_out = [], [], [], []
    bias_row, bias_token, bias_value, banned_row, banned_token = [], [], [], [], []
    for i, (_, c, prev) in enumerate(used):
        n = len(c.history)
        hist_row += [i] * n
        hist_token += c.history
        hist_prev += [-1] * n
        if n and c.history[-1] == PENDING_TOKEN:
            hist_prev[-1] = prev
        hist_out += [k >= n - c.num_output_tokens for k in range(n)]
        for token, bias in c.sampling.logit_bias:
            bias_row.append(i)
            bias_token.append(token)
            bias_value.append(bias)
        banned_row += [i] * len(c.banned)
        banned_token += c.banned
    i64, f32 = np.int64, np.float32
    return SamplingControls(
        rows=np.array([row for row, _, _ in used], dtype=i64),
        presence=np.array([c.sampling.presence_penalty for _, c, _ in used], dtype=f32),
        frequency=np.array([c.sampling.frequency_penalty for _, c, _ in used], dtype=f32),
        repetition=np.array([c.sampling.repetition_penalty for _, c, _ in used], dtype=f32),
        history_row=np.array(hist_row, dtype=i64),
        history_token=np.array(hist_token, dtype=i64),
        history_prev=np.array(hist_prev, dtype=i64),
        history_is_output=np.array(hist_out, dtype=bool),
        bias_row=np.array(bias_row, dtype=i64),
        bias_token=np.array(bias_token, dtype=i64),
        bias_value=np.array(bias_value, dtype=f32),
        banned_row=np.array(banned_row, dtype=i64),
        banned_token=np.array(banned_token, dtype=i64),
    )


def apply_controls(logits: torch.Tensor, controls: SamplingControls, last_sampled: torch.Tensor) -> torch.Tensor:
    """logits [S, vocab] float32 -> a new tensor with the controls applied to their rows.
    ``last_sampled``: the ranks' last sampled tokens (where pending history tokens are)."""
    dev = logits.device

    def put(a: np.ndarray) -> torch.Tensor:
        return torch.tensor(a, device=dev)  # a copy: arrays unpickled from Ray are read-only

    rows = put(controls.rows)
    sub = logits[rows].float()
    if controls.history_row.size:
        sub = _penalize(sub, controls, last_sampled, put)
    if controls.bias_row.size:
        sub.index_put_((put(controls.bias_row), put(controls.bias_token)), put(controls.bias_value), accumulate=True)
    inside = controls.banned_token < logits.shape[1]  # stop_token_ids may lie outside the vocabulary
    if inside.any():
        sub[put(controls.banned_row[inside]), put(controls.banned_token[inside])] = float("-inf")
    out = logits.clone()
    out[rows] = sub
    return out


def _penalize(sub: torch.Tensor, controls: SamplingControls, last_sampled: torch.Tensor, put) -> torch.Tensor:
    hist_row = put(controls.history_row)
    prev = put(controls.history_prev)
    tokens = torch.where(prev >= 0, last_sampled[prev.clamp(min=0)], put(controls.history_token))
    seen = torch.zeros_like(sub, dtype=torch.bool)
    seen[hist_row, tokens] = True
    counts = torch.zeros_like(sub)
    is_output = put(controls.history_is_output)
    counts.index_put_((hist_row, tokens), is_output.to(sub.dtype), accumulate=True)
    rep = put(controls.repetition)[:, None]
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    return (
        sub - put(controls.frequency)[:, None] * counts - put(controls.presence)[:, None] * (counts > 0).to(sub.dtype)
    )
