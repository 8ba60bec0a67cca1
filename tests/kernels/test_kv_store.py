"""The Triton KV store (Triton interpreter on CPU) against the reference: exact slots, padding skipped."""

from __future__ import annotations

import pytest
import torch

from kernels import kv_store, reference

# These tests run the Triton kernels on CPU tensors, which only the interpreter can do. A GPU run with
# TRITON_INTERPRET=0 covers the compiled kernels in test_kernels_cuda.py instead.
pytestmark = pytest.mark.skipif(not kv_store.runs_in_interpreter(), reason="needs TRITON_INTERPRET=1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("block_size", "num_kv_heads", "head_dim"), [(4, 2, 8), (16, 3, 12)])
def test_triton_store_kv_matches_reference(dtype, block_size, num_kv_heads, head_dim):
    generator = torch.Generator().manual_seed(31)
    num_blocks = 3
    key = torch.randn(6, num_kv_heads, head_dim, generator=generator).to(dtype)
    value = torch.randn(6, num_kv_heads, head_dim, generator=generator).to(dtype)
    last = num_blocks * block_size - 1
    slots = torch.tensor([block_size + 1, -1, 0, last, 2, -1], dtype=torch.int64)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.full(shape, 7.0, dtype=dtype), torch.full(shape, 7.0, dtype=dtype)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    reference.store_kv(key, value, k_expected, v_expected, slots)
    kv_store.store_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)
    assert torch.equal(k_cache[1, 1], key[0]) and torch.equal(v_cache[-1, -1], value[3])
    assert torch.equal(k_cache[0, 2], key[4])
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[[block_size + 1, 0, last, 2]] = False
    assert k_cache.reshape(-1, num_kv_heads, head_dim)[untouched].eq(7).all()  # padding tokens wrote nothing


def test_key_and_value_may_be_strided_views_of_a_fused_projection():
    qkv = torch.randn(3, 6, 8)  # [tokens, q heads 2 + k heads 2 + v heads 2, dim]
    key, value = qkv[:, 2:4], qkv[:, 4:6]
    k_cache, v_cache = torch.zeros(2, 4, 2, 8), torch.zeros(2, 4, 2, 8)
    kv_store.store_kv(key, value, k_cache, v_cache, torch.tensor([5, 6, 0]))
    assert torch.equal(k_cache[1, 1], key[0]) and torch.equal(k_cache[1, 2], key[1])
    assert torch.equal(v_cache[0, 0], value[2])


def test_empty_batch_is_a_no_op():
    k_cache = torch.zeros(1, 4, 1, 8)
    kv_store.store_kv(torch.zeros(0, 1, 8), torch.zeros(0, 1, 8), k_cache, k_cache.clone(),
                      torch.zeros(0, dtype=torch.int64))
    assert not k_cache.any()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"slot_mapping": torch.tensor([0, 1], dtype=torch.int32)},
         "slot_mapping must be torch.int64, got torch.int32"),
        ({"slot_mapping": torch.tensor([0])}, r"slot_mapping must have shape \[num_tokens\] = \[2\], got \(1,\)"),
        ({"value": torch.zeros(2, 1, 8)}, r"value shape \(2, 1, 8\) differs from key shape \(2, 2, 8\)"),
        ({"key": torch.zeros(2, 2, 8).half(), "value": torch.zeros(2, 2, 8).half()},
         "key/value dtype torch.float16/torch.float16 differs from the cache dtype torch.float32"),
        ({"k_cache": torch.zeros(2, 2, 4, 8).transpose(1, 2)}, "k_cache must be contiguous, got strides"),
        ({"key": torch.zeros(2, 8, 2).transpose(1, 2)},
         r"key must have a contiguous last dimension \(stride 1\), got strides \(16, 1, 2\)"),
        ({"key": torch.zeros(2, 2, 4), "value": torch.zeros(2, 2, 4)},
         r"key has \[num_kv_heads, head_dim\] = \[2, 4\] but the cache has \[2, 8\]"),
    ],
)
def test_wrapper_rejects_bad_input_naming_the_problem(change, message):
    args = {
        "key": torch.zeros(2, 2, 8), "value": torch.zeros(2, 2, 8), "k_cache": torch.zeros(2, 4, 2, 8),
        "v_cache": torch.zeros(2, 4, 2, 8), "slot_mapping": torch.tensor([0, 1]),
    }
    args.update(change)
    with pytest.raises(ValueError, match=message):
        kv_store.store_kv(**args)
