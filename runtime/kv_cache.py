"""The paged KV cache: per-layer K/V pools of fixed-size blocks, a reference-counted block
manager, and one block table per sequence. A sequence takes blocks as it grows, shares full
blocks of a common prefix with other sequences, and gives its references back when it ends."""
from __future__ import annotations

import torch

from runtime.block_manager import BlockManager, OutOfBlocksError, block_hash

__all__ = ["OutOfBlocksError", "PagedKVCache", "SequenceBlocks", "bytes_per_token"]


class SequenceBlocks:
    """One sequence's block table, the number of tokens whose K/V it holds, and the chained
    hashes of its leading full blocks that are registered for sharing."""

    def __init__(self):
        self.blocks: list[int] = []
        self.num_tokens = 0
        self.hashes: list[int] = []


class PagedKVCache:
    def __init__(self, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, layer_devices: list[torch.device]):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks, block_size, n_kv_heads, head_dim)
        # one pool per device, [its layers, K or V, *shape]: a kernel that runs every layer
        # (runtime/persistent_decode.py) finds a layer's K and V at fixed strides from the start
        devices = list(dict.fromkeys(layer_devices))
        self.pools = [torch.zeros((layer_devices.count(d), 2, *shape), dtype=dtype, device=d)
                      for d in devices]
        taken = [0] * len(devices)
        self.layers = []
        for d in layer_devices:
            i = devices.index(d)
            self.layers.append(tuple(self.pools[i][taken[i]]))
            taken[i] += 1
        self.allocator = BlockManager(num_blocks)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def bytes_per_block(self) -> int:
        k, _ = self.layers[0]
        return 2 * len(self.layers) * k[0].numel() * k.element_size()

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def blocks_needed(self, seq: SequenceBlocks, new_tokens: int) -> int:
        return max(0, -(-(seq.num_tokens + new_tokens) // self.block_size) - len(seq.blocks))

    def grow(self, seq: SequenceBlocks, new_tokens: int) -> None:
        """Give seq the blocks for new_tokens more without counting them yet (reserve will)."""
        seq.blocks += self.allocator.allocate(self.blocks_needed(seq, new_tokens))

    def reserve(self, seq: SequenceBlocks, new_tokens: int) -> list[int]:
        """Grow seq's table to hold new_tokens more; returns their cache slots."""
        self.grow(seq, new_tokens)
        start = seq.num_tokens
        seq.num_tokens += new_tokens
        bs = self.block_size
        return [seq.blocks[p // bs] * bs + p % bs for p in range(start, seq.num_tokens)]

    def release(self, seq: SequenceBlocks) -> None:
        self.allocator.free(seq.blocks)
        seq.blocks, seq.num_tokens, seq.hashes = [], 0, []

    # ---- prefix sharing ----------------------------------------------------------------
    def share_prefix(self, seq: SequenceBlocks, token_ids: list[int]) -> int:
        """Point an empty seq at the cached blocks of token_ids' longest cached full-block
        prefix; returns how many tokens that covers. The last token is never covered, so there
        is always one to compute (its logits pick the next token) and it never lands in a
        shared block."""
        assert not seq.blocks, "share_prefix needs a sequence without blocks"
        bs, parent = self.block_size, None
        for i in range((len(token_ids) - 1) // bs):
            chunk = token_ids[i * bs:(i + 1) * bs]
            h = block_hash(parent, chunk)
            block = self.allocator.lookup(h, chunk)
            if block is None:
                break
            self.allocator.share(block)
            seq.blocks.append(block)
            seq.hashes.append(h)
            parent = h
        seq.num_tokens = len(seq.blocks) * bs
        return seq.num_tokens

    def register_full_blocks(self, seq: SequenceBlocks, token_ids: list[int], upto: int) -> None:
        """Offer seq's full blocks among its first `upto` tokens for sharing."""
        bs = self.block_size
        for i in range(len(seq.hashes), upto // bs):
            chunk = token_ids[i * bs:(i + 1) * bs]
            h = block_hash(seq.hashes[-1] if seq.hashes else None, chunk)
            self.allocator.register(seq.blocks[i], h, chunk)
            seq.hashes.append(h)


def bytes_per_token(num_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * n_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()
