"""The vectorised torch path (the CPU engine's kernels) against the plain reference, and the reference's
own cascade against its paged attention and against dense causal attention."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import TOLERANCES, independent, make_batch, shared

from kernels import reference, torch_attention, torch_decode

GRID = [
    # (groups, block_size, num_kv_heads, group_size)
    ([independent((1, 1), (7, 1), (16, 1), (33, 1))], 4, 2, 1),  # decode, partial last blocks
    ([independent((9, 9), (20, 3), (5, 1), (40, 1))], 16, 1, 4),  # mixed prefill/decode, GQA 4
    ([independent((50, 24), (3, 1), (30, 2))], 4, 2, 2),  # a long prefill chunk runs on its own
    ([shared(6, (9, 1), (11, 2), (6, 0)), shared(8, (12, 1), (8, 0)), independent((5, 2))], 4, 1, 2),
    ([shared(13, (20, 3), (14, 1), (30, 1)), shared(16, (17, 1))], 16, 2, 3),  # prefix ends mid-block
]


def heads_major(cache: torch.Tensor) -> torch.Tensor:
    """The same cache values with the engine's CPU memory layout: [kv_heads, blocks, block_size, D] memory seen
    through a [blocks, block_size, kv_heads, D] view (the torch path gathers whole tiles from it)."""
    view = cache.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)
    assert torch.equal(view, cache) and torch_attention.heads_major_view(view) is not None
    return view


LAYOUTS = {"nhd": lambda cache: cache, "hnd": heads_major}


@pytest.mark.parametrize(("groups", "block_size", "num_kv_heads", "group_size"), GRID)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_paged_attention_matches_reference(groups, block_size, num_kv_heads, group_size, dtype, layout):
    batch = make_batch(groups, block_size, num_kv_heads, group_size, head_dim=8, dtype=dtype, seed=1)
    expected = reference.paged_attention(*batch.attention_args())
    batch.k_cache, batch.v_cache = LAYOUTS[layout](batch.k_cache), LAYOUTS[layout](batch.v_cache)
    got = torch_attention.paged_attention(*batch.attention_args())
    assert got.dtype == dtype and got.shape == batch.query.shape
    torch.testing.assert_close(got, expected, **TOLERANCES[dtype])


@pytest.mark.parametrize(("groups", "block_size", "num_kv_heads", "group_size"), GRID)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cascade_matches_paged_attention(groups, block_size, num_kv_heads, group_size, layout):
    batch = make_batch(groups, block_size, num_kv_heads, group_size, head_dim=8, seed=2)
    expected = reference.paged_attention(*batch.attention_args())
    tolerance = TOLERANCES[torch.float32]
    torch.testing.assert_close(reference.cascade_attention(*batch.cascade_args()), expected, **tolerance)
    batch.k_cache, batch.v_cache = LAYOUTS[layout](batch.k_cache), LAYOUTS[layout](batch.v_cache)
    torch.testing.assert_close(torch_attention.cascade_attention(*batch.cascade_args()), expected, **tolerance)


def test_heads_major_view_tells_the_layouts_apart():
    cache = torch.zeros(5, 4, 2, 8)  # [blocks, block_size, kv_heads, D], contiguous NHD
    assert torch_attention.heads_major_view(cache) is None
    view = torch_attention.heads_major_view(heads_major(cache))
    assert view is not None and view.shape == (2, 5, 4, 8)


def test_reference_equals_dense_causal_attention():
    """One sequence whose blocks are shuffled: paged attention is causal SDPA on the unshuffled K/V."""
    batch = make_batch([independent((11, 11))], block_size=4, num_kv_heads=2, group_size=2, head_dim=8, seed=3)
    positions = torch.arange(11)
    keys = reference.gather_positions(batch.k_cache, batch.block_tables[0], positions)  # [11, 2, 8]
    values = reference.gather_positions(batch.v_cache, batch.block_tables[0], positions)
    dense = torch.nn.functional.scaled_dot_product_attention(
        batch.query.transpose(0, 1), keys.transpose(0, 1).repeat_interleave(2, 0),
        values.transpose(0, 1).repeat_interleave(2, 0), is_causal=True, scale=batch.scale,
    ).transpose(0, 1)
    torch.testing.assert_close(reference.paged_attention(*batch.attention_args()), dense, atol=1e-5, rtol=1e-5)


def test_partial_attention_lse_and_merge_are_exact():
    """Splitting the keys at position 5 and merging the two partials gives the full attention and lse."""
    batch = make_batch([independent((12, 3), (9, 1))], block_size=4, num_kv_heads=1, group_size=2, head_dim=8)
    args = batch.attention_args()
    full_out, full_lse = reference.paged_attention_with_lse(*args)
    split = torch.tensor([5, 5], dtype=torch.int32)
    # keys [0, 5): give every sequence seq_len 5 and no causal mask (all queries lie at positions >= 8)
    head_out, head_lse = reference.paged_attention_with_lse(
        batch.query, batch.k_cache, batch.v_cache, batch.block_tables, split, batch.query_start_loc, batch.scale,
        causal=False,
    )
    tail_out, tail_lse = torch_attention.paged_attention_with_lse(*args, kv_start=split)
    for merge in (reference.merge_attention_states, torch_attention.merge_attention_states):
        out, lse = merge(head_out, head_lse, tail_out, tail_lse)
        torch.testing.assert_close(out, full_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, full_lse, atol=1e-5, rtol=1e-5)


def test_merge_of_two_empty_states_is_zero_with_lse_minus_inf():
    out = torch.ones(2, 1, 4)
    empty = torch.full((2, 1), float("-inf"))
    for merge in (reference.merge_attention_states, torch_attention.merge_attention_states):
        merged, lse = merge(out, empty, out, empty)
        assert torch.equal(merged, torch.zeros(2, 1, 4))
        assert torch.equal(lse, empty)
        merged, lse = merge(out, torch.zeros(2, 1), 2 * out, empty)  # one side empty: the other wins exactly
        assert torch.equal(merged, out) and torch.equal(lse, torch.zeros(2, 1))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_store_kv_matches_reference_and_skips_padding(layout):
    key = torch.arange(4 * 2 * 3, dtype=torch.float32).reshape(4, 2, 3)
    slots = torch.tensor([5, -1, 0, 11], dtype=torch.int64)
    caches = {impl: (LAYOUTS[layout](torch.zeros(3, 4, 2, 3)), LAYOUTS[layout](torch.zeros(3, 4, 2, 3)))
              for impl in ("ref", "torch")}
    reference.store_kv(key, -key, *caches["ref"], slots)
    torch_attention.store_kv(key, -key, *caches["torch"], slots)
    k_cache, v_cache = caches["torch"]
    assert torch.equal(k_cache, caches["ref"][0]) and torch.equal(v_cache, caches["ref"][1])
    assert torch.equal(k_cache[1, 1], key[0]) and torch.equal(k_cache[0, 0], key[2])
    assert torch.equal(k_cache[2, 3], key[3]) and torch.equal(v_cache[2, 3], -key[3])
    written = torch.zeros(3, 4, dtype=torch.bool)
    written[1, 1] = written[0, 0] = written[2, 3] = True
    assert not k_cache[~written].any() and not v_cache[~written].any()  # the padding token wrote nothing


def test_batches_pad_short_segments_together_and_batch_long_prefills_by_length():
    assert torch_attention._plan_batches([1, 1, 0, 2]) == [([0, 1, 3], 2)]
    assert torch_attention._plan_batches([1, 40, 1, 3, 17]) == [([0, 2, 3], 3), ([4], 17), ([1], 40)]
    assert torch_attention._plan_batches([1, 35, 1, 35, 1, 1, 35, 20]) == [([0, 2, 4, 5], 1), ([7], 20),
                                                                              ([1, 3, 6], 35)]
    assert torch_attention._plan_batches([0, 0]) == []


def test_a_batch_cut_into_one_sequence_chunks_gives_the_same_answer(monkeypatch):
    batch = make_batch([shared(6, (9, 1), (11, 2)), independent((7, 1), (30, 1))], 4, 2, 2, head_dim=8, seed=4)
    expected = reference.paged_attention(*batch.attention_args())
    monkeypatch.setattr(torch_attention, "BATCH_MEMORY_BUDGET_BYTES", 1)  # every chunk holds one sequence
    torch.testing.assert_close(torch_attention.paged_attention(*batch.attention_args()), expected,
                               **TOLERANCES[torch.float32])
    torch.testing.assert_close(torch_attention.cascade_attention(*batch.cascade_args()), expected,
                               **TOLERANCES[torch.float32])


def decode_args(batch, kv_start: list[int] | None = None, causal: bool = True) -> tuple:
    """plan_decode's arguments for a batch: queries padded to the longest segment."""
    n = batch.block_tables.shape[0]
    q_starts = batch.query_start_loc[:-1].long()
    q_lens = batch.query_start_loc[1:].long() - q_starts
    first_keys = torch.zeros(n, dtype=torch.long) if kv_start is None else torch.tensor(kv_start)
    group = batch.query.shape[1] // batch.k_cache.shape[2]
    return (q_lens, batch.block_tables, batch.seq_lens.long(), first_keys, int(q_lens.max()), batch.k_cache.shape[1],
            group, causal)


