"""Plain torch versions of every kernel: the definition of correct, written to be read, not to be fast.

One Python loop per sequence (or per token for the KV store); every other implementation (the vectorised
torch path in kernels/torch_attention.py, the Triton kernels) is tested against these functions.

Conventions shared by all implementations:
- KV cache: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim]; token position n of a
  sequence lives at block block_table[n // block_size], offset n % block_size.
- Queries are ragged: the queries of sequence s are query[query_start_loc[s]:query_start_loc[s + 1]].
- seq_lens counts the whole context including this step's queries (their K/V are already stored), so
  query i of a sequence with q_len queries sits at position seq_len - q_len + i.
- Partial attention returns (out float32 [num_tokens, num_heads, head_dim], lse float32 [num_tokens,
  num_heads]); lse = log sum_k exp(scale * q.k). A row that saw no key has out 0 and lse -inf.
"""

from __future__ import annotations

import torch

from .validation import check_attention_inputs, check_cascade_inputs, check_merge_inputs, check_store_kv_inputs


def store_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # int64 [num_tokens]
) -> None:
    """Write token t's K/V to slot slot_mapping[t] = block_id * block_size + offset; slot < 0 is padding."""
    check_store_kv_inputs(key, value, k_cache, v_cache, slot_mapping)
    num_blocks, block_size = k_cache.shape[:2]
    for token, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        assert slot < num_blocks * block_size, f"slot {slot} is past the cache end"
        k_cache[slot // block_size, slot % block_size] = key[token]
        v_cache[slot // block_size, slot % block_size] = value[token]


def gather_positions(
    cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # int32 [max_blocks]
    positions: torch.Tensor,  # int64 [n]
) -> torch.Tensor:  # [n, num_kv_heads, head_dim]
    """The cached K (or V) of the given token positions of one sequence."""
    block_size = cache.shape[1]
    blocks = block_table.long()[positions // block_size]
    return cache[blocks, positions % block_size]


def attention_with_lse(
    query: torch.Tensor,  # [q, num_heads, head_dim]
    key: torch.Tensor,  # [k, num_kv_heads, head_dim]
    value: torch.Tensor,  # [k, num_kv_heads, head_dim]
    allowed: torch.Tensor,  # bool [q, k]: may query i see key j
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # out float32 [q, num_heads, head_dim], lse float32 [q, num_heads]
    """Softmax attention in float32 with grouped KV heads, returning the log-sum-exp of the scores."""
    group = query.shape[1] // key.shape[1]
    key = key.float().repeat_interleave(group, dim=1)
    value = value.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", query.float(), key) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [num_heads, q]; -inf where a row saw no key
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # exp(-inf - -inf) = nan -> 0
    out = torch.einsum("hqk,khd->qhd", probs, value)
    return out, lse.transpose(0, 1).contiguous()


def paged_attention_with_lse(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # int32 [num_seqs, max_blocks_per_seq]
    seq_lens: torch.Tensor,  # int32 [num_seqs]
    query_start_loc: torch.Tensor,  # int32 [num_seqs + 1]
    scale: float,
    kv_start: torch.Tensor | None = None,  # int32 [num_seqs]: first key position attended (default 0)
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:  # out float32 [num_tokens, num_heads, head_dim], lse float32
    """Partial paged attention over key positions [kv_start, seq_len) of each sequence.

    causal=True: query i also stops at its own position seq_len - q_len + i.
    causal=False: every query of the sequence sees every key in the range (a shared prefix).
    """
    check_attention_inputs(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    num_tokens, num_heads, head_dim = query.shape
    out = torch.zeros(num_tokens, num_heads, head_dim, dtype=torch.float32, device=query.device)
    lse = torch.full((num_tokens, num_heads), float("-inf"), dtype=torch.float32, device=query.device)
    starts = query_start_loc.tolist()
    assert starts[-1] == num_tokens, f"query_start_loc ends at {starts[-1]}, not at num_tokens {num_tokens}"
    for seq, seq_len in enumerate(seq_lens.tolist()):
        q_begin, q_end = starts[seq], starts[seq + 1]
        q_len = q_end - q_begin
        first_key = 0 if kv_start is None else int(kv_start[seq])
        assert seq_len <= block_tables.shape[1] * k_cache.shape[1], f"sequence {seq} outgrows its block table"
        if q_len == 0 or first_key >= seq_len:
            continue
        key_positions = torch.arange(first_key, seq_len, device=query.device)
        keys = gather_positions(k_cache, block_tables[seq], key_positions)
        values = gather_positions(v_cache, block_tables[seq], key_positions)
        query_positions = torch.arange(seq_len - q_len, seq_len, device=query.device)
        if causal:
            allowed = key_positions[None, :] <= query_positions[:, None]
        else:
            allowed = torch.ones(q_len, len(key_positions), dtype=torch.bool, device=query.device)
        out[q_begin:q_end], lse[q_begin:q_end] = attention_with_lse(
            query[q_begin:q_end], keys, values, allowed, scale
        )
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
    """Causal attention of a ragged batch over a paged KV cache (keys [0, pos] for the query at pos)."""
    out, _ = paged_attention_with_lse(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)
    return out.to(query.dtype)


def merge_attention_states(
    out_a: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    lse_a: torch.Tensor,  # float32 [num_tokens, num_heads]
    out_b: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    lse_b: torch.Tensor,  # float32 [num_tokens, num_heads]
) -> tuple[torch.Tensor, torch.Tensor]:  # out float32 [num_tokens, num_heads, head_dim], lse float32
    """Exact attention over the union of two disjoint key sets from the attention over each one."""
    check_merge_inputs(out_a, lse_a, out_b, lse_b)
    lse = torch.logaddexp(lse_a, lse_b)  # -inf only where both sides saw no key
    weight_a = torch.exp(lse_a - lse).nan_to_num(0.0)
    weight_b = torch.exp(lse_b - lse).nan_to_num(0.0)
    out = weight_a[..., None] * out_a.float() + weight_b[..., None] * out_b.float()
    return out, lse


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
    plan: object = None,  # accepted for a uniform dispatch signature; the reference groups queries itself
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim], dtype of query
    """Causal paged attention where sequence s first sees prefix seq_prefix_ids[s] through the prefix's
    block table (no mask: all its queries lie after the prefix), then its own positions [prefix_len, pos];
    the two parts are merged by log-sum-exp. Equals paged_attention on the same batch."""
    check_cascade_inputs(
        query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, prefix_block_tables, prefix_lens,
        seq_prefix_ids,
    )
    num_seqs = block_tables.shape[0]
    starts = query_start_loc.tolist()
    prefix_out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    prefix_lse = torch.full(query.shape[:2], float("-inf"), dtype=torch.float32, device=query.device)
    suffix_start = torch.zeros(num_seqs, dtype=torch.int32, device=query.device)
    for seq, prefix in enumerate(seq_prefix_ids.tolist()):
        if prefix < 0:
            continue
        prefix_len = int(prefix_lens[prefix])
        q_begin, q_end = starts[seq], starts[seq + 1]
        assert prefix_len <= int(seq_lens[seq]) - (q_end - q_begin), f"sequence {seq} has queries inside its prefix"
        suffix_start[seq] = prefix_len
        if prefix_len == 0 or q_end == q_begin:
            continue
        key_positions = torch.arange(prefix_len, device=query.device)
        keys = gather_positions(k_cache, prefix_block_tables[prefix], key_positions)
        values = gather_positions(v_cache, prefix_block_tables[prefix], key_positions)
        allowed = torch.ones(q_end - q_begin, prefix_len, dtype=torch.bool, device=query.device)
        prefix_out[q_begin:q_end], prefix_lse[q_begin:q_end] = attention_with_lse(
            query[q_begin:q_end], keys, values, allowed, scale
        )
    suffix_out, suffix_lse = paged_attention_with_lse(
        query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, kv_start=suffix_start
    )
    out, _ = merge_attention_states(prefix_out, prefix_lse, suffix_out, suffix_lse)
    return out.to(query.dtype)
