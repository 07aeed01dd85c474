"""Paged KV-cache accounting: which fixed-size cache blocks each request holds (no tensors),
with prefix caching.

A request's block table (`req.block_ids`) lists its blocks in sequence order: token at
position p lives in block `block_ids[p // block_size]`, slot `p % block_size`.

Prefix caching: a full block whose KV has been computed gets a key, a digest of every token
up to its end (so equal keys mean equal prefixes, whatever the request). A new or resumed
request starts from the longest run of its leading full blocks that the cache holds, shared
with whoever else uses them, and computes only the rest; it always
computes at least its last token, so it never writes a shared block. A released block that
has a key stays cached until its slot is needed: allocation takes never-keyed free blocks
first, then evicts the least recently released cached one.
"""

from __future__ import annotations

import array
import collections
import hashlib
from typing import Optional, Sequence

from raymoe.actors.engine.request import PENDING_TOKEN, Request


def prefix_keys(token_ids: Sequence[int], block_size: int, num_blocks: int, first: bytes = b"") -> list[bytes]:
    """Keys of the first ``num_blocks`` full blocks of ``token_ids``: each a digest of the
    previous key (``first`` before the first block) and the block's tokens as signed 64-bit
    integers (a cryptographic digest: one user's prompt cannot be made to collide with
    another's cached blocks)."""
    data = array.array("q", token_ids[: num_blocks * block_size]).tobytes()
    step = 8 * block_size
    keys, previous = [], first
    for start in range(0, len(data), step):
        previous = hashlib.blake2b(previous + data[start : start + step], digest_size=16).digest()
        keys.append(previous)
    return keys


def request_block_keys(req: Request, num_blocks: int, block_size: int) -> list[bytes]:
    """The keys of `req`'s first `num_blocks` full blocks (all known tokens), computed once
    per block and kept on the request: a waiting request is looked up at every step."""
    keys = req.block_keys
    if len(keys) < num_blocks:
        start = len(keys) * block_size
        tokens = req.token_ids(start, num_blocks * block_size)
        assert PENDING_TOKEN not in tokens, f"{req.request_id}: a block key over a pending token"
        keys += prefix_keys(tokens, block_size, num_blocks - len(keys), first=keys[-1] if keys else b"")
    return keys[:num_blocks]


