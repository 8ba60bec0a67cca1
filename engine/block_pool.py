"""Fixed-size KV blocks: ref counts, an LRU free queue and the prefix-cache index of full blocks.

A block with ref_count 0 sits in the free queue. If it also has a hash it stays findable in the
prefix cache until the queue hands it out again (then its hash is dropped): freed blocks are reused
least-recently-freed first, and a cache hit pulls a block out of the middle of the queue in O(1).
"""

from __future__ import annotations

from collections.abc import Iterable


class KVBlock:
    """One block of block_size token slots in every layer's KV cache."""

    __slots__ = ("block_id", "ref_count", "block_hash", "parent_hash", "token_bytes", "prev_free", "next_free")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: int | None = None  # set while the block is in the prefix cache
        self.parent_hash: int | None = None  # the chain link, checked on hits with the tokens
        self.token_bytes: bytes | None = None  # the block's token ids, checked on every hit
        self.prev_free: KVBlock | None = None
        self.next_free: KVBlock | None = None

    def __repr__(self) -> str:
        return f"KVBlock(id={self.block_id}, ref={self.ref_count}, hash={self.block_hash})"


class FreeBlockQueue:
    """Doubly linked list of free blocks: pop from the head, append at the tail, remove from anywhere."""

    def __init__(self, blocks: Iterable[KVBlock]) -> None:
        self._head = KVBlock(-1)  # sentinels keep every operation branch-free
        self._tail = KVBlock(-1)
        self._head.next_free, self._tail.prev_free = self._tail, self._head
        self.num_blocks = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self.num_blocks

    def append(self, block: KVBlock) -> None:
        last = self._tail.prev_free
        last.next_free, block.prev_free = block, last
        block.next_free, self._tail.prev_free = self._tail, block
        self.num_blocks += 1

    def popleft(self) -> KVBlock:
        block = self._head.next_free
        if block is self._tail:
            raise IndexError("no free blocks")
        self.remove(block)
        return block

    def remove(self, block: KVBlock) -> None:
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self.num_blocks -= 1

    def block_ids(self) -> list[int]:
        """Free block ids in the order they will be handed out (for tests and stats)."""
        ids, block = [], self._head.next_free
        while block is not self._tail:
            ids.append(block.block_id)
            block = block.next_free
        return ids


class BlockPool:
    """Owns every KVBlock: allocation, ref counting and the hash -> block prefix-cache index."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0, got {num_blocks}")
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.enable_caching = enable_caching
        self._cached: dict[int, KVBlock] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (cached ones with ref 0 included)."""
        return len(self.free_queue)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks currently findable in the prefix cache (in use or free)."""
        return len(self._cached)

    def allocate(self, num_blocks: int) -> list[KVBlock]:
        """Takes `num_blocks` blocks from the head of the free queue (ref 1), evicting their cache entries."""
        if num_blocks > len(self.free_queue):
            raise MemoryError(f"asked for {num_blocks} KV blocks, {len(self.free_queue)} free")
        blocks = []
        for _ in range(num_blocks):
            block = self.free_queue.popleft()
            if block.block_hash is not None:
                del self._cached[block.block_hash]
                block.block_hash = block.parent_hash = block.token_bytes = None
            block.ref_count = 1
            blocks.append(block)
        return blocks

    def share(self, blocks: Iterable[KVBlock]) -> None:
        """One more owner for each block (a fork, or a prefix-cache hit); revives free cached blocks."""
        for block in blocks:
            if block.ref_count == 0:
                self.free_queue.remove(block)
            block.ref_count += 1

    def release(self, blocks: Iterable[KVBlock]) -> None:
        """One owner fewer; a block reaching 0 joins the tail of the free queue (staying cached)."""
        for block in blocks:
            assert block.ref_count > 0, f"double free of {block}"
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue.append(block)

    def lookup(self, block_hash: int, parent_hash: int | None, token_bytes: bytes) -> KVBlock | None:
        """The cached block for this chain link, if its parent and tokens really match (no hash trust)."""
        block = self._cached.get(block_hash)
        if block is None or block.parent_hash != parent_hash or block.token_bytes != token_bytes:
            return None
        return block

    def register(self, block: KVBlock, block_hash: int, parent_hash: int | None, token_bytes: bytes) -> None:
        """Makes a full, computed block findable. The first block with given contents stays the cached one."""
        if not self.enable_caching or block.block_hash is not None or block_hash in self._cached:
            return
        block.block_hash, block.parent_hash, block.token_bytes = block_hash, parent_hash, token_bytes
        self._cached[block_hash] = block
