"""KV-cache blocks with reference counts and prefix sharing.

Every full block of a sequence gets a hash chained on its parent block's hash, so equal hashes
mean equal prefixes up to and including that block. A new sequence re-uses the cached blocks of
its longest cached full-block prefix (one more reference each) instead of computing them again.
A block whose last reference goes keeps its hash and contents; it is evicted, least recently
freed first, only when a fresh block is needed. A block in use is never handed out again.
"""
from __future__ import annotations

from collections import OrderedDict


class OutOfBlocksError(RuntimeError):
    """The cache has no free block left for a sequence that needs one."""


def block_hash(parent: int | None, tokens) -> int:
    return hash((parent, tuple(tokens)))


class BlockManager:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        # a stack: the most recently freed block is reused first, while it is still warm in cache
        self._free = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, int] = {}           # block -> hash, for registered blocks
        self._tokens_of: dict[int, tuple] = {}       # block -> its tokens, to rule out collisions
        self._block_of: dict[int, int] = {}          # hash -> block
        self._evictable: OrderedDict[int, None] = OrderedDict()   # ref 0 but cached, LRU first

    # ---- counts ------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks a new allocation may take: never used, or cached with no reference."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    # ---- fresh blocks ------------------------------------------------------------------
    def allocate(self, count: int) -> list[int]:
        """count fresh blocks with one reference each."""
        if count == 0:   # most decode steps: the last block still has room
            return []
        if count > self.num_free:
            raise OutOfBlocksError(
                f"KV cache out of blocks: need {count}, {self.num_free} free of "
                f"{self.num_blocks}; raise kv_cache_tokens or shorten the batch")
        taken = [self._take_fresh() for _ in range(count)]
        for block in taken:
            self._refs[block] = 1
        return taken

    def _take_fresh(self) -> int:
        if self._free:
            return self._free.pop()
        block, _ = self._evictable.popitem(last=False)
        self._forget(block)
        return block

    def free(self, blocks: list[int]) -> None:
        """Drop one reference from each block; the last one makes it free (or cached)."""
        for block in reversed(blocks):
            if self._refs[block] <= 0:
                raise RuntimeError(f"block {block} freed more often than it was taken")
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    # ---- prefix sharing ----------------------------------------------------------------
    def register(self, block: int, hash_value: int, tokens) -> None:
        """Record that block (in use) holds the full block of tokens with this chained hash.
        A hash already held by another block keeps that block: one copy is enough."""
        if hash_value in self._block_of or block in self._hash_of:
            return
        self._hash_of[block] = hash_value
        self._tokens_of[block] = tuple(tokens)
        self._block_of[hash_value] = block

    def lookup(self, hash_value: int, tokens) -> int | None:
        block = self._block_of.get(hash_value)
        if block is None or self._tokens_of[block] != tuple(tokens):
            return None
        return block

    def share(self, block: int) -> None:
        """One more reference to a cached block (it stops being evictable)."""
        if self._refs[block] == 0:
            del self._evictable[block]
        self._refs[block] += 1

    def clear_cache(self) -> None:
        """Forget every hash (after a failed step the contents of new blocks are unknown)."""
        for block in list(self._hash_of):
            self._forget(block)
        self._free.extend(self._evictable)
        self._evictable.clear()

    def _forget(self, block: int) -> None:
        del self._block_of[self._hash_of.pop(block)]
        del self._tokens_of[block]
