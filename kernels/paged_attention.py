"""Triton paged attention for a ragged batch (prefill chunks and decode steps mixed), with GQA and split-KV.

One program handles BLOCK_Q query tokens of one sequence times the GROUP query heads that share one KV
head: BLOCK_M = BLOCK_Q * GROUP rows of the score tile, so each K/V tile is loaded once for all of them.
Keys are walked BLOCK_N positions at a time; each position is looked up in the block table, so any cache
block size works and a range may start mid-block (a cascade suffix starts where its prefix ends).
Softmax is online (running max m, sum l, unnormalised acc) in float32.

Split-KV: for few programs over long contexts the key range is cut into num_splits pieces handled by
separate programs; each writes its normalised partial output and log-sum-exp, and a second kernel merges
the pieces exactly by log-sum-exp.

The same kernel serves cascade attention: with TOKEN_INDIRECT the rows of a segment are tokens listed in
token_ids (the branches of a prefix, gathered), and with HAS_INIT_STATE the softmax state starts from a
previous partial result (the prefix pass) instead of empty, which merges the two passes for free.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .validation import check_attention_inputs

MAX_SPLITS = 16
SPLIT_MIN_KEYS = 512  # a split shorter than this does not pay for its merge


def runs_in_interpreter() -> bool:
    """True when Triton decorated these kernels for its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return isinstance(_paged_attention_kernel, InterpretedFunction)


