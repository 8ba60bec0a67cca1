"""Which sequences of a step share a KV prefix, for cascade attention (numpy only, no tensors).

Sharing is nested: the branches of one start state share that state's blocks, and, through the prefix
cache, different start states with the same instruction share its first blocks. Each sequence joins the
group of the longest prefix it shares with any other sequence of the step, so a state's branches meet
their whole common prefix in one pass even when other states share its first block.

A block id at table position j implies the blocks before it (forks copy the table, the prefix cache is
hash-chained), so a group is identified by (shared block count, last shared block id).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# A prefix group needs at least this many sequences to pay for its extra pass.
MIN_GROUP_SIZE = 2


@dataclass(frozen=True)
class PrefixGroups:
    seq_prefix_ids: np.ndarray  # int32 [num_seqs], -1 = no shared prefix
    prefix_lens: np.ndarray  # int32 [num_prefixes], whole blocks
    prefix_tables: np.ndarray  # int32 [num_prefixes, max_prefix_blocks], zero padded


def shared_prefix_groups(
    block_tables: np.ndarray,  # int32 [num_seqs, max_blocks]
    context_before: np.ndarray,  # int64 [num_seqs]: tokens already in the cache before this step's queries
    block_size: int,
) -> PrefixGroups:
    """Groups sequences by the longest run of whole blocks each shares with another sequence of the step."""
    num_seqs = block_tables.shape[0]
    no_groups = PrefixGroups(np.full(num_seqs, -1, np.int32), np.zeros(0, np.int32), np.zeros((0, 0), np.int32))
    full_blocks = np.minimum(context_before // block_size, block_tables.shape[1])  # [num_seqs]
    width = int(full_blocks.max()) if num_seqs else 0
    if num_seqs < MIN_GROUP_SIZE or width == 0:
        return no_groups
    columns = np.arange(width)
    # Blocks past a sequence's full context never match: give them ids no table holds.
    tables = np.where(columns < full_blocks[:, None], block_tables[:, :width].astype(np.int64),
                      -1 - np.arange(num_seqs)[:, None])
    order = np.lexsort(tables.T[::-1])  # lexicographic by block table
    sorted_tables = tables[order]
    equal = sorted_tables[1:] == sorted_tables[:-1]  # [num_seqs - 1, width]
    common = np.where(equal.all(axis=1), width, np.argmin(equal, axis=1))  # shared blocks with the next one
    shared = np.zeros(num_seqs, dtype=np.int64)
    shared[order] = np.maximum(np.concatenate([[0], common]), np.concatenate([common, [0]]))

    candidates = np.flatnonzero(shared > 0)
    if not len(candidates):
        return no_groups
    keys = np.stack([shared[candidates], block_tables[candidates, shared[candidates] - 1]], axis=1)
    unique_keys, group_of, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    kept = counts >= MIN_GROUP_SIZE
    if not kept.any():
        return no_groups
    new_ids = np.cumsum(kept) - 1  # group id -> prefix id among the kept groups
    seq_prefix_ids = no_groups.seq_prefix_ids
    member = kept[group_of.reshape(-1)]
    seq_prefix_ids[candidates[member]] = new_ids[group_of.reshape(-1)[member]]
    lens = unique_keys[kept, 0]
    first_member = np.zeros(len(lens), dtype=np.int64)
    first_member[seq_prefix_ids[candidates[member]]] = candidates[member]
    prefix_tables = np.where(np.arange(int(lens.max()))[None, :] < lens[:, None],
                             block_tables[first_member, : int(lens.max())], 0).astype(np.int32)
    return PrefixGroups(seq_prefix_ids, (lens * block_size).astype(np.int32), prefix_tables)
