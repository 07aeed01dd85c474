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
nothing. The last outputs may still be pending on the device (up to two, one from each
step in flight): they are taken from the ranks' recent sampled tokens, as the step's
input tokens are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from raymoe.actors.engine.request import PENDING_TOKEN
from raymoe.actors.engine.upload import to_device


@dataclass(frozen=True, kw_only=True)
class SamplingControls:
    rows: np.ndarray  # [R] int64: rows among the step's sampled rows that use a control
    presence: np.ndarray  # [R] float32
    frequency: np.ndarray  # [R] float32
    repetition: np.ndarray  # [R] float32
    # the histories of the rows (prompt then outputs), flat; rows without penalties have none.
    # A pending token (sampled by a step in flight) is -1 - its index in the ranks' recent
    # sampled tokens (ModelRunner.recent_sampled)
    history_token: np.ndarray  # [H] int64
    history_len: np.ndarray  # [R] int64: tokens of each row's history
    history_outputs: np.ndarray  # [R] int64: how many of them, at the end, are outputs
    bias_row: np.ndarray  # [L] int64: index into rows
    bias_token: np.ndarray  # [L] int64
    bias_value: np.ndarray  # [L] float32
    banned_row: np.ndarray  # [M] int64: index into rows
    banned_token: np.ndarray  # [M] int64


def pack_controls(chunks: Sequence, pending_at: Sequence[Sequence[int]]) -> Optional[SamplingControls]:
    """The controls of the chunks that sample (``ScheduledChunk``s); None when none uses any.
    ``pending_at``: per chunk, where the pending tokens at the end of its history are in the
    ranks' recent sampled tokens, oldest first."""
    sampled = [(c, p) for c, p in zip(chunks, pending_at) if c.sample]
    used = [(row, c, p) for row, (c, p) in enumerate(sampled) if c.sampling.controls_logits]
    if not used:
        return None
    histories = [_resolvable(np.asarray(c.history, dtype=np.int64), p) for _, c, p in used]
    bias_row, bias_token, bias_value, banned_row, banned_token = [], [], [], [], []
    for i, (_, c, _) in enumerate(used):
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
        history_token=np.concatenate(histories),
        history_len=np.array([len(h) for h in histories], dtype=i64),
        history_outputs=np.array([c.num_output_tokens if len(c.history) else 0 for _, c, _ in used], dtype=i64),
        bias_row=np.array(bias_row, dtype=i64),
        bias_token=np.array(bias_token, dtype=i64),
        bias_value=np.array(bias_value, dtype=f32),
        banned_row=np.array(banned_row, dtype=i64),
        banned_token=np.array(banned_token, dtype=i64),
    )


def _resolvable(history: np.ndarray, pending_at: Sequence[int]) -> np.ndarray:
    """``history`` with its trailing PENDING_TOKENs as -1 - their index in the ranks' recent
    sampled tokens."""
    pending = int(np.count_nonzero(history == PENDING_TOKEN))
    assert pending == len(pending_at) and (pending == 0 or (history[-pending:] == PENDING_TOKEN).all())
    if not pending:
        return history
    out = history.copy()
    out[-pending:] = -1 - np.asarray(pending_at, dtype=np.int64)
    return out


def apply_controls(logits: torch.Tensor, controls: SamplingControls, last_sampled: torch.Tensor) -> torch.Tensor:
    """logits [S, vocab] float32 -> a new tensor with the controls applied to their rows.
    ``last_sampled``: the ranks' recent sampled tokens (where pending history tokens are).
    Only the logits a control names are touched, so the cost follows the histories and
    biases, not rows x vocabulary."""
    dev = logits.device

    def put(a: np.ndarray) -> torch.Tensor:
        return to_device(a, dev)

    rows = put(controls.rows)
    out = logits.float().clone()
    if controls.history_token.size:
        _penalize(out, rows, controls, last_sampled, put)
    if controls.bias_row.size:
        at = (rows[put(controls.bias_row)], put(controls.bias_token))
        out.index_put_(at, put(controls.bias_value), accumulate=True)
    inside = controls.banned_token < logits.shape[1]  # stop_token_ids may lie outside the vocabulary
    if inside.any():
        out[rows[put(controls.banned_row[inside])], put(controls.banned_token[inside])] = float("-inf")
    return out


def _penalize(
    out: torch.Tensor, rows: torch.Tensor, controls: SamplingControls, last_sampled: torch.Tensor, put
) -> None:
    """The penalties, in place, on the logits of the tokens in each row's history."""
    num_rows, total = len(controls.history_len), int(controls.history_token.size)
    lens = put(controls.history_len)
    hist_row = torch.repeat_interleave(torch.arange(num_rows, device=out.device), lens, output_size=total)
    ends = torch.cumsum(lens, 0)
    index_in_row = torch.arange(total, device=out.device) - (ends - lens)[hist_row]
    from_end = lens[hist_row] - index_in_row  # 1 for a row's last token
    tokens = put(controls.history_token)
    tokens = torch.where(tokens < 0, last_sampled[(-1 - tokens).clamp(min=0)], tokens)
    is_output = from_end <= put(controls.history_outputs)[hist_row]
    counts = torch.zeros((num_rows, out.shape[1]), dtype=out.dtype, device=out.device)
    counts.index_put_((hist_row, tokens), is_output.to(out.dtype), accumulate=True)
    # each history token's new logit, written back (a token seen twice gets the same value twice)
    at = (rows[hist_row], tokens)
    seen, count = out[at], counts[hist_row, tokens]
    rep = put(controls.repetition)[hist_row]
    penalized = torch.where(seen > 0, seen / rep, seen * rep)
    penalized = penalized - put(controls.frequency)[hist_row] * count
    penalized = penalized - put(controls.presence)[hist_row] * (count > 0).to(out.dtype)
    out.index_put_(at, penalized)
