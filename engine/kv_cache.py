"""Per-sequence block tables over the BlockPool: allocate (with prefix-cache hits), fork, append with
copy-on-write of a shared partial tail block, commit (hash newly full blocks), free.

A sequence here is only an id with a token count: the manager knows nothing of states or branches.
Fork shares every block (ref + 1) and copies nothing; the one partial tail block is copied only when a
child first writes into it while someone else still holds it. Full blocks are keyed by the chain
hash H(parent_hash, block_tokens) seeded with the weights version, so a new checkpoint can never hit
KV computed by old weights, and every hit is checked against the stored tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import xxhash

from .block_pool import BlockPool, KVBlock


@dataclass
class BlockTable:
    """The blocks of one sequence, in token order, and the chain hashes of its committed full blocks."""

    blocks: list[KVBlock]
    block_ids: np.ndarray  # int32 [max_blocks_per_seq]; entries past len(blocks) are 0 and never read
    num_slots: int = 0  # token slots handed out (tokens whose KV is or is being written)
    hashes: list[int] = field(default_factory=list)  # hashes[i] keys full block i (committed blocks only)


class KVCacheManager:
    """Block tables of all sequences; the only user of the BlockPool."""

    def __init__(self, num_blocks: int, block_size: int, max_blocks_per_seq: int, enable_prefix_caching: bool = True,
                 weights_version: str = "") -> None:
        self.block_size = block_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.enable_prefix_caching = enable_prefix_caching
        self._root_hash = xxhash.xxh3_64_intdigest(b"vla-mbpo-kv\0" + weights_version.encode())
        self._tables: dict[int, BlockTable] = {}
        self.num_prefix_queries = 0  # full blocks looked up
        self.num_prefix_hits = 0  # full blocks found

    # ---- queries ------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_blocks - self.pool.num_free_blocks

    def has(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def table(self, seq_id: int) -> BlockTable:
        return self._tables[seq_id]

    def block_ids(self, seq_id: int) -> list[int]:
        return [block.block_id for block in self._tables[seq_id].blocks]

    def num_blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- allocation ---------------------------------------------------------------------------
    def allocate(self, seq_id: int, token_ids: Sequence[int], num_slots: int, max_cached_tokens: int) -> int | None:
        """Gives a new sequence slots for its first `num_slots` tokens, reusing cached full blocks of
        `token_ids` up to `max_cached_tokens` tokens. Returns the number of tokens found in the cache
        (their KV need not be computed), or None when the free blocks do not suffice (nothing changes)."""
        assert seq_id not in self._tables, f"sequence {seq_id} already has blocks"
        hits, hashes = self._find_cached_prefix(token_ids, max_cached_tokens)
        num_cached = len(hits) * self.block_size
        num_slots = max(num_slots, num_cached)
        num_new = self.num_blocks_needed(num_slots) - len(hits)
        reviving = sum(1 for block in hits if block.ref_count == 0)  # cached-free hits leave the free queue
        too_long = self.num_blocks_needed(num_slots) > self.max_blocks_per_seq
        if too_long or num_new + reviving > self.pool.num_free_blocks:
            return None
        self.pool.share(hits)
        blocks = hits + self.pool.allocate(num_new)
        ids = np.zeros(self.max_blocks_per_seq, dtype=np.int32)
        ids[: len(blocks)] = [block.block_id for block in blocks]
        self._tables[seq_id] = BlockTable(blocks, ids, num_slots, hashes)
        if self.enable_prefix_caching:
            self.num_prefix_queries += min(len(token_ids), max_cached_tokens) // self.block_size
        self.num_prefix_hits += len(hits)
        return num_cached

    def _find_cached_prefix(self, token_ids: Sequence[int], max_cached_tokens: int) -> tuple[list[KVBlock], list[int]]:
        if not self.enable_prefix_caching:
            return [], []
        hits, hashes, parent = [], [], self._root_hash
        for start in range(0, max_cached_tokens - self.block_size + 1, self.block_size):
            token_bytes = np.asarray(token_ids[start:start + self.block_size], dtype=np.int64).tobytes()
            block_hash = self._chain_hash(parent, token_bytes)
            block = self.pool.lookup(block_hash, parent, token_bytes)
            if block is None:
                break
            hits.append(block)
            hashes.append(block_hash)
            parent = block_hash
        return hits, hashes

    def _chain_hash(self, parent_hash: int, token_bytes: bytes) -> int:
        return xxhash.xxh3_64_intdigest(parent_hash.to_bytes(8, "little") + token_bytes)

    def fork(self, parent_id: int, child_id: int) -> None:
        """The child shares every block of the parent (ref + 1 each); nothing is copied."""
        assert child_id not in self._tables, f"sequence {child_id} already has blocks"
        parent = self._tables[parent_id]
        self.pool.share(parent.blocks)
        self._tables[child_id] = BlockTable(list(parent.blocks), parent.block_ids.copy(), parent.num_slots,
                                            list(parent.hashes))

    def blocks_to_append(self, seq_id: int, num_slots: int) -> int:
        """Free blocks that append_slots(seq_id, num_slots) would take (new blocks + a copy-on-write copy)."""
        table = self._tables[seq_id]
        if num_slots <= table.num_slots:
            return 0
        cow = 1 if table.num_slots % self.block_size and table.blocks[-1].ref_count > 1 else 0
        return self.num_blocks_needed(num_slots) - len(table.blocks) + cow

    def append_slots(self, seq_id: int, num_slots: int) -> list[tuple[int, int]] | None:
        """Grows the sequence to `num_slots` token slots. Returns the (src, dst) block copies the model
        runner must make first (a shared partial tail being written), or None if blocks run short."""
        table = self._tables[seq_id]
        needed = self.blocks_to_append(seq_id, num_slots)
        if needed > self.pool.num_free_blocks or self.num_blocks_needed(num_slots) > self.max_blocks_per_seq:
            return None
        copies = []
        if needed and table.num_slots % self.block_size and table.blocks[-1].ref_count > 1:
            shared = table.blocks[-1]
            (private,) = self.pool.allocate(1)
            self.pool.release([shared])
            table.blocks[-1] = private
            table.block_ids[len(table.blocks) - 1] = private.block_id
            copies.append((shared.block_id, private.block_id))
            needed -= 1
        if needed:
            first = len(table.blocks)
            new_blocks = self.pool.allocate(needed)
            table.blocks.extend(new_blocks)
            table.block_ids[first:first + needed] = [block.block_id for block in new_blocks]
        table.num_slots = max(table.num_slots, num_slots)
        return copies

    def commit(self, seq_id: int, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Registers the sequence's full blocks whose KV is now computed in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        table = self._tables[seq_id]
        num_full = min(num_computed_tokens // self.block_size, len(table.blocks))
        parent = table.hashes[-1] if table.hashes else self._root_hash
        for index in range(len(table.hashes), num_full):
            start = index * self.block_size
            token_bytes = np.asarray(token_ids[start:start + self.block_size], dtype=np.int64).tobytes()
            block_hash = self._chain_hash(parent, token_bytes)
            self.pool.register(table.blocks[index], block_hash, parent, token_bytes)
            table.hashes.append(block_hash)
            parent = block_hash

    def free(self, seq_id: int) -> None:
        """Drops the sequence's blocks; tail blocks first, so they are evicted before shared prefixes."""
        table = self._tables.pop(seq_id)
        self.pool.release(reversed(table.blocks))
