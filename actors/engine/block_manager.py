"""Paged KV-cache accounting: which fixed-size cache blocks each request owns (no tensors).

A request's block table (`req.block_ids`) lists its blocks in sequence order: token at
position p lives in block `block_ids[p // block_size]`, slot `p % block_size`.
"""

from __future__ import annotations

from raymoe.actors.engine.request import Request


class BlockManager:
    """Hands out block ids in [0, num_blocks) and takes them back.

    Order is deterministic: free ids form a LIFO stack, so a fresh manager hands out
    0, 1, 2, ... and the most recently freed block is reused first (its cache lines are
    the likeliest to still be warm). Every allocated block has exactly one owner; freeing
    a block twice or a block owned by someone else is an assertion error.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks: must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {block_size}")
        self._num_blocks = num_blocks
        self._block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # top of stack = end
        self._owner: dict[int, str] = {}  # block id -> request id, for allocated blocks only

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, in [0, 1]."""
        return 1.0 - len(self._free) / self._num_blocks

    def blocks_needed(self, req: Request, num_tokens_after: int) -> int:
        """Extra blocks `req` needs so that its cache holds `num_tokens_after` tokens (>= 0)."""
        total = -(-num_tokens_after // self._block_size)
        return max(0, total - len(req.block_ids))

    def can_allocate(self, req: Request, num_tokens_after: int) -> bool:
        return self.blocks_needed(req, num_tokens_after) <= len(self._free)

    def allocate(self, req: Request, num_tokens_after: int) -> None:
        """Append blocks to `req.block_ids` until it covers `num_tokens_after` tokens."""
        need = self.blocks_needed(req, num_tokens_after)
        if need > len(self._free):
            raise ValueError(
                f"num_tokens_after: {req.request_id} needs {need} more blocks for "
                f"{num_tokens_after} tokens but only {len(self._free)} are free; check can_allocate first"
            )
        for _ in range(need):
            block = self._free.pop()
            assert block not in self._owner, f"block {block} is both free and owned"
            self._owner[block] = req.request_id
            req.block_ids.append(block)

    def free(self, req: Request) -> None:
        """Return all of `req`'s blocks to the pool and clear its block table."""
        # Push in reverse so the request's first block is on top and is handed out first.
        for block in reversed(req.block_ids):
            owner = self._owner.pop(block, None)
            assert owner == req.request_id, f"block {block} freed by {req.request_id} but owned by {owner}"
            self._free.append(block)
        req.block_ids.clear()
        assert len(self._free) + len(self._owner) == self._num_blocks
