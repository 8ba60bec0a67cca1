"""BlockPool: exact block ids, ref counts and free-queue order through allocate/share/release/cache."""

import pytest

from engine.block_pool import BlockPool, FreeBlockQueue, KVBlock


def test_free_queue_pops_head_appends_tail_and_removes_from_the_middle():
    blocks = [KVBlock(i) for i in range(5)]
    queue = FreeBlockQueue(blocks)
    assert queue.block_ids() == [0, 1, 2, 3, 4]
    queue.remove(blocks[2])
    assert queue.block_ids() == [0, 1, 3, 4] and len(queue) == 4
    assert queue.popleft() is blocks[0]
    queue.append(blocks[0])
    queue.append(blocks[2])
    assert queue.block_ids() == [1, 3, 4, 0, 2]
    for _ in range(5):
        queue.popleft()
    with pytest.raises(IndexError, match="no free blocks"):
        queue.popleft()


def test_allocate_release_keeps_exact_counts_and_lru_order():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    assert (a.block_id, b.block_id, a.ref_count, b.ref_count) == (0, 1, 1, 1)
    assert pool.num_free_blocks == 2
    pool.share([a])
    assert a.ref_count == 2
    pool.release([a, b])
    assert (a.ref_count, b.ref_count, pool.num_free_blocks) == (1, 0, 3)
    assert pool.free_queue.block_ids() == [2, 3, 1]  # the freed block goes to the tail: reused last
    with pytest.raises(MemoryError, match="asked for 4 KV blocks, 3 free"):
        pool.allocate(4)
    with pytest.raises(AssertionError, match="double free"):
        pool.release([b])


def test_cached_block_is_found_revived_from_the_middle_and_evicted_on_reuse():
    pool = BlockPool(3)
    (block,) = pool.allocate(1)
    pool.register(block, 1234, 99, b"tokens")
    assert pool.num_cached_blocks == 1
    pool.release([block])
    assert pool.free_queue.block_ids() == [1, 2, 0]
    assert pool.lookup(1234, 99, b"tokens") is block
    assert pool.lookup(1234, 99, b"other!") is None  # hash equal, tokens not: no hit
    assert pool.lookup(1234, 98, b"tokens") is None  # different parent chain: no hit
    pool.share([block])  # a hit on a free cached block pulls it out of the middle of the queue
    assert (block.ref_count, pool.free_queue.block_ids()) == (1, [1, 2])
    pool.release([block])
    assert [b.block_id for b in pool.allocate(3)] == [1, 2, 0]  # LRU: the cached block goes last
    assert pool.num_cached_blocks == 0 and pool.lookup(1234, 99, b"tokens") is None


def test_register_keeps_the_first_block_with_given_contents_and_respects_disabled_cache():
    pool = BlockPool(2)
    first, second = pool.allocate(2)
    pool.register(first, 7, 0, b"x")
    pool.register(second, 7, 0, b"x")
    assert (first.block_hash, second.block_hash, pool.num_cached_blocks) == (7, None, 1)
    disabled = BlockPool(1, enable_caching=False)
    (block,) = disabled.allocate(1)
    disabled.register(block, 7, 0, b"x")
    assert disabled.num_cached_blocks == 0