@triton.jit
def _find_segment(query_start_loc_ptr, q_block_id, num_segments, BLOCK_Q: tl.constexpr):
    """The segment whose query blocks contain q_block_id. Segment s owns the program ids starting at
    query_start_loc[s] // BLOCK_Q + s: one more than it needs at most, so no host-side count is needed."""
    lo: tl.int32 = 0
    hi = num_segments
    while lo < hi:
        mid = (lo + hi) // 2
        first_block = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_block <= q_block_id:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _paged_attention_kernel(
    query_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,
    out_ptr,  # [num_splits, num_tokens, num_heads, head_dim] (split stride 0 when unsplit)
    lse_ptr,  # float32 [num_splits, num_tokens, num_heads] (written if STORE_LSE)
    init_out_ptr,  # float32 [num_tokens, num_heads, head_dim] (read if HAS_INIT_STATE)
    init_lse_ptr,  # float32 [num_tokens, num_heads] (read if HAS_INIT_STATE)
    block_tables_ptr,  # int32 [num_segments, max_blocks]
    seq_lens_ptr,  # int32 [num_segments]
    query_start_loc_ptr,  # int32 [num_segments + 1]
    kv_start_ptr,  # int32 [num_segments] (read if HAS_KV_START)
    token_ids_ptr,  # int64 [num_tokens] (read if TOKEN_INDIRECT)
    scale,
    num_segments,
    split_size,  # keys per split, a multiple of BLOCK_N
    stride_q_token, stride_q_head,
    stride_cache_block, stride_cache_offset, stride_cache_head,
    stride_out_split, stride_out_token, stride_out_head,
    stride_lse_split, stride_lse_token,
    stride_block_table,
    stride_init_token,  # init_out is [num_tokens, num_heads, HEAD_DIM] contiguous, init_lse [num_tokens, num_heads]
    GROUP: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,
    CACHE_BLOCK_SIZE: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KV_START: tl.constexpr,
    TOKEN_INDIRECT: tl.constexpr,
    HAS_INIT_STATE: tl.constexpr,
    STORE_LSE: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    q_block_id = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seg = _find_segment(query_start_loc_ptr, q_block_id, num_segments, BLOCK_Q)
    q_begin = tl.load(query_start_loc_ptr + seg)
    q_len = tl.load(query_start_loc_ptr + seg + 1) - q_begin
    q_offset = (q_block_id - (q_begin // BLOCK_Q + seg)) * BLOCK_Q
    if q_offset < q_len:
        seq_len = tl.load(seq_lens_ptr + seg)
        kv_lo = 0
        if HAS_KV_START:
            kv_lo = tl.load(kv_start_ptr + seg)

        rows = tl.arange(0, BLOCK_M)
        row_q = q_offset + rows // GROUP  # query index within the segment
        row_valid = (rows < BLOCK_Q * GROUP) & (row_q < q_len)
        heads = kv_head * GROUP + rows % GROUP
        tokens = (q_begin + row_q).to(tl.int64)
        if TOKEN_INDIRECT:
            tokens = tl.load(token_ids_ptr + tokens, mask=row_valid, other=0)
        q_pos = seq_len - q_len + row_q
        dims = tl.arange(0, HEAD_DIM_PADDED)
        dim_valid = dims < HEAD_DIM

        q = tl.load(
            query_ptr + tokens[:, None] * stride_q_token + heads[:, None] * stride_q_head + dims[None, :],
            mask=row_valid[:, None] & dim_valid[None, :],
            other=0.0,
        )
        if DOT_IN_FP32:
            q = q.to(tl.float32)

        # Keys of this program: [kv_lo, seq_len), cut at the last query's position when causal.
        kv_hi = seq_len
        if CAUSAL:
            kv_hi = tl.minimum(seq_len, seq_len - q_len + q_offset + BLOCK_Q)
        split_lo = kv_lo + split * split_size
        split_hi = tl.minimum(kv_hi, split_lo + split_size)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], dtype=tl.float32)
        if HAS_INIT_STATE:
            if split == 0:  # the previous partial result enters exactly once
                state_row = tokens * stride_init_token + heads
                m_i = tl.load(init_lse_ptr + state_row, mask=row_valid, other=float("-inf"))
                l_i = tl.where(m_i == float("-inf"), 0.0, 1.0)
                acc = tl.load(
                    init_out_ptr + state_row[:, None] * HEAD_DIM + dims[None, :],
                    mask=row_valid[:, None] & dim_valid[None, :],
                    other=0.0,
                )

        block_table_row = block_tables_ptr + seg.to(tl.int64) * stride_block_table
        for start in range(split_lo, split_hi, BLOCK_N):
            positions = start + tl.arange(0, BLOCK_N)
            key_valid = positions < split_hi
            blocks = tl.load(block_table_row + positions // CACHE_BLOCK_SIZE, mask=key_valid, other=0).to(tl.int64)
            cache_index = (
                blocks * stride_cache_block + (positions % CACHE_BLOCK_SIZE) * stride_cache_offset
                + kv_head * stride_cache_head
            )
            kv_mask = key_valid[:, None] & dim_valid[None, :]
            k = tl.load(k_cache_ptr + cache_index[:, None] + dims[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + cache_index[:, None] + dims[None, :], mask=kv_mask, other=0.0)
            if DOT_IN_FP32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
                scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                scores = tl.dot(q, tl.trans(k)) * scale
            allowed = row_valid[:, None] & key_valid[None, :]
            if CAUSAL:
                allowed = allowed & (positions[None, :] <= q_pos[:, None])
            scores = tl.where(allowed, scores, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            # Rows that have seen no key yet keep m = -inf; shift by 0 there so exp gives 0, not nan.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_shift)
            p = tl.exp(scores - m_shift[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if DOT_IN_FP32:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

        seen = l_i > 0.0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        out_index = split * stride_out_split + tokens * stride_out_token + heads * stride_out_head
        tl.store(
            out_ptr + out_index[:, None] + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_valid[:, None] & dim_valid[None, :],
        )
        if STORE_LSE:
            lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
            tl.store(lse_ptr + split * stride_lse_split + tokens * stride_lse_token + heads, lse, mask=row_valid)


@triton.jit
def _merge_splits_kernel(
    split_out_ptr,  # float32 [num_splits, num_tokens, num_heads, head_dim]
    split_lse_ptr,  # float32 [num_splits, num_tokens, num_heads]
    out_ptr,  # [num_tokens, num_heads, head_dim]
    lse_ptr,  # float32 [num_tokens, num_heads] (written if STORE_LSE)
    num_splits,
    num_heads,
    stride_split_out, stride_split_lse,
    stride_out_token, stride_out_head,
    NUM_SPLITS_PADDED: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,
    STORE_LSE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # token * num_heads + head
    token = row // num_heads
    head = row % num_heads
    splits = tl.arange(0, NUM_SPLITS_PADDED)
    dims = tl.arange(0, HEAD_DIM_PADDED)
    split_valid = splits < num_splits
    lse = tl.load(split_lse_ptr + splits * stride_split_lse + row, mask=split_valid, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    lse_shift = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weights = tl.exp(lse - lse_shift)
    total = tl.sum(weights, axis=0)
    parts = tl.load(
        split_out_ptr + splits[:, None] * stride_split_out + row * HEAD_DIM + dims[None, :],
        mask=split_valid[:, None] & (dims[None, :] < HEAD_DIM),
        other=0.0,
    )
    out = tl.sum(parts * weights[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(
        out_ptr + token * stride_out_token + head * stride_out_head + dims,
        out.to(out_ptr.dtype.element_ty),
        mask=dims < HEAD_DIM,
    )
    if STORE_LSE:
        tl.store(lse_ptr + row, tl.where(total > 0.0, lse_shift + tl.log(tl.where(total > 0.0, total, 1.0)),
                                         float("-inf")))


def check_triton_layout(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, *metadata: tuple[str, torch.Tensor]) -> None:
    """The strides the kernels assume; raises ValueError naming the tensor."""
    if query.stride(-1) != 1:
        raise ValueError(f"query must have a contiguous last dimension (stride 1), got strides {query.stride()}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not cache.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {cache.stride()}")
    if block_tables.stride(-1) != 1:
        raise ValueError(f"block_tables rows must be contiguous, got strides {block_tables.stride()}")
    for name, tensor in metadata:
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {tensor.stride()}")


def _pick_block_m(group: int, num_tokens: int, num_segments: int) -> int:
    """Rows per program: enough query tokens of a segment to fill a 16-row tensor-core tile at least,
    up to 64 rows when segments are long (prefill, a prefix shared by many branches)."""
    mean_queries = max(1, num_tokens // max(num_segments, 1))
    return min(max(16, triton.next_power_of_2(group * mean_queries)), max(64, triton.next_power_of_2(group)))


def _pick_num_splits(num_programs: int, max_keys: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    if num_programs >= num_sms:
        return 1
    return max(1, min(MAX_SPLITS, max_keys // SPLIT_MIN_KEYS, -(-2 * num_sms // max(num_programs, 1))))


def launch_paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # int32 [num_segments, max_blocks]
    seq_lens: torch.Tensor,  # int32 [num_segments]
    query_start_loc: torch.Tensor,  # int32 [num_segments + 1]
    scale: float,
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim], written in place (rows of the segments)
    lse: torch.Tensor | None,  # float32 [num_tokens, num_heads], written in place if given
    kv_start: torch.Tensor | None = None,
    causal: bool = True,
    token_ids: torch.Tensor | None = None,  # int64: row r of segment s is token token_ids[qsl[s] + r]
    init_state: tuple[torch.Tensor, torch.Tensor] | None = None,  # float32 (out, lse) to continue from
    num_splits: int | None = None,
    block_n: int | None = None,
    block_m: int | None = None,  # rows per program (tuning knob; default from the batch shape)
    num_warps: int | None = None,
) -> None:
    """Launch the paged attention kernel (and the split merge) on already checked inputs."""
    num_tokens, num_heads, head_dim = query.shape
    num_segments = block_tables.shape[0]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    if num_tokens == 0 or num_segments == 0:
        return
    block_m = block_m or _pick_block_m(group, num_tokens, num_segments)
    block_q = max(1, block_m // group)
    block_n = block_n or (64 if head_dim <= 128 else 32)
    num_q_blocks = num_tokens // block_q + num_segments  # upper bound; spare programs exit at once
    max_keys = block_tables.shape[1] * block_size
    if num_splits is None:
        num_splits = _pick_num_splits(num_q_blocks * num_kv_heads, max_keys, query.device)
    split_size = triton.cdiv(triton.cdiv(max_keys, num_splits), block_n) * block_n
    num_splits = triton.cdiv(max_keys, split_size)

    if num_splits == 1:
        target_out, target_lse = out, lse
    else:
        target_out = torch.zeros(num_splits, *out.shape, dtype=torch.float32, device=out.device)
        target_lse = torch.full((num_splits, *out.shape[:2]), float("-inf"), dtype=torch.float32, device=out.device)
    store_lse = target_lse is not None
    lse_arg = target_lse if store_lse else out
    init_out, init_lse = init_state if init_state is not None else (out, out)
    dummy_int = query_start_loc
    grid = (num_q_blocks, num_kv_heads, num_splits)
    _paged_attention_kernel[grid](
        query, k_cache, v_cache, target_out, lse_arg, init_out, init_lse,
        block_tables, seq_lens, query_start_loc,
        kv_start if kv_start is not None else dummy_int,
        token_ids if token_ids is not None else dummy_int,
        scale, num_segments, split_size,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        target_out.stride(0) if num_splits > 1 else 0, target_out.stride(-3), target_out.stride(-2),
        (target_lse.stride(0) if num_splits > 1 else 0) if store_lse else 0,
        target_lse.stride(-2) if store_lse else 0,
        block_tables.stride(0), num_heads,
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n,
        HEAD_DIM=head_dim, HEAD_DIM_PADDED=max(16, triton.next_power_of_2(head_dim)),
        CACHE_BLOCK_SIZE=block_size, CAUSAL=causal, HAS_KV_START=kv_start is not None,
        TOKEN_INDIRECT=token_ids is not None, HAS_INIT_STATE=init_state is not None, STORE_LSE=store_lse,
        DOT_IN_FP32=query.dtype == torch.float32 or query.device.type != "cuda",
        num_warps=num_warps or (8 if block_m >= 128 else 4),
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_tokens * num_heads,)](
            target_out, target_lse, out, lse if lse is not None else target_lse,
            num_splits, num_heads,
            target_out.stride(0), target_lse.stride(0),
            out.stride(0), out.stride(1),
            NUM_SPLITS_PADDED=triton.next_power_of_2(num_splits),
            HEAD_DIM=head_dim, HEAD_DIM_PADDED=max(16, triton.next_power_of_2(head_dim)),
            STORE_LSE=lse is not None,
        )


def paged_attention_with_lse(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # int32 [num_seqs, max_blocks_per_seq]
    seq_lens: torch.Tensor,  # int32 [num_seqs]
    query_start_loc: torch.Tensor,  # int32 [num_seqs + 1]
    scale: float,
    kv_start: torch.Tensor | None = None,  # int32 [num_seqs]
    causal: bool = True,
    num_splits: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # out float32 [num_tokens, num_heads, head_dim], lse float32
    """Partial paged attention over keys [kv_start, seq_len) returning (out, lse); see kernels/reference.py."""
    check_attention_inputs(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    check_triton_layout(query, k_cache, v_cache, block_tables, ("seq_lens", seq_lens),
                        ("query_start_loc", query_start_loc))
    if kv_start is not None and (kv_start.dtype != torch.int32 or kv_start.shape != seq_lens.shape):
        raise ValueError(f"kv_start must be int32 [num_seqs], got {kv_start.dtype} {tuple(kv_start.shape)}")
    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    lse = torch.full(query.shape[:2], float("-inf"), dtype=torch.float32, device=query.device)
    launch_paged_attention(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out, lse,
           kv_start=kv_start, causal=causal, num_splits=num_splits, block_n=block_n)
    return out, lse


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # int32 [num_seqs, max_blocks_per_seq]
    seq_lens: torch.Tensor,  # int32 [num_seqs]
    query_start_loc: torch.Tensor,  # int32 [num_seqs + 1]
    scale: float,
    num_splits: int | None = None,  # None: split long contexts when there are too few programs
    block_n: int | None = None,  # keys per inner iteration (default 64)
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim], dtype of query
    """Causal paged attention of a ragged batch; see kernels/dispatch.py for the contract."""
    check_attention_inputs(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    check_triton_layout(query, k_cache, v_cache, block_tables, ("seq_lens", seq_lens),
                        ("query_start_loc", query_start_loc))
    out = torch.empty_like(query)
    launch_paged_attention(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out, None,
           num_splits=num_splits, block_n=block_n)
    return out

