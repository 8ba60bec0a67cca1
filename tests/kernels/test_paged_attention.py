"""The Triton paged attention kernel (run by the Triton interpreter on CPU) against the torch reference.

Tolerances (kernel_cases.TOLERANCES): float32 2e-5; float16 2e-3; bfloat16 1.6e-2 (one bf16 ulp at 2),
absolute and relative, against the float32 reference rounded to the output dtype.
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import TOLERANCES, independent, make_batch, shared

from kernels import paged_attention as triton_attention
from kernels import reference

CASES = {
    # name: (groups, block_size, num_kv_heads, group_size, head_dim)
    "decode_partial_blocks_bs4": ([independent((1, 1), (7, 1), (16, 1), (33, 1))], 4, 2, 1, 8),
    "mixed_prefill_decode_gqa2_bs16": ([independent((9, 9), (20, 3), (5, 1), (40, 1))], 16, 2, 2, 16),
    "long_prefill_chunk_gqa3": ([independent((37, 21), (3, 1))], 4, 1, 3, 8),
    "branches_with_idle_sequence": ([shared(6, (9, 1), (11, 2), (6, 0)), independent((5, 2))], 4, 2, 2, 8),
}

# These tests run the Triton kernels on CPU tensors, which only the interpreter can do. A GPU run with
# TRITON_INTERPRET=0 covers the compiled kernels in test_kernels_cuda.py instead.
pytestmark = pytest.mark.skipif(not triton_attention.runs_in_interpreter(), reason="needs TRITON_INTERPRET=1")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_paged_attention_matches_reference(case, dtype):
    groups, block_size, num_kv_heads, group_size, head_dim = CASES[case]
    batch = make_batch(groups, block_size, num_kv_heads, group_size, head_dim, dtype=dtype, seed=11)
    expected = reference.paged_attention(*batch.attention_args())
    # block_n=16 walks several key tiles per program, so the online softmax rescaling is exercised
    got = triton_attention.paged_attention(*batch.attention_args(), block_n=16)
    assert got.dtype == dtype and got.shape == batch.query.shape
    torch.testing.assert_close(got, expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("num_splits", [2, 3])
def test_split_kv_matches_reference(num_splits):
    batch = make_batch([independent((45, 1), (30, 2), (4, 1))], 4, 2, 2, 8, dtype=torch.float16, seed=12)
    expected = reference.paged_attention(*batch.attention_args())
    got = triton_attention.paged_attention(*batch.attention_args(), num_splits=num_splits, block_n=16)
    torch.testing.assert_close(got, expected, **TOLERANCES[torch.float16])


@pytest.mark.parametrize("num_splits", [1, 2])
def test_partial_attention_returns_reference_lse(num_splits):
    batch = make_batch([independent((21, 3), (9, 1))], 4, 1, 2, 8, seed=13)
    kv_start = torch.tensor([6, 0], dtype=torch.int32)
    for causal in (True, False):
        expected_out, expected_lse = reference.paged_attention_with_lse(
            *batch.attention_args(), kv_start=kv_start, causal=causal
        )
        out, lse = triton_attention.paged_attention_with_lse(
            *batch.attention_args(), kv_start=kv_start, causal=causal, num_splits=num_splits, block_n=16
        )
        torch.testing.assert_close(out, expected_out, **TOLERANCES[torch.float32])
        torch.testing.assert_close(lse, expected_lse, **TOLERANCES[torch.float32])


def test_keys_outside_the_range_give_zero_output_and_minus_inf_lse():
    batch = make_batch([independent((8, 2))], 4, 1, 1, 8, seed=14)
    kv_start = torch.tensor([8], dtype=torch.int32)  # the range [8, 8) is empty
    out, lse = triton_attention.paged_attention_with_lse(*batch.attention_args(), kv_start=kv_start, causal=False)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(lse, torch.full_like(lse, float("-inf")))


def test_query_may_be_a_strided_view_of_a_fused_projection():
    """The engine slices q out of one qkv projection: rows are strided, the last dim is contiguous."""
    batch = make_batch([independent((9, 3), (5, 1))], 4, 2, 2, 8, seed=15)
    fused = torch.cat([batch.query, torch.randn_like(batch.query)], dim=1)  # [tokens, 2 * heads, dim]
    query_view = fused[:, : batch.query.shape[1]]
    assert not query_view.is_contiguous()
    args = (query_view, *batch.attention_args()[1:])
    torch.testing.assert_close(
        triton_attention.paged_attention(*args), reference.paged_attention(*batch.attention_args()),
        **TOLERANCES[torch.float32],
    )


def _bad_inputs():
    batch = make_batch([independent((5, 2))], 4, 2, 2, 8, seed=16)
    q, k, v, tables, lens, qsl, scale = batch.attention_args()
    return [
        ((q.double(), k, v, tables, lens, qsl, scale), "query dtype torch.float64 differs from the cache dtype"),
        ((q[0], k, v, tables, lens, qsl, scale), r"query must be 3-D \[num_tokens, num_heads, head_dim\]"),
        ((q[:, :3], k, v, tables, lens, qsl, scale), "num_heads 3 is not a multiple of num_kv_heads 2"),
        ((q, k, v[:, :, :1], tables, lens, qsl, scale),
         r"v_cache shape \(5, 4, 1, 8\) differs from k_cache shape \(5, 4, 2, 8\)"),
        ((q, k, v, tables.long(), lens, qsl, scale), "block_tables must be torch.int32, got torch.int64"),
        ((q, k, v, tables, lens[:0], qsl, scale), r"seq_lens must have shape \[num_seqs\] = \[1\], got \(0,\)"),
        ((q, k, v, tables, lens, qsl[:1], scale), r"query_start_loc must have shape \[num_seqs \+ 1\] = \[2\]"),
        ((q[..., ::2], k, v, tables, lens, qsl, scale), "query head_dim 4 differs from the cache head_dim 8"),
        ((q.transpose(1, 2).contiguous().transpose(1, 2), k, v, tables, lens, qsl, scale),
         r"query must have a contiguous last dimension \(stride 1\), got strides \(32, 1, 4\)"),
        ((q, k.transpose(0, 1).contiguous().transpose(0, 1), v, tables, lens, qsl, scale),
         "k_cache must be contiguous, got strides"),
    ]


@pytest.mark.parametrize(("args", "message"), _bad_inputs())
def test_wrapper_rejects_bad_input_naming_the_problem(args, message):
    with pytest.raises(ValueError, match=message):
        triton_attention.paged_attention(*args)


def test_runs_in_the_interpreter_on_cpu():
    assert triton_attention.runs_in_interpreter()