def padded_queries(batch) -> torch.Tensor:  # [n, max_q, num_heads, head_dim]
    q_starts = batch.query_start_loc[:-1].long()
    max_q = int((batch.query_start_loc[1:].long() - q_starts).max())
    return batch.query[(q_starts[:, None] + torch.arange(max_q)).clamp(max=batch.query.shape[0] - 1)]


def decode(batch, plan: torch_decode.DecodePlan) -> tuple[torch.Tensor, torch.Tensor]:
    return torch_decode.decode_in_place(padded_queries(batch), plan, heads_major(batch.k_cache).permute(2, 0, 1, 3),
                                        heads_major(batch.v_cache).permute(2, 0, 1, 3), batch.scale)


def valid_rows(batch, padded: torch.Tensor) -> torch.Tensor:
    q_lens = batch.query_start_loc[1:] - batch.query_start_loc[:-1]
    return padded[torch.arange(padded.shape[1])[None, :] < q_lens[:, None]]


@pytest.mark.parametrize("kv_start", [None, [0, 5, 0, 16, 33]])
@pytest.mark.parametrize("causal", [True, False])
def test_decode_in_place_matches_reference_out_and_lse(kv_start, causal):
    """A few queries per sequence, private blocks: the in-place pass runs (no fallback) and is exact; a
    kv_start mid-block masks the block's first keys, one past the end leaves the sequence empty (0, -inf)."""
    batch = make_batch([independent((1, 1), (7, 2), (16, 1), (33, 3), (30, 1))], block_size=4, num_kv_heads=2,
                       group_size=3, head_dim=8, seed=4, spare_blocks=0)
    start = None if kv_start is None else torch.tensor(kv_start, dtype=torch.int32)
    expected_out, expected_lse = reference.paged_attention_with_lse(*batch.attention_args(), kv_start=start,
                                                                    causal=causal)
    plan = torch_decode.plan_decode(*decode_args(batch, kv_start, causal))
    assert plan is not None
    decoded = decode(batch, plan)
    out, lse = valid_rows(batch, decoded[0]), valid_rows(batch, decoded[1])
    torch.testing.assert_close(out, expected_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, expected_lse, atol=2e-5, rtol=2e-5)
    assert decoded[1][0, 1:].tolist() == [[float("-inf")] * 6] * 2  # padding rows of the one-query sequence
    if kv_start is not None:
        assert torch.equal(out[7], torch.zeros(6, 8)) and lse[7].tolist() == [float("-inf")] * 6  # sequence 4


