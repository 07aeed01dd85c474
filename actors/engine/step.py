"""One engine step, from the schedulers' picks to the ranks' tensors and back.

Controller side, ``StepBuilder`` is the one builder: it turns the schedulers' chunks
into a ``StepInFlight`` -- the ``StepInput`` each DP replica's ranks run, and which
request output each sampled row fills when the step's ``StepOutput`` comes back. It
remembers the rows of the step before, so with a step still in flight a decode chunk
can name where its pending token is on the ranks (``prev_rows``).

Rank side, ``build_step_layout`` is the one resolver: a StepInput to the token-level
tensors the runner, the attention backends and the CUDA graphs read, vectorised;
``resolve_pending_tokens`` fills the pending tokens on the device.

StepInput and StepOutput are columns of numpy arrays rather than per-request objects:
they cross Ray every step, and arrays pickle as raw bytes (a 256-sequence step of
dataclasses cost ~2.6 ms to pickle and unpickle).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from raymoe.actors.engine.grammar import GrammarMasks
from raymoe.actors.engine.logprobs import LogprobColumns
from raymoe.actors.engine.request import PENDING_TOKEN, TOP_P_MIN, SamplingParams
from raymoe.actors.engine.sampling_controls import SamplingControls, pack_controls
from raymoe.actors.engine.scheduler import ScheduledChunk, SchedulerOutput


@dataclass(frozen=True, kw_only=True)
class StepInput:
    token_ids: np.ndarray  # [T] int64: every chunk's tokens, concatenated (PENDING_TOKEN: see prev_rows)
    query_lens: np.ndarray  # [B] int64: tokens of each chunk
    start_pos: np.ndarray  # [B] int64: position of each chunk's first token
    block_tables: np.ndarray  # [B, W] int32: each chunk's first W blocks (enough for this step)
    sample: np.ndarray  # [B] bool: the chunk ends at its last known token -> sample one
    temperature: np.ndarray  # [B] float32 (0 = greedy)
    top_k: np.ndarray  # [B] int64 (-1 = off)
    top_p: np.ndarray  # [B] float32
    seed: np.ndarray  # [B] int64
    output_index: np.ndarray  # [B] int64: tokens the request has output so far
    dp_token_counts: tuple[int, ...]  # tokens of every DP replica this step (MoE lockstep)
    return_logits: bool = False  # also return the sampled rows' logits (tests, debugging)
    # every chunk of every replica is one token that samples: the step may replay a CUDA
    # graph. Decided globally, so all replicas take the same path (their MoE collectives
    # must agree on shapes).
    all_decode: bool = False
    # [B] int64: for a chunk whose token is still pending (sampled by one of the two steps
    # before, still in flight), where that token is in the ranks' buffer of the last two
    # steps' sampled tokens (``sample_slot`` x slot rows + its row); -1 for a chunk whose
    # tokens are all given
    prev_rows: Optional[np.ndarray] = None
    sample_slot: int = 0  # the half of that buffer this step's sampled tokens go to (steps alternate)
    # What only some requests ask for; None when no chunk of the step does (the step then
    # runs exactly as without these features).
    logprobs: Optional[np.ndarray] = None  # [B] int64: top logprobs of each sampled token (-1 = none)
    controls: Optional[SamplingControls] = None  # logit controls of the sampled rows that use them
    # prompt logprobs: token rows whose logits give the logprob of the next prompt token
    prompt_logprob_rows: Optional[np.ndarray] = None  # [Q] int64, rows of token_ids
    prompt_logprob_targets: Optional[np.ndarray] = None  # [Q] int64: that next prompt token
    prompt_logprob_top: int = 0  # top alternatives to return for each (the most any chunk asks)
    # structured output: the sampled rows whose grammar limits the next token, and which
    # tokens; or, with grammar_late, the masks follow with the ranks' next call (``grammar``)
    grammar: Optional[GrammarMasks] = None
    grammar_late: bool = False

    @property
    def num_chunks(self) -> int:
        return int(self.query_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])


@dataclass
class StepOutput:
    tokens: np.ndarray  # [S] int64: next token of each chunk that samples, in chunk order
    logits: Optional[torch.Tensor] = None  # [S, vocab] float32, when return_logits
    logprobs: Optional[LogprobColumns] = None  # the sampled rows whose requests ask, in order
    prompt_logprobs: Optional[LogprobColumns] = None  # rows of step.prompt_logprob_rows
    # how long the rank waited for this step's outputs after launching the step behind it
    # (pipelined: the slack the controller's turnaround left, pipeline_depth.py)
    device_wait_s: float = 0.0


@dataclass
class StepInFlight:
    """A step handed to the ranks and not yet applied."""

    inputs: list[StepInput]  # what each replica's ranks run
    pending: list[list]  # per replica: Scheduler.advance's (request, output index) per sampled row
    # per replica: (request id, rows) of each chunk with prompt logprob rows, in order
    prompt_logprobs: Optional[list[list[tuple[str, int]]]] = None
    # a replica's step is grammar_late and its masks have not gone to the ranks yet
    awaits_grammar: bool = False
    # per replica: the sampled rows under a grammar (row, matcher) whose masks the step needs
    # before it goes out (EngineCore.attach_grammar); None once attached, or when none does
    grammar_rows: Optional[list] = None


class StepBuilder:
    """Builds each step from the schedulers' outputs (see the module docstring)."""

    def __init__(self, num_replicas: int, block_size: int, *, slot_rows: int, return_logits: bool = False) -> None:
        """``slot_rows``: sampled rows a step may have at most (half the ranks' buffer of
        sampled tokens, ``ModelRunner.recent_sampled``)."""
        self.block_size = block_size
        self.slot_rows = slot_rows
        self.return_logits = return_logits
        self._num_built = 0
        # per replica, for the last two steps built (newest last): request id -> where its
        # sampled token lands in the ranks' buffer
        self._sampled_at: list[collections.deque] = [collections.deque(maxlen=2) for _ in range(num_replicas)]

    def build(self, scheduled: Sequence[SchedulerOutput], pending: list[list]) -> StepInFlight:
        """``scheduled``: each replica's picks; ``pending``: each replica's ``advance`` result."""
        counts = tuple(o.num_tokens for o in scheduled)
        all_decode = all(len(c.token_ids) == 1 and c.sample for o in scheduled for c in o.chunks)
        slot = self._num_built % 2
        self._num_built += 1
        inputs, prompt_logprobs = [], []
        for replica, out in enumerate(scheduled):
            recent = self._sampled_at[replica]
            # a pending token is always a chunk's last, sampled by one of the two steps before
            assert all(PENDING_TOKEN not in c.token_ids[:-1] for c in out.chunks)
            prev_rows = [
                _sampled_at(recent, c.request_id) if c.token_ids[-1] == PENDING_TOKEN else -1 for c in out.chunks
            ]
            step = pack_step(
                out.chunks,
                counts,
                self.block_size,
                return_logits=self.return_logits,
                all_decode=all_decode,
                prev_rows=prev_rows,
                history_pending_at=[_history_pending_at(recent, c) for c in out.chunks],
                sample_slot=slot,
            )
            inputs.append(step)
            sampled = [c.request_id for c in out.chunks if c.sample]
            assert len(sampled) <= self.slot_rows, "more sampled rows than a slot of the ranks' buffer holds"
            recent.append({rid: slot * self.slot_rows + row for row, rid in enumerate(sampled)})
            prompt_logprobs.append(
                [(c.request_id, len(c.prompt_logprob_targets)) for c in out.chunks if c.prompt_logprob_targets]
            )
        return StepInFlight(inputs, pending, prompt_logprobs if any(prompt_logprobs) else None)


