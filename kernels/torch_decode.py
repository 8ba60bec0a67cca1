"""Decode attention on CPU that reads the paged K/V in place, without gathering it per sequence.

In a decode step every sequence has one query (or a few: a sampled token and the forced marker after it)
and reads all of its keys, so attention is bound by how many bytes of K/V move. Gathering each
sequence's blocks into a dense [kv_heads, n, keys, D] tensor before the matmul moves them three times
(read, write, read again). Here the work is organised by block instead: with the cache laid out
heads-major ([kv_heads, num_blocks, block_size, D] memory), the blocks of a contiguous range of block
ids are already a batch of [block_size, D] matrices. Each block meets the queries of the sequence that
owns it (a small gather of queries, not keys), and the per-block partial softmax results are reduced per
sequence with index_add (the same log-sum-exp algebra as a split-KV kernel, with one split per block).

This only applies when every block read belongs to exactly one sequence of the batch (the cascade
suffix pass of branches, or independent sequences) and the blocks read fill most of the id range they
span; `plan_decode` returns None otherwise and the caller gathers instead. The plan depends only on the
batch layout, so a step builds it once and every layer reuses it.

The softmax runs in base 2 (exp2 is ~2.4x faster than exp on this CPU; log2(e) is folded into the
query scale) and, rather than shifting each row by its own maximum (a max over 16-key blocks and its
scatter, each a pass), first shifts by nothing: any shift gives the same softmax, and float32 keeps full
precision unless a row's sum overflows or underflows, which is checked on the small per-row sums. A call
where that happened is redone shifted by its global maximum, then by per-row maxima (exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# The id range read is processed whole, owned or not: beyond this many blocks per owned block, gather.
MAX_SPAN_PER_OWNED_BLOCK = 2.0
LOG2_E = 1.0 / math.log(2.0)
# The shifts tried in turn until the sums stay in range: none (scores in base 2 rarely leave [-30, 30], so
# 2^score neither overflows nor underflows), the call's global maximum, then each row's own maximum (exact).
SHIFTS = ("none", "global", "rows")
# A row whose shifted sum is below this is redone with the next shift: its largest term is then < 2^-100,
# and terms 2^-24 smaller (still significant in float32) would be denormal.
MIN_SHIFTED_SUM = 2.0**-100
# Above this (or not finite), a sum or a weighted value may have lost precision to overflow: next shift.
MAX_SHIFTED_SUM = 2.0**100


@dataclass(frozen=True)
class DecodePlan:
    """Which cache blocks a batch of decode sequences reads and which of their scores are masked.

    Valid for every layer of a step (the layers share block tables and lengths)."""

    num_seqs: int
    max_q: int  # queries per sequence, padded
    group: int  # query heads per kv head
    low: int  # block ids [low, high) are read as one batch of tiles
    high: int
    owner: torch.Tensor  # int64 [span]: the sequence that reads block low + b; num_seqs for blocks nobody reads
    masked: torch.Tensor  # int64 [m]: flat indices into one kv head's scores [span, rows, block_size] to mask
    valid_query: torch.Tensor  # bool [n, max_q]: query index < q_len
    has_keys: torch.Tensor  # bool [n, max_q]: a valid query that attends to at least one key
    rows_without_keys: torch.Tensor  # bool [1, n, rows]: ~has_keys in the [kv_heads, n, rows] order of the sums

    @property
    def rows(self) -> int:
        """(query, head of the kv group) pairs per sequence: the rows of each block's score tile."""
        return self.max_q * self.group


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


