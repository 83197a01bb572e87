import random

import pytest
import torch

from runtime.kv_cache import BlockAllocator, OutOfBlocksError, PagedKVCache, SequenceBlocks


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
    alloc, held = BlockAllocator(32), []
    for _ in range(1000):
        if held and (rng.random() < 0.5 or alloc.num_free == 0):
            alloc.free(held.pop(rng.randrange(len(held))))
        else:
            held.append(alloc.allocate(rng.randint(1, min(4, alloc.num_free))))
        in_use = [b for blocks in held for b in blocks]
        assert len(in_use) == len(set(in_use)) and len(in_use) + alloc.num_free == 32
