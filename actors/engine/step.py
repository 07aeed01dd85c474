"""What one engine step carries: controller -> rank (StepInput), rank -> controller (StepOutput),
and the flat token layout the runner builds from it (StepLayout)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from raymoe.actors.engine.scheduler import ScheduledChunk


@dataclass(frozen=True)
class StepInput:
    """One DP replica's work for one step; every rank of the replica gets the same."""

    chunks: tuple[ScheduledChunk, ...]
    dp_token_counts: tuple[int, ...]  # tokens of every DP replica this step (MoE lockstep)
    return_logits: bool = False  # also return the sampled rows' logits (tests, debugging)
    # every chunk of every replica is one token that samples: the step may replay a CUDA
    # graph. Decided globally, so all replicas take the same path (their MoE collectives
    # must agree on shapes).
    all_decode: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


@dataclass
class StepOutput:
    sampled: dict[str, int]  # request id -> next token, for every chunk with sample=True
    logits: Optional[torch.Tensor] = None  # [sampled chunks, vocab] float32, in chunk order


@dataclass(frozen=True)
class SeqSlice:
    """One sequence's rows in the flat batch and the KV context it attends to."""

    query_start: int
    num_query: int
    context_len: int  # tokens in the cache after this step = start_pos + num_query
    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class StepLayout:
    seqs: tuple[SeqSlice, ...]
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_blocks: torch.Tensor  # [T] block holding each token's k/v
    slot_offsets: torch.Tensor  # [T] offset inside that block
    sample_rows: torch.Tensor  # [S] row of the last token of each chunk that samples
    sample_chunks: tuple[int, ...] = field(default=())  # chunk index of each sampled row


def build_step_layout(chunks: Sequence[ScheduledChunk], block_size: int) -> StepLayout:
    """Flatten chunks into one token batch (CPU tensors). Pure."""
    ids: list[int] = []
    positions: list[int] = []
    blocks: list[int] = []
    offsets: list[int] = []
    seqs: list[SeqSlice] = []
    sample_rows: list[int] = []
    sample_chunks: list[int] = []
    for i, c in enumerate(chunks):
        n = len(c.token_ids)
        start = len(ids)
        pos = range(c.start_pos, c.start_pos + n)
        assert (c.start_pos + n + block_size - 1) // block_size <= len(c.block_ids), "block table too short"
        ids.extend(c.token_ids)
        positions.extend(pos)
        blocks.extend(c.block_ids[p // block_size] for p in pos)
        offsets.extend(p % block_size for p in pos)
        seqs.append(SeqSlice(start, n, c.start_pos + n, tuple(c.block_ids)))
        if c.sample:
            sample_rows.append(start + n - 1)
            sample_chunks.append(i)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.int64)  # noqa: E731
    return StepLayout(
        seqs=tuple(seqs),
        input_ids=as_long(ids),
        positions=as_long(positions),
        slot_blocks=as_long(blocks),
        slot_offsets=as_long(offsets),
        sample_rows=as_long(sample_rows),
        sample_chunks=tuple(sample_chunks),
    )