def plan_decode(
    q_lens: torch.Tensor,  # int64 [n], 1 <= q_len <= max_q
    block_tables: torch.Tensor,  # int32 [n, max_blocks]
    seq_lens: torch.Tensor,  # int64 [n]: the queries sit at the last q_len positions before seq_len
    first_keys: torch.Tensor,  # int64 [n]: first key position attended
    max_q: int,
    block_size: int,
    group: int,  # query heads per kv head
    causal: bool,
) -> DecodePlan | None:
    """The in-place plan of a batch, or None when the blocks read are shared between sequences or too sparse
    in the cache for the in-place pass to pay."""
    n = seq_lens.shape[0]
    device = seq_lens.device
    owners, block_ids, logical = _blocks_read(block_tables, seq_lens, first_keys, block_size)
    if block_ids.numel() == 0:
        return None
    low, high = int(block_ids.min()), int(block_ids.max()) + 1
    span = high - low
    if span > MAX_SPAN_PER_OWNED_BLOCK * block_ids.numel():
        return None
    owner = torch.full((span,), n, dtype=torch.long, device=device)
    owner[block_ids - low] = owners
    if int((owner < n).sum()) != block_ids.numel():
        return None  # some block is read by two sequences

    # Allowed key offsets of the block of pair p for its sequence's query q: [key_begin[p], key_end[p, q]).
    # Only the pairs where that is not the whole block (a sequence's first and last blocks) are masked; the
    # blocks nobody reads meet all-zero queries of the discarded sequence n and need no mask either. Padding
    # queries (past q_len) are not masked: they are discarded.
    query_index = torch.arange(max_q, device=device)
    valid_query = query_index < q_lens[:, None]  # [n, max_q]
    key_end_of_query = seq_lens[:, None] - (q_lens[:, None] - 1 - query_index) * causal  # [n, max_q]
    has_keys = valid_query & (key_end_of_query > first_keys[:, None])
    block_start = (logical * block_size)[:, None]  # [P, 1]
    key_begin = first_keys[owners, None] - block_start  # [P, 1]
    key_end = torch.where(valid_query[owners], key_end_of_query[owners] - block_start, block_size)  # [P, max_q]
    offsets = torch.arange(block_size, device=device)
    masked = (offsets >= key_end[:, :, None]) | (offsets < key_begin[:, :, None])  # [P, max_q, block_size]
    masked = masked[:, :, None, :].expand(-1, max_q, group, block_size).reshape(-1, max_q * group * block_size)
    pair, within = torch.nonzero(masked, as_tuple=True)
    flat = (block_ids[pair] - low) * (max_q * group * block_size) + within
    rows_without_keys = ~has_keys[:, :, None].expand(-1, -1, group).reshape(1, n, max_q * group)
    return DecodePlan(n, max_q, group, low, high, owner, flat, valid_query, has_keys, rows_without_keys)


