"""Triton cascade attention: many shared prefixes per batch, each attended once by all its branches.

Pass 1 (prefix): the query tokens are grouped by prefix (kernels/prefix_groups.py) and the paged
attention kernel runs with one segment per prefix, no causal mask (every branch query lies after its
prefix), reading each prefix's K/V once for all its branches. It yields (out, lse) per token.
Pass 2 (suffix): the same kernel runs causally over each sequence's own positions [prefix_len, pos],
starting its online softmax from the prefix pass's (out, lse); that is the log-sum-exp merge of the two
partial results, done in registers instead of by a third kernel.

merge_attention_states is the same merge as a standalone kernel, for callers that hold two partials.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .paged_attention import check_triton_layout, launch_paged_attention
from .prefix_groups import CascadePlan, plan_cascade
from .validation import check_cascade_inputs, check_merge_inputs


def runs_in_interpreter() -> bool:
    """True when Triton decorated these kernels for its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return isinstance(_merge_attention_states_kernel, InterpretedFunction)


@triton.jit
def _merge_attention_states_kernel(
    out_a_ptr,  # [num_tokens, num_heads, head_dim]
    lse_a_ptr,  # float32 [num_tokens, num_heads]
    out_b_ptr,
    lse_b_ptr,
    out_ptr,  # float32 [num_tokens, num_heads, head_dim]
    lse_ptr,  # float32 [num_tokens, num_heads]
    stride_a_token, stride_a_head,
    stride_b_token, stride_b_head,
    stride_lse_a_token, stride_lse_b_token,
    NUM_HEADS: tl.constexpr,
    NUM_HEADS_PADDED: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, NUM_HEADS_PADDED)
    dims = tl.arange(0, HEAD_DIM_PADDED)
    head_valid = heads < NUM_HEADS
    mask = head_valid[:, None] & (dims[None, :] < HEAD_DIM)
    lse_a = tl.load(lse_a_ptr + token * stride_lse_a_token + heads, mask=head_valid, other=float("-inf"))
    lse_b = tl.load(lse_b_ptr + token * stride_lse_b_token + heads, mask=head_valid, other=float("-inf"))
    lse_max = tl.maximum(lse_a, lse_b)
    shift = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # both empty: weights exp(-inf) = 0
    weight_a = tl.exp(lse_a - shift)
    weight_b = tl.exp(lse_b - shift)
    total = weight_a + weight_b
    out_a = tl.load(out_a_ptr + token * stride_a_token + heads[:, None] * stride_a_head + dims[None, :], mask=mask)
    out_b = tl.load(out_b_ptr + token * stride_b_token + heads[:, None] * stride_b_head + dims[None, :], mask=mask)
    safe_total = tl.where(total > 0.0, total, 1.0)
    out = (out_a.to(tl.float32) * weight_a[:, None] + out_b.to(tl.float32) * weight_b[:, None]) / safe_total[:, None]
    tl.store(out_ptr + (token * NUM_HEADS + heads[:, None]) * HEAD_DIM + dims[None, :], out, mask=mask)
    lse = tl.where(total > 0.0, shift + tl.log(safe_total), float("-inf"))
    tl.store(lse_ptr + token * NUM_HEADS + heads, lse, mask=head_valid)


def merge_attention_states(
    out_a: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    lse_a: torch.Tensor,  # float32 [num_tokens, num_heads]
    out_b: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    lse_b: torch.Tensor,  # float32 [num_tokens, num_heads]
) -> tuple[torch.Tensor, torch.Tensor]:  # out float32 [num_tokens, num_heads, head_dim], lse float32
    """Exact attention over the union of two disjoint key sets from the (out, lse) of each."""
    check_merge_inputs(out_a, lse_a, out_b, lse_b)
    for name, tensor in (("out_a", out_a), ("out_b", out_b), ("lse_a", lse_a), ("lse_b", lse_b)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {tensor.stride()}")
    num_tokens, num_heads, head_dim = out_a.shape
    out = torch.empty(out_a.shape, dtype=torch.float32, device=out_a.device)
    lse = torch.empty(out_a.shape[:2], dtype=torch.float32, device=out_a.device)
    if num_tokens:
        _merge_attention_states_kernel[(num_tokens,)](
            out_a, lse_a, out_b, lse_b, out, lse,
            out_a.stride(0), out_a.stride(1), out_b.stride(0), out_b.stride(1), lse_a.stride(0), lse_b.stride(0),
            NUM_HEADS=num_heads, NUM_HEADS_PADDED=triton.next_power_of_2(num_heads),
            HEAD_DIM=head_dim, HEAD_DIM_PADDED=triton.next_power_of_2(head_dim),
        )
    return out, lse


def cascade_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # int32 [num_seqs, max_blocks_per_seq]
    seq_lens: torch.Tensor,  # int32 [num_seqs]
    query_start_loc: torch.Tensor,  # int32 [num_seqs + 1]
    prefix_block_tables: torch.Tensor,  # int32 [num_prefixes, max_prefix_blocks]
    prefix_lens: torch.Tensor,  # int32 [num_prefixes]
    seq_prefix_ids: torch.Tensor,  # int32 [num_seqs], -1 = no shared prefix
    scale: float,
    plan: CascadePlan | None = None,  # plan_cascade(...) of this batch, shared by all layers of a step
    num_splits: int | None = None,  # split-KV of both passes (None: automatic, only on CUDA)
    block_n: int | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim], dtype of query
    """Paged attention of a batch whose sequences share prefixes; see kernels/dispatch.py for the contract."""
    check_cascade_inputs(
        query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, prefix_block_tables, prefix_lens,
        seq_prefix_ids,
    )
    check_triton_layout(
        query, k_cache, v_cache, block_tables, ("seq_lens", seq_lens), ("query_start_loc", query_start_loc),
        ("prefix_block_tables", prefix_block_tables), ("prefix_lens", prefix_lens),
    )
    plan = plan or plan_cascade(query_start_loc, prefix_lens, seq_prefix_ids, query.shape[0])
    # Tokens of sequences without a prefix are in no prefix segment and keep this empty state.
    prefix_out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    prefix_lse = torch.full(query.shape[:2], float("-inf"), dtype=torch.float32, device=query.device)
    launch_paged_attention(
        query, k_cache, v_cache, prefix_block_tables, prefix_lens, plan.prefix_query_start_loc, scale,
        prefix_out, prefix_lse, causal=False, token_ids=plan.token_order, num_splits=num_splits, block_n=block_n,
    )
    out = torch.empty_like(query)
    launch_paged_attention(
        query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out, None,
        kv_start=plan.suffix_starts, causal=True, init_state=(prefix_out, prefix_lse),
        num_splits=num_splits, block_n=block_n,
    )
    return out
