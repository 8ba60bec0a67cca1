"""Builders of small paged-attention batches for the kernel tests: a random KV cache, block tables laid out
the way the engine's block pool would (shuffled block ids, shared prefix blocks, copy-on-write of a
prefix's last partial block), and the ragged query metadata."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Tolerances against the float32 reference. The fp16/bf16 inputs are exact in float32, so the only
# differences are accumulation order and the final rounding of the output (bf16: 8 bits of mantissa).
TOLERANCES = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 1.6e-2, "rtol": 1.6e-2},
}


@dataclass(frozen=True)
class Branch:
    """A sequence: seq_len tokens of context (including its q_len new queries)."""

    seq_len: int
    q_len: int


@dataclass(frozen=True)
class PrefixGroup:
    """Branches that share the first prefix_len tokens; each branch's seq_len counts the prefix too."""

    prefix_len: int
    branches: tuple[Branch, ...]


@dataclass
class PagedBatch:
    query: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks]
    seq_lens: torch.Tensor  # int32 [num_seqs]
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]
    prefix_block_tables: torch.Tensor  # int32 [num_prefixes, max_prefix_blocks]
    prefix_lens: torch.Tensor  # int32 [num_prefixes]
    seq_prefix_ids: torch.Tensor  # int32 [num_seqs]
    scale: float

    def to(self, device: str | torch.device) -> PagedBatch:
        moved = {name: getattr(self, name).to(device) for name in self.__dataclass_fields__ if name != "scale"}
        return PagedBatch(**moved, scale=self.scale)

    def attention_args(self) -> tuple:
        return (self.query, self.k_cache, self.v_cache, self.block_tables, self.seq_lens, self.query_start_loc,
                self.scale)

    def cascade_args(self) -> tuple:
        return (self.query, self.k_cache, self.v_cache, self.block_tables, self.seq_lens, self.query_start_loc,
                self.prefix_block_tables, self.prefix_lens, self.seq_prefix_ids, self.scale)


def make_batch(
    groups: list[PrefixGroup],
    block_size: int,
    num_kv_heads: int,
    group_size: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    spare_blocks: int = 3,
) -> PagedBatch:
    """A batch whose sequences come from `groups`; a group with prefix_len 0 holds independent sequences
    (seq_prefix_ids -1). Block ids are shuffled so a kernel that ignores the block table fails."""
    generator = torch.Generator().manual_seed(seed)
    blocks_for = [-(-branch.seq_len // block_size) for group in groups for branch in group.branches]
    prefix_blocks_for = [-(-group.prefix_len // block_size) for group in groups]
    num_blocks = sum(blocks_for) + sum(prefix_blocks_for) + spare_blocks
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=generator).to(dtype)
    v_cache = torch.randn(shape, generator=generator).to(dtype)
    free_blocks = torch.randperm(num_blocks, generator=generator).tolist()

    tables: list[list[int]] = []
    prefix_tables: list[list[int]] = []
    prefix_lens: list[int] = []
    seq_prefix_ids: list[int] = []
    q_lens: list[int] = []
    seq_lens: list[int] = []
    for group in groups:
        prefix_id = -1
        prefix_table = [free_blocks.pop() for _ in range(-(-group.prefix_len // block_size))]
        if group.prefix_len > 0:
            prefix_id = len(prefix_tables)
            prefix_tables.append(prefix_table)
            prefix_lens.append(group.prefix_len)
        full_shared = group.prefix_len // block_size
        partial = group.prefix_len % block_size
        for branch in group.branches:
            assert group.prefix_len <= branch.seq_len - branch.q_len
            table = prefix_table[:full_shared]
            while len(table) * block_size < branch.seq_len:
                table.append(free_blocks.pop())
            if partial:  # copy-on-write: the branch owns a copy of the prefix's last, partial block
                own, shared = table[full_shared], prefix_table[full_shared]
                k_cache[own, :partial] = k_cache[shared, :partial]
                v_cache[own, :partial] = v_cache[shared, :partial]
            tables.append(table)
            seq_prefix_ids.append(prefix_id)
            q_lens.append(branch.q_len)
            seq_lens.append(branch.seq_len)

    max_blocks = max(len(t) for t in tables) + 1  # one column of padding (0) as the engine sends
    block_tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int32)
    max_prefix_blocks = max([len(t) for t in prefix_tables], default=0) + 1
    prefix_block_tables = torch.tensor(
        [t + [0] * (max_prefix_blocks - len(t)) for t in prefix_tables], dtype=torch.int32
    ).reshape(len(prefix_tables), max_prefix_blocks)
    query_start_loc = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    query_start_loc[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    num_tokens = int(query_start_loc[-1])
    query = torch.randn(num_tokens, num_kv_heads * group_size, head_dim, generator=generator).to(dtype)
    return PagedBatch(
        query=query,
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=block_tables,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc=query_start_loc,
        prefix_block_tables=prefix_block_tables,
        prefix_lens=torch.tensor(prefix_lens, dtype=torch.int32),
        seq_prefix_ids=torch.tensor(seq_prefix_ids, dtype=torch.int32),
        scale=head_dim**-0.5,
    )


def independent(*branches: tuple[int, int]) -> PrefixGroup:
    """A group of sequences without a shared prefix, from (seq_len, q_len) pairs."""
    return PrefixGroup(0, tuple(Branch(seq_len, q_len) for seq_len, q_len in branches))


def shared(prefix_len: int, *branches: tuple[int, int]) -> PrefixGroup:
    """Branches on one prefix, from (seq_len, q_len) pairs (seq_len counts the prefix)."""
    return PrefixGroup(prefix_len, tuple(Branch(seq_len, q_len) for seq_len, q_len in branches))
