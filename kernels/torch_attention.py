"""Vectorised torch implementations for the CPU engine: the same contract as kernels/reference.py, fast.

No Python loop over tokens. Decode-like sequences (<= IN_PLACE_MAX_QUERIES queries) that own the blocks
they read attend in place, block by block (kernels/torch_decode.py). Other sequences with few queries (a
cascade prefix shared by its branches) run as one padded batch: their KV blocks are gathered by block
table into reused buffers and each (kv head, sequence) does one masked matmul for all its queries and
grouped query heads. Long prefill chunks run in batches of equal length.

The cascade path is where branching wins: the queries of all branches of a prefix meet the prefix's
K/V in one [branches * q, prefix_len] matmul (the prefix is read once), each branch then attends to its
short suffix, and the two parts are merged by log-sum-exp."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from .prefix_groups import CascadePlan, plan_cascade
from .torch_decode import LOG2_E, DecodePlan, decode_in_place, plan_decode, sums_in_range
from .validation import check_attention_inputs, check_cascade_inputs, check_merge_inputs, check_store_kv_inputs

# Segments with at most this many queries are batched together (decode steps, cascade prefix groups).
SHORT_SEGMENT_MAX_QUERIES = 16
# Sequences with at most this many queries (decode steps, a sampled token + its forced marker) read the
# K/V in place when they own their blocks (kernels/torch_decode.py).
IN_PLACE_MAX_QUERIES = 4
# Bytes of gathered K/V + scores one padded batch may hold; bigger batches are cut into chunks of sequences.
BATCH_MEMORY_BUDGET_BYTES = 256 * 2**20
LN_2 = math.log(2.0)


def store_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # int64 [num_tokens], < 0 = padding
) -> None:
    """Scatter K/V rows into their cache slots in one indexed write; padding slots are skipped."""
    check_store_kv_inputs(key, value, k_cache, v_cache, slot_mapping)
    block_size = k_cache.shape[1]
    valid = slot_mapping >= 0
    if bool(valid.all()):  # the engine's batches have no padding: skip the masked copies
        slots, keys, values = slot_mapping, key, value
    else:
        slots, keys, values = slot_mapping[valid], key[valid], value[valid]
    for cache, rows in ((k_cache, keys), (v_cache, values)):
        heads_major = heads_major_view(cache)
        if heads_major is None:
            cache[slots // block_size, slots % block_size] = rows
        else:  # [kv_heads, num_blocks * block_size, D]: one row copy per (head, token)
            heads_major.view(heads_major.shape[0], -1, heads_major.shape[-1]).index_copy_(1, slots,
                                                                                        rows.transpose(0, 1))


def _plan_batches(q_lens: list[int]) -> list[tuple[list[int], int]]:
    """Groups of sequence ids that run as one padded batch, each with its padded query count.

    One batch when padding at most doubles the work; otherwise the short segments form one batch and
    the long segments (prefill chunks) run in batches of equal length, so the action chunks appended to
    hundreds of branches in one step need no padding and no per-sequence call.
    """
    active = [seq for seq, q_len in enumerate(q_lens) if q_len > 0]
    if not active:
        return []
    max_q = max(q_lens[seq] for seq in active)
    if len(active) * max_q <= 2 * sum(q_lens[seq] for seq in active):
        return [(active, max_q)]
    short = [seq for seq in active if q_lens[seq] <= SHORT_SEGMENT_MAX_QUERIES]
    batches = [(short, max(q_lens[seq] for seq in short))] if short else []
    by_length: dict[int, list[int]] = {}
    for seq in active:
        if q_lens[seq] > SHORT_SEGMENT_MAX_QUERIES:
            by_length.setdefault(q_lens[seq], []).append(seq)
    return batches + [(seqs, q_len) for q_len, seqs in sorted(by_length.items())]


class _Workspace(threading.local):
    """Reusable gather buffers, one set per thread.

    A fresh [kv_heads, n, keys, D] tensor per layer costs more in page faults than the copy itself on
    this class of machine (measured: 134 MB index_select 131 ms into a new tensor, 20 ms into a reused
    one), so gathers write into buffers that only grow.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (name, dtype, device)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            # A normal tensor even when allocated in inference mode: those may be written in and out of it.
            with torch.inference_mode(False):
                buffer = torch.empty(numel, dtype=dtype, device=device)
            self.buffers[key] = buffer
        return buffer[:numel]


