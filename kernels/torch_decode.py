"""Decode attention on CPU that reads the paged K/V in place, without gathering it per sequence.

In a decode step every sequence has one query (or a few: a sampled token and the forced marker after it)
and reads all of its keys, so attention is bound by how many bytes of K/V move. Gathering each
sequence's blocks into a dense [kv_heads, n, keys, D] tensor before the matmul moves them three times
(read, write, read again). Here the work is organised by block instead: with the cache laid out
heads-major ([kv_heads, num_blocks, block_size, D] memory), the blocks of a contiguous range of block
ids are already a batch of [block_size, D] matrices. Each block meets the queries of the sequence that
owns it (a small gather of queries, not keys), and the per-block partial softmax results are reduced per
sequence with scatter operations (the same log-sum-exp algebra as a split-KV kernel, with one split per
block).

This only applies when every block read belongs to exactly one sequence of the batch (the cascade
suffix pass of branches, or independent sequences) and the blocks read fill most of the id range they
span; `decode_in_place` returns None otherwise and the caller gathers instead.
"""

from __future__ import annotations

import torch

# The id range read is processed whole, owned or not: beyond this many blocks per owned block, gather.
MAX_SPAN_PER_OWNED_BLOCK = 2.0


def _blocks_read(
    block_tables: torch.Tensor,  # int32 [n, max_blocks]
    seq_lens: torch.Tensor,  # int64 [n]
    first_keys: torch.Tensor,  # int64 [n]
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(owner seq [P], block id [P], logical block index [P]) for every block a sequence reads."""
    device = block_tables.device
    first_blocks = first_keys // block_size
    counts = ((seq_lens + block_size - 1) // block_size - first_blocks).clamp(min=0)  # [n]
    total = int(counts.sum())
    owners = torch.repeat_interleave(torch.arange(seq_lens.shape[0], device=device), counts, output_size=total)
    starts = torch.cumsum(counts, 0) - counts  # [n]
    logical = first_blocks[owners] + torch.arange(total, device=device) - starts[owners]  # [P]
    return owners, block_tables.long()[owners, logical], logical


def decode_in_place(
    queries: torch.Tensor,  # [n, max_q, num_heads, head_dim]: each sequence's queries, padded to max_q
    q_lens: torch.Tensor,  # int64 [n], 1 <= q_len <= max_q
    k_heads_major: torch.Tensor,  # [kv_heads, num_blocks, block_size, head_dim], contiguous
    v_heads_major: torch.Tensor,  # [kv_heads, num_blocks, block_size, head_dim], contiguous
    block_tables: torch.Tensor,  # int32 [n, max_blocks]
    seq_lens: torch.Tensor,  # int64 [n]: the queries sit at the last q_len positions before seq_len
    first_keys: torch.Tensor,  # int64 [n]: first key position attended
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor] | None:  # out float32 [n, max_q, H, D], lse float32 [n, max_q, H]
    """Attention of a few queries per sequence over keys [first_key, seq_len) (and <= the query's position
    when causal), or None when the blocks read are shared between sequences or too sparse in the cache
    for the in-place pass to pay. Padding rows (past q_len) come back with lse -inf."""
    n, max_q, num_heads, head_dim = queries.shape
    num_kv_heads, _, block_size, _ = k_heads_major.shape
    group = num_heads // num_kv_heads
    rows = max_q * group  # (query, head of the kv group) pairs per sequence
    device = queries.device
    owners, block_ids, logical = _blocks_read(block_tables, seq_lens, first_keys, block_size)
    if block_ids.numel() == 0:
        return None
    low, high = int(block_ids.min()), int(block_ids.max()) + 1
    span = high - low
    if span > MAX_SPAN_PER_OWNED_BLOCK * block_ids.numel():
        return None
    # owner[b] = the sequence reading block low + b; n (zero queries, no keys) for blocks nobody reads.
    owner = torch.full((span,), n, dtype=torch.long, device=device)
    owner[block_ids - low] = owners
    if int((owner < n).sum()) != block_ids.numel():
        return None  # some block is read by two sequences

    # Allowed key offsets of the block of pair p for its sequence's query q: [key_begin[p], key_end[p, q]).
    # Only the pairs where that is not the whole block (a sequence's first and last blocks) are masked; the
    # blocks nobody reads meet all-zero queries of the discarded sequence n and need no mask either.
    query_index = torch.arange(max_q, device=device)
    valid_query = query_index < q_lens[:, None]  # [n, max_q]
    key_end_of_query = seq_lens[:, None] - (q_lens[:, None] - 1 - query_index) * causal  # [n, max_q]
    block_start = (logical * block_size)[:, None]  # [P, 1]
    key_begin = first_keys[owners, None] - block_start  # [P, 1]
    key_end = torch.where(valid_query[owners], key_end_of_query[owners] - block_start, block_size)  # [P, max_q]
    boundary = torch.nonzero((key_begin[:, 0] > 0) | (key_end < block_size).any(dim=1)).squeeze(1)
    offsets = torch.arange(block_size, device=device)
    boundary_masked = ((offsets >= key_end[boundary, :, None]) | (offsets < key_begin[boundary, :, None]))
    boundary_masked = boundary_masked[:, :, None, :].expand(-1, max_q, group, block_size).reshape(-1, rows,
                                                                                                   block_size)
    boundary_blocks = block_ids[boundary] - low

    # [n, max_q, H, D] -> [kv_heads, n + 1, rows, D], sequence n all zeros for the unread blocks
    grouped = torch.zeros(num_kv_heads, n + 1, max_q, group, head_dim, dtype=torch.float32, device=device)
    grouped[:, :n] = queries.float().view(n, max_q, num_kv_heads, group, head_dim).permute(2, 0, 1, 3, 4)
    block_queries = grouped.view(num_kv_heads, n + 1, rows, head_dim)[:, owner]  # [kv_heads, span, rows, D]
    # One batched matmul per kv head: k_heads_major[h, low:high] is a contiguous batch of [block_size, D]
    # tiles, where a single matmul over (head, block) would copy the whole range first.
    scores = torch.empty(num_kv_heads, span, rows, block_size, device=device)
    for head in range(num_kv_heads):
        torch.bmm(block_queries[head], k_heads_major[head, low:high].float().transpose(1, 2), out=scores[head])
    scores.mul_(scale)
    scores[:, boundary_blocks] = scores[:, boundary_blocks].masked_fill_(boundary_masked, float("-inf"))

    block_max = scores.amax(dim=3)  # [kv_heads, span, rows]
    seq_max = torch.full((num_kv_heads, n + 1, rows), float("-inf"), device=device)
    seq_max.scatter_reduce_(1, owner[None, :, None].expand_as(block_max), block_max, reduce="amax")
    seq_max = torch.where(torch.isinf(seq_max), 0.0, seq_max)  # a row with no keys: exp(-inf - 0) = 0
    probs = scores.sub_(seq_max[:, owner, :, None]).exp_()  # [kv_heads, span, rows, block_size], unnormalised
    seq_sum = torch.zeros(num_kv_heads, n + 1, rows, device=device)
    seq_sum.index_add_(1, owner, probs.sum(dim=3))
    partial = torch.empty(num_kv_heads, span, rows, head_dim, device=device)
    for head in range(num_kv_heads):
        torch.bmm(probs[head], v_heads_major[head, low:high].float(), out=partial[head])
    weighted = torch.zeros(num_kv_heads, n + 1, rows, head_dim, device=device)
    weighted.index_add_(1, owner, partial)

    seq_sum, weighted, seq_max = seq_sum[:, :n], weighted[:, :n], seq_max[:, :n]
    out = weighted / seq_sum.clamp(min=torch.finfo(torch.float32).tiny)[..., None]  # 0 where no keys
    lse = torch.where(seq_sum > 0, seq_max + seq_sum.log(), float("-inf"))
    out = out.view(num_kv_heads, n, max_q, group, head_dim).permute(1, 2, 0, 3, 4).reshape(n, max_q, num_heads,
                                                                                          head_dim)
    lse = lse.view(num_kv_heads, n, max_q, group).permute(1, 2, 0, 3).reshape(n, max_q, num_heads)
    out[~valid_query] = 0.0  # padding rows saw every key unmasked: report them empty
    lse[~valid_query] = float("-inf")
    return out, lse
