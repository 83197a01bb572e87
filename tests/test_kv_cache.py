import random

import pytest
import torch

from runtime.block_manager import BlockManager
from runtime.kv_cache import OutOfBlocksError, PagedKVCache, SequenceBlocks


def _cache(num_blocks=8, block_size=4):
    return PagedKVCache(num_blocks, block_size, 2, 8, torch.float32, [torch.device("cpu")] * 3)


def test_pools_have_the_paged_layout_per_layer():
    cache = _cache()
    assert len(cache.layers) == 3
    k, v = cache.layers[0]
    assert k.shape == v.shape == (8, 4, 2, 8)
    assert cache.capacity_tokens == 32


def test_reserve_gives_slots_through_the_block_table():
    cache, seq = _cache(), SequenceBlocks()
    slots = cache.reserve(seq, 6)
    assert len(seq.blocks) == 2 and seq.num_tokens == 6
    assert slots == [seq.blocks[p // 4] * 4 + p % 4 for p in range(6)]
    more = cache.reserve(seq, 3)
    assert len(seq.blocks) == 3
    assert more == [seq.blocks[p // 4] * 4 + p % 4 for p in range(6, 9)]


def test_release_returns_blocks():
    cache, seq = _cache(), SequenceBlocks()
    cache.reserve(seq, 13)
    assert cache.allocator.num_free == 4
    cache.release(seq)
    assert cache.allocator.num_free == 8 and seq.blocks == [] and seq.num_tokens == 0


def test_out_of_blocks_is_an_error_not_an_overwrite():
    cache, a, b = _cache(num_blocks=3), SequenceBlocks(), SequenceBlocks()
    cache.reserve(a, 8)
    with pytest.raises(OutOfBlocksError, match="KV cache out of blocks: need 2, 1 free of 3"):
        cache.reserve(b, 5)
    assert cache.allocator.num_free == 1 and b.blocks == []


def test_allocator_never_hands_out_a_block_twice():
    rng = random.Random(0)
    alloc, held = BlockManager(32), []
    for _ in range(1000):
        if held and (rng.random() < 0.5 or alloc.num_free == 0):
            alloc.free(held.pop(rng.randrange(len(held))))
        else:
            held.append(alloc.allocate(rng.randint(1, min(4, alloc.num_free))))
        in_use = [b for blocks in held for b in blocks]
        assert len(in_use) == len(set(in_use)) and len(in_use) + alloc.num_free == 32


def test_bytes_per_block_counts_k_and_v_of_every_layer():
    assert _cache().bytes_per_block == 2 * 3 * 4 * 2 * 8 * 4


def test_grow_allocates_blocks_that_reserve_then_fills():
    cache, seq = _cache(), SequenceBlocks()
    cache.grow(seq, 6)
    assert len(seq.blocks) == 2 and seq.num_tokens == 0 and cache.allocator.num_free == 6
    assert cache.reserve(seq, 6) == [seq.blocks[p // 4] * 4 + p % 4 for p in range(6)]
    assert cache.allocator.num_free == 6


def test_a_shared_prefix_takes_cached_blocks_and_never_the_last_token():
    cache, a, b = _cache(), SequenceBlocks(), SequenceBlocks()
    tokens = list(range(12))
    cache.reserve(a, 12)
    cache.register_full_blocks(a, tokens, 12)
    # 12 tokens: 3 full blocks, but the last token must be computed, so 2 are shared
    assert cache.share_prefix(b, tokens) == 8 and b.blocks == a.blocks[:2]
    assert [cache.allocator.ref_count(x) for x in a.blocks] == [2, 2, 1]
    other = SequenceBlocks()
    assert cache.share_prefix(other, [0, 1, 2, 3, 9, 9, 9, 9, 9]) == 4   # diverges in block 2
    assert cache.share_prefix(SequenceBlocks(), [7] * 9) == 0