_workspace = _Workspace()


def heads_major_view(cache: torch.Tensor) -> torch.Tensor | None:
    """The [kv_heads, num_blocks, block_size, D] view of a [num_blocks, block_size, kv_heads, D] cache whose
    memory is laid out heads-major (HND), or None when it is not (the contiguous NHD layout)."""
    view = cache.permute(2, 0, 1, 3)
    return view if view.is_contiguous() else None


def _gather_blocks(
    cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, D]
    blocks: torch.Tensor,  # int64 [n, num_gathered]
    name: str,
) -> torch.Tensor:  # float32 [kv_heads, n, num_gathered * block_size, D]
    """Every sequence's blocks, kv head first, so each (head, sequence) is one contiguous [keys, D] matrix.

    From an HND cache this is one index_select of whole [block_size, D] tiles into a reused buffer; from an
    NHD cache (the Triton kernels' layout, used here in tests) it falls back to advanced indexing.
    """
    n, num_gathered = blocks.shape
    block_size, num_kv_heads, head_dim = cache.shape[1:]
    hnd = heads_major_view(cache)
    if hnd is None:
        kv_heads = torch.arange(num_kv_heads, device=cache.device)[:, None, None]
        gathered = cache.transpose(1, 2)[blocks[None], kv_heads]  # [kv_heads, n, num_gathered, block_size, D]
    else:
        numel = num_kv_heads * blocks.numel() * block_size * head_dim
        out = _workspace.get(name, numel, cache.dtype, cache.device).view(num_kv_heads, blocks.numel(), block_size,
                                                                           head_dim)
        gathered = torch.index_select(hnd, 1, blocks.reshape(-1), out=out)
    return gathered.reshape(num_kv_heads, n, num_gathered * block_size, head_dim).float()


@dataclass(frozen=True)
class _DecodeBatch:
    """Sequences with a few queries each that read their own blocks in place (kernels/torch_decode.py)."""

    token_ids: torch.Tensor  # int64 [n, max_q]: query row of each (sequence, query), clamped for padding
    valid: torch.Tensor  # bool [n, max_q]
    rows: torch.Tensor  # int64 [m]: token_ids[valid]
    decode: DecodePlan
    every_token_in_order: bool  # one query per sequence and token_ids = 0..num_tokens-1: no gather, no scatter


@dataclass(frozen=True)
class _GatherBatch:
    """Sequences whose blocks are gathered into one padded batch (cascade prefixes, prefill chunks)."""

    token_ids: torch.Tensor  # int64 [n, max_q]
    valid: torch.Tensor  # bool [n, max_q]
    rows: torch.Tensor  # int64 [m]: token_ids[valid]
    blocks: torch.Tensor  # int64 [n, num_gathered]: the blocks holding keys [first_key, seq_len)
    mask_from: int  # key columns before this one are allowed for every real query row
    mask: torch.Tensor | None  # bool [n, max_q * group, num_keys - mask_from], True = masked; None: no mask
    rows_without_keys: torch.Tensor  # bool [1, n, max_q * group]: padding rows and real rows that see no key


@dataclass(frozen=True)
class AttentionPlan:
    """How paged_attention_with_lse splits one batch into padded batches, and their masks. It depends only on
    the batch layout (block tables, lengths, query counts) and the cache geometry, so every layer of a step
    can reuse it."""

    batches: tuple[_DecodeBatch | _GatherBatch, ...]