def decode_in_place(
    queries: torch.Tensor,  # [n, max_q, num_heads, head_dim]: each sequence's queries, padded to plan.max_q
    plan: DecodePlan,
    k_heads_major: torch.Tensor,  # [kv_heads, num_blocks, block_size, head_dim], contiguous
    v_heads_major: torch.Tensor,  # [kv_heads, num_blocks, block_size, head_dim], contiguous
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # out float32 [n, max_q, H, D], lse float32 [n, max_q, H]
    """Attention of a few queries per sequence over the keys the plan assigns it. Padding rows (past q_len)
    and queries without keys come back with out 0 and lse -inf."""
    n, max_q, num_heads, head_dim = queries.shape
    num_kv_heads = k_heads_major.shape[0]
    # [n, max_q, H, D] -> [kv_heads, n + 1, rows, D], sequence n all zeros for the unread blocks; the scale
    # and log2(e) are applied to the (small) queries rather than to the scores.
    grouped = torch.zeros(num_kv_heads, n + 1, max_q, plan.group, head_dim, dtype=torch.float32,
                          device=queries.device)
    grouped[:, :n] = queries.reshape(n, max_q, num_kv_heads, plan.group, head_dim).permute(2, 0, 1, 3, 4)
    grouped.mul_(scale * LOG2_E)
    block_queries = torch.index_select(grouped.view(num_kv_heads, n + 1, plan.rows, head_dim), 1, plan.owner)
    keys = k_heads_major[:, plan.low:plan.high]  # [kv_heads, span, block_size, D]
    values = v_heads_major[:, plan.low:plan.high]
    for shift_kind in SHIFTS:
        scores = _masked_scores(block_queries, keys, plan)  # [kv_heads, span, rows, block_size], base 2
        if shift_kind == "none":
            shift = torch.zeros((), device=queries.device)
            probs = scores.exp2_()
        elif shift_kind == "global":
            shift = scores.max()
            if torch.isinf(shift):  # nothing attended anywhere
                shift = torch.zeros((), device=queries.device)
            probs = scores.sub_(shift).exp2_()
        else:
            shift = _row_maxima(scores, plan)  # [kv_heads, n + 1, rows]
            probs = scores.sub_(shift[:, plan.owner, :, None]).exp2_()
        seq_sum, weighted = _reduce_by_sequence(probs, values, plan)
        if shift_kind == "rows" or sums_in_range(seq_sum[:, :n], weighted[:, :n], plan.rows_without_keys):
            break
    seq_sum, weighted = seq_sum[:, :n], weighted[:, :n]
    seq_shift = shift[:, :n] if shift.dim() else shift
    out = weighted / seq_sum.clamp(min=torch.finfo(torch.float32).tiny)[..., None]  # 0 where no keys
    lse = torch.where(seq_sum > 0, (seq_shift + seq_sum.log2()) * math.log(2.0), float("-inf"))
    out = out.view(num_kv_heads, n, max_q, plan.group, head_dim).permute(1, 2, 0, 3, 4).reshape(
        n, max_q, num_heads, head_dim)
    lse = lse.view(num_kv_heads, n, max_q, plan.group).permute(1, 2, 0, 3).reshape(n, max_q, num_heads)
    if max_q > 1:  # padding rows saw every key unmasked: report them empty
        out[~plan.valid_query] = 0.0
        lse[~plan.valid_query] = float("-inf")
    return out, lse


def sums_in_range(
    sums: torch.Tensor,  # float32 [kv_heads, n, rows]: each row's sum of 2^(score - shift)
    weighted: torch.Tensor,  # float32 [kv_heads, n, rows, D]: each row's sum of 2^(score - shift) * value
    rows_without_keys: torch.Tensor,  # bool, broadcast to [kv_heads, n, rows]: rows allowed to sum to 0
) -> bool:
    """Whether a shifted softmax kept full float32 precision: no sum or weighted value overflowed, and every
    row with keys summed to at least MIN_SHIFTED_SUM. (Padding rows are checked too: a false alarm only
    costs a redo.)"""
    smallest = sums.masked_fill(rows_without_keys, 1.0).min()
    # One reduction finds any inf/nan among the weighted values (a finite overflow of the total is a false alarm).
    return bool((smallest >= MIN_SHIFTED_SUM) & (sums.max() <= MAX_SHIFTED_SUM) & weighted.sum().isfinite())


def _masked_scores(
    block_queries: torch.Tensor,  # float32 [kv_heads, span, rows, D], pre-scaled
    keys: torch.Tensor,  # [kv_heads, span, block_size, D]
    plan: DecodePlan,
) -> torch.Tensor:  # float32 [kv_heads, span, rows, block_size]
    num_kv_heads, span, rows, _ = block_queries.shape
    block_size = keys.shape[2]
    # One batched matmul per kv head: keys[h] is a contiguous batch of [block_size, D] tiles, where a single
    # matmul over (head, block) would copy the whole range first.
    scores = torch.empty(num_kv_heads, span, rows, block_size, device=block_queries.device)
    for head in range(num_kv_heads):
        torch.bmm(block_queries[head], keys[head].float().transpose(1, 2), out=scores[head])
    scores.view(num_kv_heads, -1).index_fill_(1, plan.masked, float("-inf"))
    return scores


def _row_maxima(scores: torch.Tensor, plan: DecodePlan) -> torch.Tensor:  # float32 [kv_heads, n + 1, rows]
    """Each row's maximum score over all its blocks (0 for a row without keys, so exp2(-inf - 0) = 0)."""
    block_max = scores.amax(dim=3)  # [kv_heads, span, rows]
    seq_max = torch.full((scores.shape[0], plan.num_seqs + 1, plan.rows), float("-inf"), device=scores.device)
    seq_max.scatter_reduce_(1, plan.owner[None, :, None].expand_as(block_max), block_max, reduce="amax")
    return torch.where(torch.isinf(seq_max), 0.0, seq_max)


def _reduce_by_sequence(
    probs: torch.Tensor,  # float32 [kv_heads, span, rows, block_size], unnormalised
    values: torch.Tensor,  # [kv_heads, span, block_size, D]
    plan: DecodePlan,
) -> tuple[torch.Tensor, torch.Tensor]:  # sum [kv_heads, n + 1, rows], weighted values [kv_heads, n + 1, rows, D]
    num_kv_heads, span, rows, _ = probs.shape
    head_dim = values.shape[3]
    # A matrix-vector product with ones sums the 16-key rows ~2x faster than .sum(dim=3) on this CPU (measured).
    ones = torch.ones(probs.shape[3], device=probs.device)
    block_sums = torch.mv(probs.view(-1, probs.shape[3]), ones).view(probs.shape[:3])  # [kv_heads, span, rows]
    partial = torch.empty(num_kv_heads, span, rows, head_dim, device=probs.device)
    seq_sum = torch.zeros(num_kv_heads, plan.num_seqs + 1, rows, device=probs.device)
    weighted = torch.zeros(num_kv_heads, plan.num_seqs + 1, rows, head_dim, device=probs.device)
    for head in range(num_kv_heads):
        torch.bmm(probs[head], values[head].float(), out=partial[head])
        # Per head, along dim 0: index_add_ over a middle dim is ~3x slower on CPU (measured).
        seq_sum[head].index_add_(0, plan.owner, block_sums[head])
        weighted[head].index_add_(0, plan.owner, partial[head])
    return seq_sum, weighted
