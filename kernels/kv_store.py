"""Triton KV store: write this step's K/V rows into the paged cache through a slot mapping.

One program per token copies its [num_kv_heads, head_dim] key and value rows to slot
slot_mapping[token] = block_id * block_size + offset. Padding tokens (slot < 0) write nothing, so a
batch padded to a fixed size (CUDA graphs) needs no compaction first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .validation import check_store_kv_inputs


def runs_in_interpreter() -> bool:
    """True when Triton decorated these kernels for its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return isinstance(_store_kv_kernel, InterpretedFunction)


@triton.jit
def _store_kv_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,
    slot_mapping_ptr,  # int64 [num_tokens]
    stride_key_token, stride_key_head,
    stride_value_token, stride_value_head,
    stride_cache_block, stride_cache_offset, stride_cache_head,
    NUM_KV_HEADS: tl.constexpr,
    NUM_KV_HEADS_PADDED: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,
    CACHE_BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token)
    if slot >= 0:
        heads = tl.arange(0, NUM_KV_HEADS_PADDED)
        dims = tl.arange(0, HEAD_DIM_PADDED)
        mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)
        cache_index = (
            (slot // CACHE_BLOCK_SIZE) * stride_cache_block + (slot % CACHE_BLOCK_SIZE) * stride_cache_offset
            + heads[:, None] * stride_cache_head + dims[None, :]
        )
        key = tl.load(key_ptr + token * stride_key_token + heads[:, None] * stride_key_head + dims[None, :], mask=mask)
        value = tl.load(
            value_ptr + token * stride_value_token + heads[:, None] * stride_value_head + dims[None, :], mask=mask
        )
        tl.store(k_cache_ptr + cache_index, key, mask=mask)
        tl.store(v_cache_ptr + cache_index, value, mask=mask)


def store_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # int64 [num_tokens], < 0 = padding
) -> None:
    """Write K/V rows into their cache slots in place; padding slots are skipped."""
    check_store_kv_inputs(key, value, k_cache, v_cache, slot_mapping)
    for name, tensor in (("key", key), ("value", value)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {tensor.stride()}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not cache.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {cache.stride()}")
    if not slot_mapping.is_contiguous():
        raise ValueError(f"slot_mapping must be contiguous, got strides {slot_mapping.stride()}")
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, NUM_KV_HEADS_PADDED=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim, HEAD_DIM_PADDED=triton.next_power_of_2(head_dim),
        CACHE_BLOCK_SIZE=k_cache.shape[1],
    )