def _sampled_at(recent: collections.deque, request_id: str) -> int:
    for rows in reversed(recent):
        if request_id in rows:
            return rows[request_id]
    raise AssertionError(f"{request_id}: a pending token from no step in flight")


def _history_pending_at(recent: collections.deque, chunk: ScheduledChunk) -> list[int]:
    """Where the pending tokens at the end of ``chunk``'s history (for its penalties) land in
    the ranks' buffer, oldest first: one per step in flight that sampled the request."""
    pending = int(np.count_nonzero(np.asarray(chunk.history) == PENDING_TOKEN)) if len(chunk.history) else 0
    if not pending:
        return []
    at = [rows[chunk.request_id] for rows in recent if chunk.request_id in rows]
    assert len(at) >= pending, f"{chunk.request_id}: pending history tokens from no step in flight"
    return at[len(at) - pending :]


def pack_step(
    chunks: Sequence[ScheduledChunk],
    dp_token_counts: tuple[int, ...],
    block_size: int,
    *,
    return_logits: bool = False,
    all_decode: bool = False,
    prev_rows: Optional[Sequence[int]] = None,
    history_pending_at: Optional[Sequence[Sequence[int]]] = None,
    sample_slot: int = 0,
) -> StepInput:
    """Scheduler chunks -> columns. Pure. ``prev_rows``: where each chunk's pending input token
    is on the ranks (-1: none); ``history_pending_at``: the same for the pending tokens at the
    end of each chunk's history (sampling_controls.py)."""
    n = len(chunks)
    lens = np.fromiter((len(c.token_ids) for c in chunks), dtype=np.int64, count=n)
    start = np.fromiter((c.start_pos for c in chunks), dtype=np.int64, count=n)
    pages = (start + lens + block_size - 1) // block_size
    width = int(pages.max()) if n else 0
    tables = np.zeros((n, width), dtype=np.int32)
    for i, (c, p) in enumerate(zip(chunks, pages.tolist())):
        assert len(c.block_ids) >= p, "block table too short for the chunk"
        tables[i, :p] = c.block_ids[:p]
    ids = [t for c in chunks for t in c.token_ids]
    prev_rows = list(prev_rows) if prev_rows is not None else [-1] * n
    return StepInput(
        token_ids=np.array(ids, dtype=np.int64),
        query_lens=lens,
        start_pos=start,
        block_tables=tables,
        sample=np.fromiter((c.sample for c in chunks), dtype=bool, count=n),
        temperature=np.fromiter(
            (0.0 if c.sampling.greedy else c.sampling.temperature for c in chunks), dtype=np.float32, count=n
        ),
        top_k=np.fromiter((c.sampling.top_k for c in chunks), dtype=np.int64, count=n),
        top_p=np.fromiter((max(c.sampling.top_p, TOP_P_MIN) for c in chunks), dtype=np.float32, count=n),
        seed=np.fromiter((c.seed for c in chunks), dtype=np.int64, count=n),
        output_index=np.fromiter((c.num_output_tokens for c in chunks), dtype=np.int64, count=n),
        dp_token_counts=tuple(dp_token_counts),
        return_logits=return_logits,
        all_decode=all_decode,
        prev_rows=np.array(prev_rows, dtype=np.int64),
        sample_slot=sample_slot,
        logprobs=_logprobs_column(chunks),
        controls=pack_controls(chunks, history_pending_at or [[]] * n),
        **_prompt_logprob_columns(chunks, lens),
    )


