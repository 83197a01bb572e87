"""BlockManager: reference counts, chained-hash prefix sharing, LRU eviction of cached blocks."""
import random

import pytest
import torch

from runtime.block_manager import BlockManager, OutOfBlocksError, block_hash
from runtime.kv_cache import PagedKVCache, SequenceBlocks


def _cached(manager, tokens, parent=None):
    """One block holding `tokens`, registered and then freed: cached with no reference."""
    [block] = manager.allocate(1)
    h = block_hash(parent, tokens)
    manager.register(block, h, tokens)
    manager.free([block])
    return block, h


def test_hashes_chain_on_the_parent():
    assert block_hash(None, [1, 2]) == block_hash(None, (1, 2))
    assert block_hash(None, [1, 2]) != block_hash(block_hash(None, [0]), [1, 2])


def test_a_freed_registered_block_stays_cached_and_can_be_shared():
    m = BlockManager(4)
    block, h = _cached(m, [5, 6])
    assert m.num_free == 4 and m.num_cached == 1
    assert m.lookup(h, [5, 6]) == block and m.lookup(h, [5, 7]) is None   # a collision is no hit
    m.share(block)
    assert m.ref_count(block) == 1 and m.num_free == 3
    m.share(block)
    m.free([block])
    assert m.ref_count(block) == 1


def test_never_used_blocks_go_before_cached_ones_then_least_recently_freed_first():
    m = BlockManager(3)
    a, ha = _cached(m, [1])
    b, hb = _cached(m, [2])
    fresh = m.allocate(1)
    assert fresh[0] not in (a, b) and m.num_cached == 2
    assert m.allocate(1) == [a] and m.lookup(ha, [1]) is None and m.lookup(hb, [2]) == b


def test_a_block_in_use_is_never_handed_out():
    m = BlockManager(2)
    block, h = _cached(m, [1])
    m.share(block)
    other = m.allocate(1)
    assert other != [block]
    with pytest.raises(OutOfBlocksError, match="KV cache out of blocks: need 1, 0 free of 2"):
        m.allocate(1)


def test_the_first_block_registered_under_a_hash_keeps_it():
    m = BlockManager(2)
    a, b = m.allocate(2)
    h = block_hash(None, [3])
    m.register(a, h, [3])
    m.register(b, h, [3])
    m.register(a, block_hash(None, [4]), [4])   # a block has one hash for life
    m.free([a, b])
    assert m.lookup(h, [3]) == a and m.num_cached == 1


def test_freeing_a_free_block_is_an_error():
    m = BlockManager(2)
    with pytest.raises(RuntimeError, match="block 1 freed more often than it was taken"):
        m.free([1])


def test_clear_cache_forgets_every_hash():
    m = BlockManager(3)
    _, h = _cached(m, [1])
    [held] = m.allocate(1)
    m.register(held, block_hash(None, [2]), [2])
    m.clear_cache()
    assert m.num_cached == 0 and m.lookup(h, [1]) is None and m.num_free == 2
    m.free([held])
    assert m.num_free == 3


def test_fuzz_sequences_share_grow_and_release_without_leaks():
    rng = random.Random(7)
    cache = PagedKVCache(24, 4, 1, 4, torch.float32, [torch.device("cpu")])
    prefixes = [[rng.randrange(50) for _ in range(16)] for _ in range(3)]
    live: list[tuple[SequenceBlocks, list[int]]] = []
    for _ in range(1000):
        if live and (rng.random() < 0.4 or cache.allocator.num_free < 6):
            seq, _ = live.pop(rng.randrange(len(live)))
            cache.release(seq)
        elif live and rng.random() < 0.5:
            seq, tokens = rng.choice(live)
            grow = rng.randint(1, 5)
            if cache.blocks_needed(seq, grow) <= cache.allocator.num_free:
                tokens += [rng.randrange(50) for _ in range(grow)]
                cache.reserve(seq, grow)
                cache.register_full_blocks(seq, tokens, seq.num_tokens)
        else:
            tokens = rng.choice(prefixes)[:rng.randint(1, 16)] + [rng.randrange(50)]
            seq = SequenceBlocks()
            cache.share_prefix(seq, tokens)
            cache.reserve(seq, len(tokens) - seq.num_tokens)
            cache.register_full_blocks(seq, tokens, seq.num_tokens)
            live.append((seq, tokens))
        held = [b for seq, _ in live for b in seq.blocks]
        for block in set(held):
            assert cache.allocator.ref_count(block) == held.count(block)
        assert cache.num_blocks - cache.allocator.num_free == len(set(held))
    for seq, _ in live:
        cache.release(seq)
    assert cache.allocator.num_free == 24
    assert all(cache.allocator.ref_count(b) == 0 for b in range(24))
