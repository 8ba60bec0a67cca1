"""Cascade grouping: each sequence joins the longest block prefix it shares with another sequence."""

from __future__ import annotations

import numpy as np
import torch

from engine.model_runner import allocate_kv_caches
from engine.models.llama import LlamaConfig
from engine.prefix_sharing import shared_prefix_groups
from kernels import torch_attention

BLOCK = 4


def tables(*rows: list[int]) -> np.ndarray:
    width = max(len(row) for row in rows)
    return np.array([row + [0] * (width - len(row)) for row in rows], dtype=np.int32)


def test_nested_sharing_groups_each_state_by_its_whole_prefix():
    # Two states share block 7 (same instruction start, via the prefix cache); state A = [7, 1, 2],
    # state B = [7, 3]; two branches each, then their private blocks.
    block_tables = tables([7, 1, 2, 10, 11], [7, 1, 2, 12, 13], [7, 3, 20, 21], [7, 3, 22, 23])
    context_before = np.array([18, 18, 14, 14])
    groups = shared_prefix_groups(block_tables, context_before, BLOCK)
    assert groups.seq_prefix_ids.tolist() == [1, 1, 0, 0]  # group ids ordered by (shared blocks, last block)
    assert groups.prefix_lens.tolist() == [8, 12]
    assert groups.prefix_tables.tolist() == [[7, 3, 0], [7, 1, 2]]


def test_a_lone_sequence_and_the_partial_block_are_not_shared():
    # Seqs 0 and 1 share blocks [5, 6] but seq 1 has only 6 tokens before its queries: one whole block.
    # Seq 2 shares nothing; seq 3 shares only block 5 with them, so the three share exactly one block.
    block_tables = tables([5, 6, 8], [5, 6, 9], [30, 31], [5, 40])
    context_before = np.array([10, 6, 8, 8])
    groups = shared_prefix_groups(block_tables, context_before, BLOCK)
    assert groups.seq_prefix_ids.tolist() == [0, 0, -1, 0]
    assert groups.prefix_lens.tolist() == [4]
    assert groups.prefix_tables.tolist() == [[5]]


def test_no_sharing_and_single_sequences_give_no_groups():
    for block_tables, context_before in ((tables([1, 2], [3, 4]), np.array([8, 8])),
                                         (tables([1, 2]), np.array([8])),
                                         (tables([1, 2], [1, 3]), np.array([3, 3]))):  # no whole block yet
        groups = shared_prefix_groups(block_tables, context_before, BLOCK)
        assert groups.seq_prefix_ids.tolist() == [-1] * len(context_before)
        assert groups.prefix_lens.shape == (0,)


def test_cpu_kv_cache_is_heads_major_behind_the_kernel_shape():
    config = LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=8, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8)
    hnd = allocate_kv_caches(config, 5, BLOCK, torch.float32, torch.device("cpu"), heads_major=True)
    nhd = allocate_kv_caches(config, 5, BLOCK, torch.float32, torch.device("cpu"), heads_major=False)
    assert hnd.shape == nhd.shape == (2, 2, 5, BLOCK, 2, 4)
    assert nhd.is_contiguous() and torch_attention.heads_major_view(nhd[0, 0]) is None
    assert torch_attention.heads_major_view(hnd[1, 0]) is not None
    hnd[1, 0, 3, 2, 1] = 1.0  # block 3, offset 2, kv head 1 is one [D] row of head 1's tile
    assert torch_attention.heads_major_view(hnd[1, 0])[1, 3, 2].tolist() == [1.0] * 4