def warmup_token_counts(max_tokens: int) -> list[int]:
    """Step sizes that reach every kernel variant a step of up to ``max_tokens`` tokens can
    pick: Triton specialises its kernels on block sizes from the next power of two of the
    token count and on whether integer arguments divide by 16, so each power of two and
    one past it (to the limit)."""
    counts, n = [], 1
    while n <= max_tokens:
        counts += [n, n + 1] if n + 1 <= max_tokens else [n]
        n *= 2
    return sorted(set(counts + [max_tokens]))


def warmup_step(num_tokens: int, block_size: int, scratch_block: int, dp_replicas: int, max_len: int) -> StepInput:
    """A prefill of ``num_tokens`` made-up tokens whose KV all lands in ``scratch_block`` (every
    replica the same), sampling nothing anyone reads: for compiling kernels before serving. Its
    sequences hold at most ``max_len`` tokens each (positions past the model's are past its
    rotary table)."""
    chunks = []
    for first in range(0, num_tokens, max_len):
        n = min(max_len, num_tokens - first)
        chunks.append(
            ScheduledChunk(
                request_id=f"warmup{len(chunks)}",
                token_ids=tuple(3 + t % 97 for t in range(n)),
                start_pos=0,
                block_ids=(scratch_block,) * -(-n // block_size),
                sample=True,
                sampling=SamplingParams(temperature=0.0),
                seed=0,
                num_output_tokens=0,
            )
        )
    return pack_step(chunks, (num_tokens,) * dp_replicas, block_size)


def _logprobs_column(chunks: Sequence[ScheduledChunk]) -> Optional[np.ndarray]:
    asked = [-1 if c.sampling.logprobs is None or not c.sample else c.sampling.logprobs for c in chunks]
    return np.array(asked, dtype=np.int64) if any(k >= 0 for k in asked) else None


def _prompt_logprob_columns(chunks: Sequence[ScheduledChunk], lens: np.ndarray) -> dict:
    asking = [(i, c) for i, c in enumerate(chunks) if c.prompt_logprob_targets]
    if not asking:
        return {}
    first_rows = np.concatenate([[0], np.cumsum(lens)[:-1]])
    rows = [
        first_rows[i] + c.prompt_logprob_offset + k for i, c in asking for k in range(len(c.prompt_logprob_targets))
    ]
    return dict(
        prompt_logprob_rows=np.array(rows, dtype=np.int64),
        prompt_logprob_targets=np.array([t for _, c in asking for t in c.prompt_logprob_targets], dtype=np.int64),
        prompt_logprob_top=max(c.sampling.prompt_logprobs for _, c in asking),
    )


@dataclass(frozen=True, kw_only=True)
class StepLayout:
    """The step at token level. Tensors are on the CPU; the runner moves what it needs."""

    input_ids: torch.Tensor  # [T] int64 (PENDING_TOKEN where prev_rows says where the token is)
    prev_rows: torch.Tensor  # [T] int64: row of the previous step's sampled tokens, or -1
    positions: torch.Tensor  # [T] int64
    slot_blocks: torch.Tensor  # [T] block holding each token's k/v
    slot_offsets: torch.Tensor  # [T] offset inside that block
    sample_rows: torch.Tensor  # [S] row of the last token of each chunk that samples
    query_start: np.ndarray  # [B + 1] first row of each chunk (cumulative)
    context_lens: np.ndarray  # [B] tokens in the cache after the step
    pages: np.ndarray  # [B] blocks each chunk's context spans
    block_tables: np.ndarray  # [B, W]

    @property
    def num_seqs(self) -> int:
        return int(self.context_lens.shape[0])

    def kv_indices(self) -> np.ndarray:
        """The blocks of every chunk's context, chunk after chunk (FlashInfer's page list)."""
        width = self.block_tables.shape[1]
        return self.block_tables[np.arange(width)[None, :] < self.pages[:, None]]


def build_step_layout(step: StepInput, block_size: int) -> StepLayout:
    """Flatten a step to token level. Pure, vectorised."""
    lens = step.query_lens
    cu = np.zeros(lens.shape[0] + 1, dtype=np.int64)
    np.cumsum(lens, out=cu[1:])
    row = np.repeat(np.arange(lens.shape[0]), lens)  # chunk of each token
    positions = step.start_pos[row] + (np.arange(step.num_tokens) - cu[row])
    context = step.start_pos + lens
    as_tensor = torch.from_numpy
    prev = np.full(step.num_tokens, -1, dtype=np.int64)
    if step.prev_rows is not None:
        pending = step.prev_rows >= 0  # such a chunk is its one pending token
        prev[cu[1:][pending] - 1] = step.prev_rows[pending]
    return StepLayout(
        input_ids=torch.tensor(step.token_ids),  # a copy: arrays unpickled from Ray are read-only
        prev_rows=as_tensor(prev),
        positions=as_tensor(positions),
        slot_blocks=as_tensor(step.block_tables[row, positions // block_size].astype(np.int64)),
        slot_offsets=as_tensor(positions % block_size),
        sample_rows=as_tensor(cu[1:][step.sample] - 1),
        query_start=cu,
        context_lens=context,
        pages=(context + block_size - 1) // block_size,
        block_tables=step.block_tables,
    )


def resolve_pending_tokens(
    input_ids: torch.Tensor, prev_rows: torch.Tensor, last_sampled: torch.Tensor
) -> torch.Tensor:
    """Input ids with each pending token taken from the previous step's sampled tokens
    (``last_sampled``, on the device): where prev_rows >= 0, last_sampled[prev_rows]."""
    return torch.where(prev_rows >= 0, last_sampled[prev_rows.clamp(min=0)], input_ids)