def plan_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]: only its shape and device are used
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]: only its layout is used
    block_tables: torch.Tensor,  # int32 [num_seqs, max_blocks_per_seq]
    seq_lens: torch.Tensor,  # int32 [num_seqs]
    query_start_loc: torch.Tensor,  # int32 [num_seqs + 1]
    kv_start: torch.Tensor | None = None,  # int32 [num_seqs]
    causal: bool = True,
    token_order: torch.Tensor | None = None,  # int64: query row of the i-th token of the segments (default i)
) -> AttentionPlan:
    """The plan of paged_attention_with_lse for one batch; the same arguments give the same plan."""
    num_heads, head_dim = query.shape[1:]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    device = query.device
    q_starts = query_start_loc[:-1].long()
    q_lens = query_start_loc[1:].long() - q_starts
    first_keys = torch.zeros_like(q_lens) if kv_start is None else kv_start.long()
    seq_lens = seq_lens.long()
    in_place = heads_major_view(k_cache) is not None
    batches: list[_DecodeBatch | _GatherBatch] = []
    for seq_list, max_q in _plan_batches(q_lens.tolist()):
        seq_ids = torch.tensor(seq_list, dtype=torch.long, device=device)
        token_ids = (q_starts[seq_ids, None] + torch.arange(max_q, device=device)).clamp(max=query.shape[0] - 1)
        if token_order is not None:
            token_ids = token_order[token_ids]
        valid = torch.arange(max_q, device=device) < q_lens[seq_ids, None]  # [n, max_q]
        if max_q <= IN_PLACE_MAX_QUERIES and in_place:
            decode = plan_decode(q_lens[seq_ids], block_tables[seq_ids], seq_lens[seq_ids], first_keys[seq_ids],
                                 max_q, block_size, num_heads // num_kv_heads, causal)
            if decode is not None:
                in_order = max_q == 1 and token_ids.shape[0] == query.shape[0] and bool(
                    (token_ids[:, 0] == torch.arange(query.shape[0], device=device)).all())
                batches.append(_DecodeBatch(token_ids, valid, token_ids[valid], decode, in_order))
                continue
        # The widest key span any sequence of the batch gathers (a cascade suffix gathers only its tail).
        max_keys = int((seq_lens[seq_ids] - first_keys[seq_ids] // block_size * block_size).max()) + block_size
        chunk = _batch_chunk_size(max_q, max_keys, num_heads, num_kv_heads, head_dim)
        for begin in range(0, len(seq_list), chunk):
            ids = seq_ids[begin : begin + chunk]
            part = slice(begin, begin + chunk)
            batches.append(_plan_gather(token_ids[part], valid[part], block_tables[ids], seq_lens[ids], q_lens[ids],
                                        first_keys[ids], block_size, num_heads // num_kv_heads, causal))
    return AttentionPlan(tuple(batches))


def _plan_gather(
    token_ids: torch.Tensor,  # int64 [n, max_q]
    valid: torch.Tensor,  # bool [n, max_q]
    block_tables: torch.Tensor,  # int32 [n, max_blocks] (rows of this batch)
    seq_lens: torch.Tensor,  # int64 [n]
    q_lens: torch.Tensor,  # int64 [n]
    first_keys: torch.Tensor,  # int64 [n]
    block_size: int,
    group: int,
    causal: bool,
) -> _GatherBatch:
    n, max_q = token_ids.shape
    device = token_ids.device
    # Gather only the blocks that hold keys in [first_key, seq_len).
    first_blocks = first_keys // block_size
    num_gathered = max(int(((seq_lens + block_size - 1) // block_size - first_blocks).max()), 1)
    block_ids = (first_blocks[:, None] + torch.arange(num_gathered, device=device)).clamp(
        max=block_tables.shape[1] - 1
    )
    blocks = torch.gather(block_tables.long(), 1, block_ids)  # [n, num_gathered]
    num_keys = num_gathered * block_size
    key_pos = first_blocks[:, None] * block_size + torch.arange(num_keys, device=device)  # [n, num_keys]
    allowed = (key_pos >= first_keys[:, None]) & (key_pos < seq_lens[:, None])  # [n, num_keys]
    allowed = allowed[:, None, :].expand(n, max_q, num_keys)
    if causal:
        q_pos = seq_lens[:, None] - q_lens[:, None] + torch.arange(max_q, device=device)  # [n, max_q]
        allowed = allowed & (key_pos[:, None, :] <= q_pos[:, :, None])
    rows_without_keys = ~(allowed.any(dim=2) & valid)[:, :, None].expand(n, max_q, group).reshape(1, n, -1)
    masked = ~allowed & valid[:, :, None]  # padding rows are discarded: no need to mask them
    masked_columns = torch.nonzero(masked.any(dim=1).any(dim=0))
    if masked_columns.numel() == 0:
        return _GatherBatch(token_ids, valid, token_ids[valid], blocks, num_keys, None, rows_without_keys)
    mask_from = int(masked_columns[0])
    mask = masked[:, :, None, mask_from:].expand(n, max_q, group, num_keys - mask_from)
    return _GatherBatch(token_ids, valid, token_ids[valid], blocks, mask_from,
                        mask.reshape(n, max_q * group, num_keys - mask_from), rows_without_keys)


def _attend_gathered(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    batch: _GatherBatch,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # out float32 [m, H, D], lse float32 [m, H] for the batch's real rows
    """Attention of n sequences padded to max_q queries, their K/V gathered by block; a base-2 softmax with the
    scale and log2(e) applied to the queries."""
    n, max_q = batch.token_ids.shape
    num_heads, head_dim = query.shape[1:]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    keys = _gather_blocks(k_cache, batch.blocks, "keys")  # [kv_heads, n, num_keys, D]
    # [n, max_q, H, D] -> [kv_heads, n, max_q * group, D]: the query heads sharing a KV head become rows
    queries = (query[batch.token_ids].float() * (scale * LOG2_E)).view(n, max_q, num_kv_heads, group, head_dim)
    queries = queries.permute(2, 0, 1, 3, 4).reshape(num_kv_heads, n, max_q * group, head_dim)
    values = _gather_blocks(v_cache, batch.blocks, "values")  # [kv_heads, n, num_keys, D]
    for shift_rows in (False, True):  # unshifted first, as in kernels/torch_decode.py; row maxima if out of range
        scores = torch.matmul(queries, keys.transpose(-1, -2))  # [kv_heads, n, max_q * group, num_keys]
        if batch.mask is not None:
            scores[..., batch.mask_from:].masked_fill_(batch.mask, float("-inf"))
        if shift_rows:
            shift = scores.amax(dim=-1)  # [kv_heads, n, max_q * group]
            # A row that saw no key has max -inf; subtract 0 instead so its probabilities are exp2(-inf) = 0.
            shift = torch.where(torch.isinf(shift), 0.0, shift)
            probs = scores.sub_(shift[..., None]).exp2_()  # unnormalised
        else:
            shift = torch.zeros((), device=query.device)
            probs = scores.exp2_()
        denominator = probs.sum(dim=-1)  # [kv_heads, n, max_q * group]
        out = torch.matmul(probs, values)  # [kv_heads, n, max_q * group, D]
        if shift_rows or sums_in_range(denominator, out, batch.rows_without_keys):
            break
    out /= denominator.clamp(min=torch.finfo(torch.float32).tiny)[..., None]  # rows without keys stay 0
    lse = torch.where(denominator > 0, (shift + denominator.log2()) * LN_2, float("-inf"))

    out = out.reshape(num_kv_heads, n, max_q, group, head_dim).permute(1, 2, 0, 3, 4).reshape(n, max_q, num_heads, -1)
    lse = lse.reshape(num_kv_heads, n, max_q, group).permute(1, 2, 0, 3).reshape(n, max_q, num_heads)
    return out[batch.valid], lse[batch.valid]


def _batch_chunk_size(max_q: int, num_keys: int, num_heads: int, num_kv_heads: int, head_dim: int) -> int:
    bytes_per_seq = 4 * num_keys * (2 * num_kv_heads * head_dim + 2 * max_q * num_heads)
    return max(1, BATCH_MEMORY_BUDGET_BYTES // max(bytes_per_seq, 1))


def paged_attention_with_lse(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # int32 [num_seqs, max_blocks_per_seq]
    seq_lens: torch.Tensor,  # int32 [num_seqs]
    query_start_loc: torch.Tensor,  # int32 [num_seqs + 1]
    scale: float,
    kv_start: torch.Tensor | None = None,  # int32 [num_seqs], first key position attended (default 0)
    causal: bool = True,
    plan: AttentionPlan | None = None,  # plan_attention(...) of these arguments, reused across layers
) -> tuple[torch.Tensor, torch.Tensor]:  # out float32 [num_tokens, num_heads, head_dim], lse float32
    """Partial paged attention over keys [kv_start, seq_len) (and <= the query position when causal)."""
    check_attention_inputs(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    plan = plan or plan_attention(query, k_cache, block_tables, seq_lens, query_start_loc, kv_start, causal)
    return _run_plan(query, k_cache, v_cache, scale, plan)


def _run_plan(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scale: float,
    plan: AttentionPlan,
) -> tuple[torch.Tensor, torch.Tensor]:  # out float32 [num_tokens, num_heads, head_dim], lse float32
    num_tokens, num_heads, head_dim = query.shape
    if len(plan.batches) == 1 and isinstance(plan.batches[0], _DecodeBatch) and plan.batches[0].every_token_in_order:
        decoded_out, decoded_lse = decode_in_place(query[:, None], plan.batches[0].decode, heads_major_view(k_cache),
                                                   heads_major_view(v_cache), scale)
        return decoded_out.view(num_tokens, num_heads, head_dim), decoded_lse.view(num_tokens, num_heads)
    out = torch.zeros(num_tokens, num_heads, head_dim, dtype=torch.float32, device=query.device)
    lse = torch.full((num_tokens, num_heads), float("-inf"), dtype=torch.float32, device=query.device)
    for batch in plan.batches:
        if isinstance(batch, _DecodeBatch):
            decoded_out, decoded_lse = decode_in_place(query[batch.token_ids], batch.decode,
                                                       heads_major_view(k_cache), heads_major_view(v_cache), scale)
            out[batch.rows], lse[batch.rows] = decoded_out[batch.valid], decoded_lse[batch.valid]
        else:
            out[batch.rows], lse[batch.rows] = _attend_gathered(query, k_cache, v_cache, batch, scale)
    return out, lse


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim], dtype of query
    """Causal paged attention of a ragged batch (see kernels/reference.py for the contract)."""
    out, _ = paged_attention_with_lse(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)
    return out.to(query.dtype)


def merge_attention_states(
    out_a: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    lse_a: torch.Tensor,  # float32 [num_tokens, num_heads]
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # out float32 [num_tokens, num_heads, head_dim], lse float32
    """Exact attention over two disjoint key sets from each set's (out, lse)."""
    check_merge_inputs(out_a, lse_a, out_b, lse_b)
    lse = torch.logaddexp(lse_a, lse_b)
    safe_lse = torch.where(torch.isinf(lse), 0.0, lse)  # both sides empty: weights exp(-inf) = 0
    weight_a = torch.exp(lse_a - safe_lse)[..., None]
    weight_b = torch.exp(lse_b - safe_lse)[..., None]
    return weight_a * out_a.float() + weight_b * out_b.float(), lse


def cascade_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # int32 [num_seqs, max_blocks_per_seq]
    seq_lens: torch.Tensor,  # int32 [num_seqs]
    query_start_loc: torch.Tensor,  # int32 [num_seqs + 1]
    prefix_block_tables: torch.Tensor,  # int32 [num_prefixes, max_prefix_blocks]
    prefix_lens: torch.Tensor,  # int32 [num_prefixes]
    seq_prefix_ids: torch.Tensor,  # int32 [num_seqs], -1 = no shared prefix
    scale: float,
    plan: CascadePlan | None = None,  # plan_cascade(...) of this batch, shared by all layers of a step
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim], dtype of query
    """Prefix pass (all branches of a prefix at once) + causal suffix pass, merged by log-sum-exp."""
    check_cascade_inputs(
        query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, prefix_block_tables, prefix_lens,
        seq_prefix_ids,
    )
    plan = plan or plan_cascade(query_start_loc, prefix_lens, seq_prefix_ids, query.shape[0])
    prefix_plan, suffix_plan = _cascade_attention_plans(query, k_cache, block_tables, seq_lens, query_start_loc,
                                                        prefix_block_tables, prefix_lens, plan)
    # Tokens without a prefix are in no prefix segment: they keep out 0 and lse -inf.
    prefix_out, prefix_lse = _run_plan(query, k_cache, v_cache, scale, prefix_plan)
    suffix_out, suffix_lse = _run_plan(query, k_cache, v_cache, scale, suffix_plan)
    out, _ = merge_attention_states(prefix_out, prefix_lse, suffix_out, suffix_lse)
    return out.to(query.dtype)


def _cascade_attention_plans(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    prefix_block_tables: torch.Tensor,
    prefix_lens: torch.Tensor,
    plan: CascadePlan,
) -> tuple[AttentionPlan, AttentionPlan]:
    """The prefix pass's and the suffix pass's attention plans, built by the first layer that asks and kept in
    the cascade plan's memo for the other layers of the step (they differ only in the cache geometry)."""
    key = ("torch", tuple(query.shape[1:]), tuple(k_cache.shape[1:]), heads_major_view(k_cache) is not None)
    plans = plan.memo.get(key)
    if plans is None:
        # The prefix pass reads the query rows of each prefix's branches in place through token_order.
        plans = (plan_attention(query, k_cache, prefix_block_tables, prefix_lens, plan.prefix_query_start_loc,
                                causal=False, token_order=plan.token_order),
                 plan_attention(query, k_cache, block_tables, seq_lens, query_start_loc, kv_start=plan.suffix_starts))
        plan.memo[key] = plans
    return plans
