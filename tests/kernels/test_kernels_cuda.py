"""The Triton kernels compiled for a real GPU (skipped without CUDA): production head sizes, native
fp16/bf16 tensor-core dots, the automatic split-KV choice, against the torch paths on the same device.

GPU tolerances are wider than the interpreter's for fp16/bf16: the kernel rounds the softmax
probabilities to the input dtype before the P @ V dot (as flash attention does).
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import independent, make_batch, shared

from kernels import dispatch, reference, torch_attention
from kernels import paged_attention as triton_attention

# Under the interpreter these would run on the CPU and prove nothing about the compiled kernels.
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(triton_attention.runs_in_interpreter(), reason="needs TRITON_INTERPRET=0 to compile"),
]

GPU_TOLERANCES = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.float16: {"atol": 4e-3, "rtol": 4e-3},
    torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("block_size", "num_kv_heads", "group_size", "head_dim"), [(16, 8, 4, 128), (32, 2, 1, 64)])
def test_paged_attention_on_cuda_matches_reference(dtype, block_size, num_kv_heads, group_size, head_dim):
    groups = [independent((1, 1), (300, 1), (77, 77), (520, 33), (129, 2))]
    batch = make_batch(groups, block_size, num_kv_heads, group_size, head_dim, dtype=dtype, seed=51).to("cuda")
    expected = reference.paged_attention(*batch.attention_args())
    torch.testing.assert_close(dispatch.paged_attention(*batch.attention_args()), expected, **GPU_TOLERANCES[dtype])


def test_long_context_decode_uses_split_kv_and_matches():
    batch = make_batch([independent((5000, 1), (4100, 1))], 16, 8, 4, 128, dtype=torch.bfloat16, seed=52).to("cuda")
    expected = torch_attention.paged_attention(*batch.attention_args())
    assert triton_attention._pick_num_splits(2 * 8, 5000, batch.query.device) > 1
    torch.testing.assert_close(dispatch.paged_attention(*batch.attention_args()), expected,
                               **GPU_TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cascade_on_cuda_matches_paged_attention(dtype):
    groups = [shared(300, *[(400, 1)] * 16), shared(77, *[(90, 1)] * 5, (120, 9)), independent((50, 3))]
    batch = make_batch(groups, 16, 8, 4, 128, dtype=dtype, seed=53).to("cuda")
    expected = torch_attention.paged_attention(*batch.attention_args())
    torch.testing.assert_close(dispatch.cascade_attention(*batch.cascade_args()), expected, **GPU_TOLERANCES[dtype])


def test_store_kv_on_cuda_is_exact():
    key = torch.randn(40, 8, 128, device="cuda", dtype=torch.bfloat16)
    slots = torch.randperm(64 * 16, device="cuda")[:40]
    slots[::7] = -1
    k_cache = torch.zeros(64, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    torch_attention.store_kv(key, -key, expected_k, expected_v, slots)
    dispatch.store_kv(key, -key, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
