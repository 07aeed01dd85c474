"""ForwardBatch: the per-step state a model forward needs, passed as an argument."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import NamedTuple, Optional, Protocol

import torch


class Attention(Protocol):
    """An attention backend planned for one step (raymoe.actors.engine.attention_torch, attention_flashinfer)."""

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write k/v of the step's tokens into layer ``layer``'s KV cache, attend.

        q [T, heads, D], k/v [T, kv_heads, D] -> [T, heads, D].
        """
        ...


class LatentPair(NamedTuple):
    """A latent-space tensor as two parts, the latent dims [..., L] and the rotary dims
    [..., R]: MLA's query [T, heads, *] or a step's cache entries [T, *], handed to the
    attention without concatenating them (each part's last dim contiguous)."""

    latent: torch.Tensor
    rope: torch.Tensor


class LatentAttention(Protocol):
    """An attention backend over a latent KV cache (DeepSeek's MLA, see latent_attention.py)."""

    def forward_latent(self, layer: int, q: LatentPair, kv: LatentPair) -> torch.Tensor:
        """Write the step's latent entries into layer ``layer``'s cache, attend absorbed.

        q: the absorbed query [T, heads, L] and its rotary part [T, heads, R]; kv: the normed
        latent [T, L] and the rotary key [T, R] -> [T, heads, L]: every head attends to the
        one latent entry per token (latent then rotary dims), whose latent dims are also the
        value.
        """
        ...


class ExpertLoadRecorder(Protocol):
    def record(self, moe_layer: int, physical_ids: torch.Tensor) -> None:
        """Count tokens routed to each physical expert; physical_ids [N, top_k]."""
        ...


@dataclass(frozen=True)
class TokenSplit:
    """Context parallelism (cp > 1): this rank runs only its rows of its replica's step; the
    MoE gathers every cp member's rows, each padded to ``pad`` (this rank's at ``start``), then
    (dp > 1) every replica's, each padded to ``replica_rows``. ``valid`` [dp * replica_rows]
    bool on the device: the gathered rows that are real."""

    pad: int
    start: int
    rows: int
    replica_rows: int
    valid: torch.Tensor


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64, this DP replica's tokens
    positions: torch.Tensor  # [T] int64
    attention: Attention | LatentAttention
    _: KW_ONLY
    # MoE layers gather every DP replica's tokens, each replica padded to ``dp_pad`` rows
    # (the step's largest replica, or a CUDA graph's batch size); ``dp_counts`` [dp] int
    # on the device says how many rows of each replica are real. With dp == 1 it is set
    # only for a CUDA graph, whose padding rows the expert-load recorder must skip.
    dp_pad: int = 0
    dp_counts: Optional[torch.Tensor] = None
    expert_load: Optional[ExpertLoadRecorder] = None
    split: Optional[TokenSplit] = None  # context parallelism: this rank's rows of the replica's step

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])
