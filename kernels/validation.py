"""Input checks shared by every attention / KV-store implementation (reference, torch, Triton).

Only shapes, dtypes and devices are checked here: they are free. Value checks (a slot past the cache end,
a sequence longer than its block table) would need a device sync, so the fast paths do not make them;
the reference implementation asserts them instead.
"""

from __future__ import annotations

import torch

ATTENTION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_dtype(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    if tensor.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {tensor.dtype}")


def _check_ndim(name: str, tensor: torch.Tensor, ndim: int, layout: str) -> None:
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(tensor.shape)}")


def _check_same_device(reference_name: str, reference: torch.Tensor, **others: torch.Tensor) -> None:
    for name, tensor in others.items():
        if tensor.device != reference.device:
            raise ValueError(f"{name} is on {tensor.device} but {reference_name} is on {reference.device}")


def check_kv_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], same shape and dtype."""
    _check_ndim("k_cache", k_cache, 4, "[num_blocks, block_size, num_kv_heads, head_dim]")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} differs from k_cache shape {tuple(k_cache.shape)}")
    if k_cache.dtype not in ATTENTION_DTYPES:
        raise ValueError(f"k_cache dtype must be one of float32/float16/bfloat16, got {k_cache.dtype}")
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache dtype {v_cache.dtype} differs from k_cache dtype {k_cache.dtype}")
    _check_same_device("k_cache", k_cache, v_cache=v_cache)


def check_store_kv_inputs(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """key/value [num_tokens, num_kv_heads, head_dim] into the cache through slot_mapping int64 [num_tokens]."""
    check_kv_cache(k_cache, v_cache)
    _check_ndim("key", key, 3, "[num_tokens, num_kv_heads, head_dim]")
    if value.shape != key.shape:
        raise ValueError(f"value shape {tuple(value.shape)} differs from key shape {tuple(key.shape)}")
    if key.shape[1:] != k_cache.shape[2:]:
        raise ValueError(
            f"key has [num_kv_heads, head_dim] = {list(key.shape[1:])} but the cache has {list(k_cache.shape[2:])}"
        )
    if key.dtype != k_cache.dtype or value.dtype != k_cache.dtype:
        raise ValueError(f"key/value dtype {key.dtype}/{value.dtype} differs from the cache dtype {k_cache.dtype}")
    _check_dtype("slot_mapping", slot_mapping, torch.int64)
    if slot_mapping.shape != (key.shape[0],):
        raise ValueError(
            f"slot_mapping must have shape [num_tokens] = [{key.shape[0]}], got {tuple(slot_mapping.shape)}"
        )
    _check_same_device("k_cache", k_cache, key=key, value=value, slot_mapping=slot_mapping)


def check_attention_inputs(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
) -> None:
    """The paged-attention contract; see kernels.dispatch.paged_attention for the meaning of each argument."""
    check_kv_cache(k_cache, v_cache)
    _check_ndim("query", query, 3, "[num_tokens, num_heads, head_dim]")
    if query.dtype != k_cache.dtype:
        raise ValueError(f"query dtype {query.dtype} differs from the cache dtype {k_cache.dtype}")
    if query.shape[2] != k_cache.shape[3]:
        raise ValueError(f"query head_dim {query.shape[2]} differs from the cache head_dim {k_cache.shape[3]}")
    num_heads, num_kv_heads = query.shape[1], k_cache.shape[2]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    _check_dtype("block_tables", block_tables, torch.int32)
    _check_ndim("block_tables", block_tables, 2, "[num_seqs, max_blocks_per_seq]")
    num_seqs = block_tables.shape[0]
    _check_dtype("seq_lens", seq_lens, torch.int32)
    if seq_lens.shape != (num_seqs,):
        raise ValueError(f"seq_lens must have shape [num_seqs] = [{num_seqs}], got {tuple(seq_lens.shape)}")
    _check_dtype("query_start_loc", query_start_loc, torch.int32)
    if query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(
            f"query_start_loc must have shape [num_seqs + 1] = [{num_seqs + 1}], got {tuple(query_start_loc.shape)}"
        )
    _check_same_device(
        "query", query, k_cache=k_cache, block_tables=block_tables, seq_lens=seq_lens, query_start_loc=query_start_loc
    )


def check_cascade_inputs(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    prefix_block_tables: torch.Tensor,
    prefix_lens: torch.Tensor,
    seq_prefix_ids: torch.Tensor,
) -> None:
    """The paged-attention contract plus the shared-prefix metadata of cascade attention."""
    check_attention_inputs(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    _check_dtype("prefix_block_tables", prefix_block_tables, torch.int32)
    _check_ndim("prefix_block_tables", prefix_block_tables, 2, "[num_prefixes, max_prefix_blocks]")
    num_prefixes = prefix_block_tables.shape[0]
    _check_dtype("prefix_lens", prefix_lens, torch.int32)
    if prefix_lens.shape != (num_prefixes,):
        raise ValueError(
            f"prefix_lens must have shape [num_prefixes] = [{num_prefixes}], got {tuple(prefix_lens.shape)}"
        )
    _check_dtype("seq_prefix_ids", seq_prefix_ids, torch.int32)
    num_seqs = block_tables.shape[0]
    if seq_prefix_ids.shape != (num_seqs,):
        raise ValueError(
            f"seq_prefix_ids must have shape [num_seqs] = [{num_seqs}], got {tuple(seq_prefix_ids.shape)}"
        )
    _check_same_device(
        "query", query, prefix_block_tables=prefix_block_tables, prefix_lens=prefix_lens, seq_prefix_ids=seq_prefix_ids
    )


def check_merge_inputs(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> None:
    """out_*: [num_tokens, num_heads, head_dim]; lse_*: float32 [num_tokens, num_heads]."""
    _check_ndim("out_a", out_a, 3, "[num_tokens, num_heads, head_dim]")
    if out_b.shape != out_a.shape:
        raise ValueError(f"out_b shape {tuple(out_b.shape)} differs from out_a shape {tuple(out_a.shape)}")
    for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        _check_dtype(name, lse, torch.float32)
        if lse.shape != out_a.shape[:2]:
            raise ValueError(f"{name} must have shape [num_tokens, num_heads] = {list(out_a.shape[:2])}, "
                             f"got {tuple(lse.shape)}")
    _check_same_device("out_a", out_a, out_b=out_b, lse_a=lse_a, lse_b=lse_b)
