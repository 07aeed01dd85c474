"""Log-probabilities of chosen tokens and their top alternatives, computed on the device.

They are the log_softmax of the raw float32 logits (before penalties, biases or the
temperature), as vLLM reports them. Only the rows that ask are computed: sampled rows
of requests with ``logprobs``, prompt positions of requests with ``prompt_logprobs``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from raymoe.actors.engine.messages import Logprob


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> dict[str, torch.Tensor]:
    """logits [R, vocab] float32, token_ids [R] int64 -> tensors on the logits' device:
    ``token_ids``, ``logprob`` [R] float32 of each row's token, ``top_ids`` [R, num_top]
    int64 and ``top_logprobs`` [R, num_top] float32, most likely first."""
    logits = logits.float()
    norm = torch.logsumexp(logits, dim=-1, keepdim=True)  # log_softmax without the [R, vocab] result
    out = {"token_ids": token_ids, "logprob": (logits.gather(1, token_ids[:, None]) - norm).squeeze(1)}
    top = torch.topk(logits, num_top, dim=-1)
    out["top_ids"], out["top_logprobs"] = top.indices, top.values - norm
    return out


@dataclass(frozen=True)
class LogprobColumns:
    """``token_logprobs``' output on the host, as numpy columns (it crosses Ray)."""

    token_ids: np.ndarray  # [R] int64
    logprob: np.ndarray  # [R] float32
    top_ids: np.ndarray  # [R, K] int64
    top_logprobs: np.ndarray  # [R, K] float32

    @classmethod
    def from_host(cls, tensors: dict[str, torch.Tensor]) -> "LogprobColumns":
        """From ``token_logprobs``' tensors, copied to the host."""
        return cls(*(tensors[k].numpy() for k in ("token_ids", "logprob", "top_ids", "top_logprobs")))

    def entry(self, row: int, num_top: int) -> Logprob:
        """Row ``row`` with its ``num_top`` best alternatives."""
        ids, lps = self.top_ids[row, :num_top].tolist(), self.top_logprobs[row, :num_top].tolist()
        return Logprob(int(self.token_ids[row]), float(self.logprob[row]), tuple(zip(ids, lps)))
