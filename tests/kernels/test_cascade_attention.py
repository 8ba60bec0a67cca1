"""Triton cascade attention and merge_attention_states (Triton interpreter on CPU) against the reference.

Cascade must equal plain paged attention on the same batch: the prefix pass over the shared blocks and
the suffix pass over each branch's own blocks cover exactly the causal key range. Tolerances as in
kernel_cases.TOLERANCES (float32 2e-5, float16 2e-3, bfloat16 1.6e-2).
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import TOLERANCES, independent, make_batch, shared

from kernels import cascade, reference
from kernels.prefix_groups import plan_cascade

CASES = {
    # name: (groups, block_size, num_kv_heads, group_size)
    "one_prefix_block_aligned": ([shared(8, (9, 1), (10, 1), (12, 2))], 4, 1, 1),
    "prefix_ends_mid_block_gqa2": ([shared(6, (9, 1), (11, 2), (7, 1))], 4, 2, 2),
    "several_prefixes_and_loners_bs16": (
        [shared(13, (20, 3), (14, 1), (30, 1)), independent((5, 2)), shared(16, (17, 1), (19, 1)),
         shared(3, (4, 1)), independent((11, 1))],
        16, 1, 3,
    ),
    "prefill_after_prefix_and_idle_branch": ([shared(5, (12, 7), (5, 0), (6, 1)), shared(9, (10, 1))], 4, 2, 2),
}

# These tests run the Triton kernels on CPU tensors, which only the interpreter can do. A GPU run with
# TRITON_INTERPRET=0 covers the compiled kernels in test_kernels_cuda.py instead.
pytestmark = pytest.mark.skipif(not cascade.runs_in_interpreter(), reason="needs TRITON_INTERPRET=1")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_cascade_equals_paged_attention(case, dtype):
    groups, block_size, num_kv_heads, group_size = CASES[case]
    batch = make_batch(groups, block_size, num_kv_heads, group_size, head_dim=8, dtype=dtype, seed=21)
    expected = reference.paged_attention(*batch.attention_args())
    got = cascade.cascade_attention(*batch.cascade_args(), block_n=16)
    assert got.dtype == dtype and got.shape == batch.query.shape
    torch.testing.assert_close(got, expected, **TOLERANCES[dtype])
    torch.testing.assert_close(reference.cascade_attention(*batch.cascade_args()), expected, **TOLERANCES[dtype])


def test_cascade_with_split_kv_equals_paged_attention():
    batch = make_batch([shared(18, (25, 1), (21, 2)), independent((30, 1))], 4, 1, 2, head_dim=8, seed=22)
    expected = reference.paged_attention(*batch.attention_args())
    got = cascade.cascade_attention(*batch.cascade_args(), num_splits=2, block_n=16)
    torch.testing.assert_close(got, expected, **TOLERANCES[torch.float32])


def test_batch_without_prefixes_is_plain_paged_attention():
    batch = make_batch([independent((6, 2), (9, 1))], 4, 1, 1, head_dim=8, seed=23)
    assert batch.prefix_block_tables.shape == (0, 1) and batch.seq_prefix_ids.tolist() == [-1, -1]
    torch.testing.assert_close(
        cascade.cascade_attention(*batch.cascade_args()), reference.paged_attention(*batch.attention_args()),
        **TOLERANCES[torch.float32],
    )


def test_prefix_pass_reads_the_prefix_table_not_the_branch_table():
    """Corrupting a branch's own copy of the shared blocks changes paged attention but not cascade:
    cascade reads those positions through the prefix's block table only."""
    batch = make_batch([shared(8, (10, 1), (9, 1))], 4, 1, 1, head_dim=8, seed=24)
    before = cascade.cascade_attention(*batch.cascade_args())
    paged_before = reference.paged_attention(*batch.attention_args())
    prefix_blocks = set(batch.prefix_block_tables[0, :2].tolist())
    assert set(batch.block_tables[0, :2].tolist()) == prefix_blocks  # block-aligned prefix: shared blocks
    batch.block_tables[0, 0] = int(batch.block_tables[0, 2])  # point the branch's first block elsewhere
    torch.testing.assert_close(cascade.cascade_attention(*batch.cascade_args()), before, atol=0, rtol=0)
    assert not torch.allclose(reference.paged_attention(*batch.attention_args())[0], paged_before[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_merge_matches_reference(dtype):
    generator = torch.Generator().manual_seed(25)
    out_a = torch.randn(5, 3, 8, generator=generator).to(dtype)
    out_b = torch.randn(5, 3, 8, generator=generator).to(dtype)
    lse_a = torch.randn(5, 3, generator=generator)
    lse_b = torch.randn(5, 3, generator=generator)
    lse_a[0, 0] = lse_b[0, 0] = float("-inf")  # both sides empty
    lse_a[1, 2] = float("-inf")  # only b saw keys
    expected_out, expected_lse = reference.merge_attention_states(out_a, lse_a, out_b, lse_b)
    out, lse = cascade.merge_attention_states(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out, expected_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, expected_lse, atol=1e-6, rtol=1e-6)
    assert out[0, 0].eq(0).all() and lse[0, 0] == float("-inf")
    assert torch.equal(out[1, 2], out_b[1, 2].float())


def _bad_cascade_inputs():
    batch = make_batch([shared(4, (6, 1))], 4, 1, 1, head_dim=8, seed=26)
    args = list(batch.cascade_args())
    cases = []
    for index, value, message in (
        (6, batch.prefix_block_tables.long(), "prefix_block_tables must be torch.int32, got torch.int64"),
        (7, batch.prefix_lens[:0], r"prefix_lens must have shape \[num_prefixes\] = \[1\], got \(0,\)"),
        (8, torch.tensor([0, 0], dtype=torch.int32), r"seq_prefix_ids must have shape \[num_seqs\] = \[1\]"),
        (8, batch.seq_prefix_ids.long(), "seq_prefix_ids must be torch.int32, got torch.int64"),
    ):
        bad = list(args)
        bad[index] = value
        cases.append((tuple(bad), message))
    return cases


@pytest.mark.parametrize(("args", "message"), _bad_cascade_inputs())
def test_cascade_rejects_bad_metadata(args, message):
    with pytest.raises(ValueError, match=message):
        cascade.cascade_attention(*args)


def test_merge_rejects_mismatched_lse():
    out = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match=r"lse_b must have shape \[num_tokens, num_heads\] = \[2, 3\], got \(3, 2\)"):
        cascade.merge_attention_states(out, torch.zeros(2, 3), out, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="lse_a must be torch.float32, got torch.float16"):
        cascade.merge_attention_states(out, torch.zeros(2, 3).half(), out, torch.zeros(2, 3))


def test_a_plan_built_once_serves_every_call_and_is_exact():
    batch = make_batch([shared(6, (9, 1), (8, 2)), independent((4, 1)), shared(4, (7, 3))], 4, 1, 2, 8, seed=27)
    plan = plan_cascade(batch.query_start_loc, batch.prefix_lens, batch.seq_prefix_ids, batch.query.shape[0])
    # tokens 0 (seq 0), 1-2 (seq 1) on prefix 0; token 3 (seq 2) alone; tokens 4-6 (seq 3) on prefix 1
    assert plan.token_order.tolist() == [0, 1, 2, 4, 5, 6, 3]
    assert plan.prefix_query_start_loc.tolist() == [0, 3, 6]
    assert plan.suffix_starts.tolist() == [6, 6, 0, 4]
    expected = reference.paged_attention(*batch.attention_args())
    torch.testing.assert_close(cascade.cascade_attention(*batch.cascade_args(), plan=plan), expected,
                               **TOLERANCES[torch.float32])