def test_decode_in_place_declines_shared_and_sparse_blocks():
    batch = make_batch([independent((4, 1), (4, 1))], block_size=4, num_kv_heads=1, group_size=2, head_dim=8,
                       spare_blocks=40)  # 42 blocks
    args = list(decode_args(batch))

    def run(tables: list[list[int]], seq_lens: list[int], first_keys: list[int]):
        args[1:4] = torch.tensor(tables, dtype=torch.int32), torch.tensor(seq_lens), torch.tensor(first_keys)
        return torch_decode.plan_decode(*args)

    assert run([[1, 2, 3], [1, 2, 4]], [9, 11], [0, 0]) is None  # both read the shared blocks 1 and 2
    assert run([[1, 2, 3], [1, 2, 4]], [9, 11], [8, 8]) is not None  # the private suffixes only: blocks 3, 4
    assert run([[0, 0, 0], [41, 0, 0]], [4, 4], [0, 0]) is None  # 2 blocks read, 42 ids spanned


def test_gather_buffers_serve_calls_in_and_out_of_inference_mode():
    """The engine runs in inference mode, tests and trainers outside it: the reused buffers serve both."""
    batch = make_batch([independent((12, 12), (11, 11))], block_size=4, num_kv_heads=1, group_size=2, head_dim=8)
    batch.k_cache, batch.v_cache = heads_major(batch.k_cache), heads_major(batch.v_cache)
    torch_attention._workspace.buffers.clear()  # the first gather allocates inside inference mode
    with torch.inference_mode():
        inside = torch_attention.paged_attention(*batch.attention_args())
    torch.testing.assert_close(torch_attention.paged_attention(*batch.attention_args()), inside, atol=0, rtol=0)


