"""KVCacheManager: exact block ids, ref counts and free counts through allocate/fork/append/COW/free,
prefix-cache hits and LRU reuse."""

from engine.kv_cache import KVCacheManager


def refs(kv: KVCacheManager) -> list[int]:
    return [block.ref_count for block in kv.pool.blocks]


def make(num_blocks: int = 8, version: str = "v1") -> KVCacheManager:
    return KVCacheManager(num_blocks, block_size=4, max_blocks_per_seq=6, weights_version=version)


def test_create_fork_cow_append_free_exact_ids_refs_and_free_counts():
    kv = make()
    tokens = list(range(100, 110))  # 10 tokens: two full blocks + a partial tail of 2
    assert kv.allocate(0, tokens, num_slots=10, max_cached_tokens=10) == 0
    assert kv.block_ids(0) == [0, 1, 2] and kv.num_free_blocks == 5
    kv.commit(0, tokens, 10)
    assert kv.pool.num_cached_blocks == 2  # only full blocks are cached

    kv.fork(0, 1)
    kv.fork(0, 2)
    assert kv.block_ids(1) == kv.block_ids(2) == [0, 1, 2]
    assert refs(kv) == [3, 3, 3, 0, 0, 0, 0, 0] and kv.num_free_blocks == 5  # fork copies nothing

    assert kv.blocks_to_append(1, 11) == 1  # the shared partial tail must be copied first
    assert kv.append_slots(1, 11) == [(2, 3)]
    assert kv.block_ids(1) == [0, 1, 3] and refs(kv)[:4] == [3, 3, 2, 1]
    assert kv.append_slots(1, 13) == []  # its own tail now: writes in place, one new block
    assert kv.block_ids(1) == [0, 1, 3, 4]
    assert kv.append_slots(2, 12) == [(2, 5)]
    assert refs(kv) == [3, 3, 1, 1, 1, 1, 0, 0] and kv.num_free_blocks == 2
    assert list(kv.table(2).block_ids[:4]) == [0, 1, 5, 0]

    kv.free(0)
    assert refs(kv) == [2, 2, 0, 1, 1, 1, 0, 0] and kv.pool.free_queue.block_ids() == [6, 7, 2]
    kv.free(1)
    kv.free(2)
    assert refs(kv) == [0] * 8 and kv.num_free_blocks == 8 and kv.num_used_blocks == 0
    # Tail blocks are freed first, so shared prefix blocks (0, 1) are evicted last.
    assert kv.pool.free_queue.block_ids() == [6, 7, 2, 4, 3, 5, 1, 0]
    assert kv.pool.num_cached_blocks == 2


def test_full_last_block_is_not_copied_on_write():
    kv = make()
    kv.allocate(0, list(range(8)), num_slots=8, max_cached_tokens=8)
    kv.fork(0, 1)
    assert kv.append_slots(1, 9) == [] and kv.block_ids(1) == [0, 1, 2]
    assert refs(kv)[:3] == [2, 2, 1]


def test_prefix_cache_hit_revives_freed_blocks_and_is_keyed_by_weights_version():
    kv = make()
    tokens = list(range(10))
    kv.allocate(0, tokens, num_slots=10, max_cached_tokens=10)
    kv.commit(0, tokens, 10)
    kv.free(0)
    assert kv.pool.free_queue.block_ids() == [3, 4, 5, 6, 7, 2, 1, 0]
    # Same first 8 tokens, different tail: two block hits, one new block from the head of the queue.
    assert kv.allocate(1, tokens[:8] + [55, 56], num_slots=10, max_cached_tokens=10) == 8
    assert kv.block_ids(1) == [0, 1, 3] and refs(kv)[:4] == [1, 1, 0, 1]
    assert (kv.num_prefix_queries, kv.num_prefix_hits) == (4, 2)
    # max_cached_tokens caps the hits (a branch must compute its last token itself).
    assert kv.allocate(2, tokens[:8], num_slots=8, max_cached_tokens=7) == 4
    assert kv.block_ids(2) == [0, 4]
    other = make(version="v2")
    other.allocate(0, tokens, num_slots=10, max_cached_tokens=10)
    other.commit(0, tokens, 10)
    assert other.table(0).hashes != kv.table(1).hashes[:2]  # a weight update can never hit old KV
    assert len(other.table(0).hashes) == 2


def test_lru_reuse_evicts_the_least_recently_freed_cached_block():
    kv = make(num_blocks=4)
    first, second = list(range(8)), list(range(50, 58))
    kv.allocate(0, first, num_slots=8, max_cached_tokens=8)
    kv.commit(0, first, 8)
    kv.free(0)  # free queue: [2, 3, 1, 0]; blocks 0 and 1 stay cached
    kv.allocate(1, second, num_slots=12, max_cached_tokens=0)  # takes 2, 3 and evicts cached block 1
    assert kv.block_ids(1) == [2, 3, 1] and kv.pool.num_cached_blocks == 1
    assert kv.allocate(2, first, num_slots=8, max_cached_tokens=8) is None  # block 0 hits, no room for block 1
    kv.free(1)
    assert kv.allocate(2, first, num_slots=8, max_cached_tokens=8) == 4  # block 0 survived: the first block hits
    assert kv.block_ids(2) == [0, 1]


def test_allocation_that_does_not_fit_changes_nothing():
    kv = make(num_blocks=2)
    assert kv.allocate(0, list(range(12)), num_slots=12, max_cached_tokens=0) is None
    assert not kv.has(0) and kv.num_free_blocks == 2
    kv.allocate(0, list(range(4)), num_slots=4, max_cached_tokens=0)
    assert kv.append_slots(0, 12) is None and kv.block_ids(0) == [0]
    assert kv.append_slots(0, 25) is None  # beyond max_blocks_per_seq even with blocks free