class BlockManager:
    """Hands out block ids in [0, num_blocks) and takes them back.

    Order is deterministic: never-keyed free ids form a LIFO stack, so a fresh manager
    hands out 0, 1, 2, ... and the most recently freed block is reused first. A block in use
    has its holders (more than one only for cached prefix blocks); freeing a block a request
    does not hold is an assertion error.
    """

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks: must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {block_size}")
        self._num_blocks = num_blocks
        self._block_size = block_size
        self.prefix_caching = prefix_caching
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # never keyed; top of stack = end
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # keyed, unused; LRU first
        self._holders: dict[int, set[str]] = {}  # blocks in use -> the requests holding them
        self._key_of: dict[int, bytes] = {}  # keyed blocks (in use or evictable) -> key
        self._block_of: dict[bytes, int] = {}  # key -> its block
        self._num_keyed: dict[str, int] = {}  # request id -> how many of its leading blocks are keyed
        self.num_cached_tokens = 0  # tokens of starting requests served from the cache since start
        self.num_started_tokens = 0  # tokens of starting requests (new or resumed) since start
        self.num_evictions = 0

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_free_blocks(self) -> int:
        """Blocks a request could take now (never keyed, or cached and unused)."""
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, in [0, 1]."""
        return 1.0 - self.num_free_blocks / self._num_blocks

    def blocks_needed(self, req: Request, num_tokens_after: int) -> int:
        """Extra blocks `req` needs so that its cache holds `num_tokens_after` tokens (>= 0)."""
        total = -(-num_tokens_after // self._block_size)
        return max(0, total - len(req.block_ids))

    def can_allocate(self, req: Request, num_tokens_after: int) -> bool:
        return self.blocks_needed(req, num_tokens_after) <= self.num_free_blocks

    def allocate(self, req: Request, num_tokens_after: int) -> None:
        """Append blocks to `req.block_ids` until it covers `num_tokens_after` tokens."""
        need = self.blocks_needed(req, num_tokens_after)
        if need > self.num_free_blocks:
            raise ValueError(
                f"num_tokens_after: {req.request_id} needs {need} more blocks for "
                f"{num_tokens_after} tokens but only {self.num_free_blocks} are free; check can_allocate first"
            )
        for _ in range(need):
            block = self._free.pop() if self._free else self._evict()
            assert block not in self._holders, f"block {block} is both free and in use"
            self._holders[block] = {req.request_id}
            req.block_ids.append(block)

    def cached_prefix(self, req: Request) -> tuple[list[int], Optional[bytes]]:
        """The blocks holding the longest cached run of `req`'s leading full blocks (a request
        holding no blocks, not asking for prompt logprobs), leaving at least its last token
        to compute; and the key of the full block after them (None: no further one)."""
        if not self.prefix_caching or req.block_ids or req.sampling.prompt_logprobs is not None:
            return [], None  # prompt logprobs need the prompt's logits: computed, not shared
        blocks: list[int] = []
        for key in request_block_keys(req, (_known_tokens(req) - 1) // self._block_size, self._block_size):
            block = self._block_of.get(key)
            if block is None:
                return blocks, key
            blocks.append(block)
        return blocks, None

    def keys_through(self, req: Request, num_tokens: int) -> list[bytes]:
        """Keys of `req`'s full blocks within its first `num_tokens` tokens (what computing
        them will let others share)."""
        if not self.prefix_caching:
            return []
        full = min(num_tokens, _known_tokens(req)) // self._block_size
        return request_block_keys(req, full, self._block_size)

    def can_start(self, req: Request, prefix: Sequence[int], num_tokens_after: int) -> bool:
        """Whether `req` can take `prefix` (from ``cached_prefix``) and blocks up to
        `num_tokens_after` tokens."""
        need = -(-num_tokens_after // self._block_size) - len(prefix)
        return need <= self.num_free_blocks - sum(b in self._evictable for b in prefix)

    def start(self, req: Request, prefix: Sequence[int]) -> None:
        """Give `req` (holding no blocks) the cached `prefix` (from ``cached_prefix``; may be
        empty): its KV counts as computed."""
        assert not req.block_ids and req.num_computed_tokens == 0
        self.num_started_tokens += req.num_tokens
        for block in prefix:
            if block in self._evictable:
                del self._evictable[block]
                self._holders[block] = set()
            self._holders[block].add(req.request_id)
            req.block_ids.append(block)
        req.num_computed_tokens = len(prefix) * self._block_size
        if not req.output_token_ids:  # what the client is told: the start that gives its first token
            req.num_cached_prompt_tokens = req.num_computed_tokens
        self._num_keyed[req.request_id] = len(prefix)
        self.num_cached_tokens += req.num_computed_tokens

    def register_computed(self, req: Request) -> None:
        """Key `req`'s full blocks whose KV is computed (or queued to be, behind the steps
        launched so far) and whose tokens are all known, so later requests can share them."""
        if not self.prefix_caching:
            return
        full = min(req.num_computed_tokens, _known_tokens(req)) // self._block_size
        done = self._num_keyed.setdefault(req.request_id, 0)
        if full <= done:
            return
        keys = request_block_keys(req, full, self._block_size)
        self._num_keyed[req.request_id] = full
        for block, key in zip(req.block_ids[done:full], keys[done:]):
            if key not in self._block_of and block not in self._key_of:
                self._block_of[key], self._key_of[block] = block, key

    def free(self, req: Request) -> None:
        """Release all of `req`'s blocks and clear its block table; keyed ones stay cached."""
        # In reverse: the free stack hands the first block out first, and the cache evicts a
        # prefix's tail before its head.
        for block in reversed(req.block_ids):
            holders = self._holders.get(block, set())
            assert req.request_id in holders, f"block {block} freed by {req.request_id}, which does not hold it"
            holders.remove(req.request_id)
            if holders:
                continue
            del self._holders[block]
            if block in self._key_of:
                self._evictable[block] = None
            else:
                self._free.append(block)
        req.block_ids.clear()
        self._num_keyed.pop(req.request_id, None)
        assert len(self._free) + len(self._evictable) + len(self._holders) == self._num_blocks

    def _evict(self) -> int:
        block, _ = self._evictable.popitem(last=False)
        del self._block_of[self._key_of.pop(block)]
        self.num_evictions += 1
        return block


def _known_tokens(req: Request) -> int:
    """How many of `req`'s leading tokens are known (its pending outputs sit at the end)."""
    known, outputs = req.num_tokens, req.output_token_ids
    while known > req.num_prompt_tokens and outputs[known - req.num_prompt_tokens - 1] == PENDING_TOKEN:
        known -= 1
    return known
