"""The paged KV cache: per-layer K/V pools of fixed-size blocks, a free-list allocator, and one
block table per sequence. A sequence takes blocks as it grows and gives them back when it ends."""
from __future__ import annotations

import torch


class OutOfBlocksError(RuntimeError):
    """The cache has no free block left for a sequence that needs one."""


class BlockAllocator:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        # a stack: the most recently freed block is reused first, while it is still warm in cache
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfBlocksError(
                f"KV cache out of blocks: need {count}, {len(self._free)} free of "
                f"{self.num_blocks}; raise kv_cache_tokens or shorten the batch")
        taken = self._free[len(self._free) - count:][::-1]
        del self._free[len(self._free) - count:]
        return taken

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class SequenceBlocks:
    """One sequence's block table and the number of tokens whose K/V it holds."""

    def __init__(self):
        self.blocks: list[int] = []
        self.num_tokens = 0


class PagedKVCache:
    def __init__(self, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, layer_devices: list[torch.device]):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks, block_size, n_kv_heads, head_dim)
        self.layers = [(torch.zeros(shape, dtype=dtype, device=d), torch.zeros(shape, dtype=dtype, device=d))
                       for d in layer_devices]
        self.allocator = BlockAllocator(num_blocks)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_needed(self, seq: SequenceBlocks, new_tokens: int) -> int:
        total = seq.num_tokens + new_tokens
        return max(0, -(-total // self.block_size) - len(seq.blocks))

    def reserve(self, seq: SequenceBlocks, new_tokens: int) -> list[int]:
        """Grow seq's table to hold new_tokens more; returns their cache slots."""
        seq.blocks += self.allocator.allocate(self.blocks_needed(seq, new_tokens))
        start = seq.num_tokens
        seq.num_tokens += new_tokens
        bs = self.block_size
        return [seq.blocks[p // bs] * bs + p % bs for p in range(start, seq.num_tokens)]

    def release(self, seq: SequenceBlocks) -> None:
        self.allocator.free(seq.blocks)
        seq.blocks = []
        seq.num_tokens = 0


def bytes_per_token(num_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * n_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()