def test_decode_in_place_shifts_scores_only_when_the_sums_leave_the_float32_range(monkeypatch):
    """Ordinary scores are exponentiated unshifted, in one pass. Scores of +-163 (base 2) overflow unshifted;
    shifted by the global maximum, the negative sequence's sum underflows to 0; the call ends on per-row
    maxima and matches the reference. Stopping at the global shift would report that sequence empty."""
    passes = []
    masked_scores = torch_decode._masked_scores
    monkeypatch.setattr(torch_decode, "_masked_scores", lambda *args: passes.append(1) or masked_scores(*args))
    batch = make_batch([independent((9, 1), (7, 1))], block_size=4, num_kv_heads=1, group_size=2, head_dim=8,
                       seed=5, spare_blocks=0)
    plan = torch_decode.plan_decode(*decode_args(batch))
    expected_out, expected_lse = reference.paged_attention_with_lse(*batch.attention_args())
    out, lse = decode(batch, plan)
    assert len(passes) == 1
    torch.testing.assert_close(valid_rows(batch, out), expected_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(valid_rows(batch, lse), expected_lse, atol=2e-5, rtol=2e-5)

    batch.k_cache.fill_(1.0)  # every key is the ones vector: a query 40 * (+-1) scores +-113 against each
    batch.query[0], batch.query[1] = 40.0, -40.0
    expected_out, expected_lse = reference.paged_attention_with_lse(*batch.attention_args())
    passes.clear()
    out, lse = decode(batch, plan)
    assert len(passes) == 3
    assert float(lse[0].max() - lse[1].max()) * torch_decode.LOG2_E > 200  # far beyond float32's 2^-126
    torch.testing.assert_close(valid_rows(batch, out), expected_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(valid_rows(batch, lse), expected_lse, atol=2e-4, rtol=2e-5)
    monkeypatch.setattr(torch_decode, "SHIFTS", ("none", "global"))
    out, lse = decode(batch, plan)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and lse[1].tolist() == [[float("-inf")] * 2]


def test_gather_plan_masks_only_the_key_columns_some_real_row_may_not_see():
    """The non-causal prefix pass of prefixes 8 and 12 keys long (block size 4): columns 0-7 are seen by every
    row and left unmasked; only the 8-11 columns of the shorter prefix's rows are masked."""
    query = torch.zeros(5, 4, 8)  # 3 queries on prefix 0, 2 on prefix 1; 4 heads on 2 kv heads
    k_cache = torch.zeros(6, 4, 2, 8)  # NHD: gathered (a heads-major cache would be read in place)
    block_tables = torch.tensor([[4, 1, 0], [2, 5, 3]], dtype=torch.int32)
    plan = torch_attention.plan_attention(query, k_cache, block_tables, torch.tensor([8, 12], dtype=torch.int32),
                                          torch.tensor([0, 3, 5], dtype=torch.int32), causal=False)
    (batch,) = plan.batches
    assert batch.blocks.tolist() == [[4, 1, 0], [2, 5, 3]]
    assert batch.token_ids.tolist() == [[0, 1, 2], [3, 4, 4]] and batch.rows.tolist() == [0, 1, 2, 3, 4]
    assert batch.mask_from == 8 and batch.mask.shape == (2, 6, 4)
    assert batch.mask[0].all() and not batch.mask[1].any()  # padding row 2 of prefix 1 is not masked either


def test_cascade_builds_its_attention_plans_once_per_batch_and_geometry():
    """The first layer's call fills the cascade plan's memo; the next layers reuse it and answer the same."""
    batch = make_batch([shared(13, (20, 3), (14, 1), (30, 1)), shared(16, (17, 1))], 16, 2, 3, head_dim=8, seed=6)
    batch.k_cache, batch.v_cache = heads_major(batch.k_cache), heads_major(batch.v_cache)
    plan = torch_attention.plan_cascade(batch.query_start_loc, batch.prefix_lens, batch.seq_prefix_ids,
                                        batch.query.shape[0])
    first = torch_attention.cascade_attention(*batch.cascade_args(), plan=plan)
    (plans,) = plan.memo.values()
    second = torch_attention.cascade_attention(*batch.cascade_args(), plan=plan)
    assert torch.equal(first, second) and len(plan.memo) == 1 and next(iter(plan.memo.values())) is plans
    torch.testing.assert_close(first, reference.paged_attention(*batch.attention_args()), **TOLERANCES[torch.float32])
    nhd = make_batch([shared(13, (20, 3), (14, 1), (30, 1)), shared(16, (17, 1))], 16, 2, 3, head_dim=8, seed=6)
    torch.testing.assert_close(torch_attention.cascade_attention(*nhd.cascade_args(), plan=plan), first,
                               **TOLERANCES[torch.float32])
    assert len(plan.memo) == 2  # the NHD cache is planned apart: it is gathered, never read in place


@pytest.mark.parametrize("layout", LAYOUTS)
def test_scores_beyond_the_float32_range_of_exp2_are_redone_with_row_maxima(layout):
    """Scores of +-113 (+-163 in base 2) overflow or underflow unshifted, in the gathered and the in-place path;
    the redo with each row's maximum matches the reference."""
    batch = make_batch([independent((9, 1), (7, 3), (12, 12))], block_size=4, num_kv_heads=1, group_size=2,
                       head_dim=8, seed=8)
    batch.k_cache.fill_(1.0)
    batch.query[:] = 40.0
    batch.query[1:4] = -40.0
    batch.k_cache, batch.v_cache = LAYOUTS[layout](batch.k_cache), LAYOUTS[layout](batch.v_cache)
    expected_out, expected_lse = reference.paged_attention_with_lse(*batch.attention_args())
    out, lse = torch_attention.paged_attention_with_lse(*batch.attention_args())
    torch.testing.assert_close(out, expected_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, expected_lse, atol=2e-4, rtol=2e-5)
