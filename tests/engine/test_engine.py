"""Engine API: states, imagine, release, stats, typed errors, reproducibility, preemption."""

from __future__ import annotations

import numpy as np
import pytest
from engine_helpers import TINY_MODEL, actions, branch, make_engine, start_state

from engine.types import (
    MAX_SEED,
    BranchRequest,
    CapacityError,
    InvalidRequestError,
    SamplingParams,
    StartState,
    StateNotFoundError,
)

SAMPLED = SamplingParams(temperature=1.0)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return make_engine(tiny_checkpoint)


def test_identical_states_hit_the_prefix_cache(tiny_checkpoint, tiny_layout):
    engine = make_engine(tiny_checkpoint)
    state = start_state(tiny_layout, 0)  # 3 + 20 instruction bytes + 11 observation = 34 tokens: 8 full blocks
    first = engine.create_states([state])
    stats = engine.stats()
    assert (stats.kv_blocks_used, stats.prefix_cache_queries, stats.prefix_cache_hits) == (9, 8, 0)
    second = engine.create_states([state, state])
    stats = engine.stats()
    assert (first, second) == ([0], [1, 2])
    # Each copy found all 8 full blocks and computed only its own partial tail block.
    assert (stats.kv_blocks_used, stats.prefix_cache_queries, stats.prefix_cache_hits) == (11, 24, 16)
    assert engine.kv.block_ids(1)[:8] == engine.kv.block_ids(0)[:8] == list(range(8))
    assert (engine.kv.block_ids(0)[8], engine.kv.block_ids(1)[8], engine.kv.block_ids(2)[8]) == (8, 9, 10)
    assert stats.prefix_cache_hit_rate == pytest.approx(16 / 24)


def test_imagine_returns_results_in_order_and_release_frees_every_block(tiny_checkpoint, tiny_layout):
    engine = make_engine(tiny_checkpoint)
    ids = engine.create_states([start_state(tiny_layout, 0), start_state(tiny_layout, 1, "open the drawer")])
    requests = [branch(tiny_layout, ids[i % 2], seed=i, keep_state=i < 3) for i in range(6)]
    results = engine.imagine(requests, SAMPLED, return_tokens=True, return_images=True)
    assert [r.index for r in results] == list(range(6))
    assert [r.state_id is not None for r in results] == [True, True, True, False, False, False]
    for result in results:
        assert result.tokens.shape == (2, 4) and result.tokens.dtype == np.int64
        assert 0 <= result.tokens.min() and result.tokens.max() < tiny_layout.codebook_size
        assert set(result.images) == {"head", "wrist"}
        assert result.images["head"].shape == (8, 8, 3) and result.images["head"].dtype == np.uint8
        assert 0.0 < result.success_prob < 1.0
    kept = [r.state_id for r in results if r.state_id is not None]
    stream = engine._states[kept[0]].token_ids
    codes, success = tiny_layout.split_generated(np.asarray(stream[-tiny_layout.generated_len:]))
    assert np.array_equal(codes, results[0].tokens) and success == results[0].success
    # The kept stream is exactly: start state, the binned chunk, the generated observation and reward.
    assert stream[:len(engine._states[ids[0]].token_ids)] == engine._states[ids[0]].token_ids
    assert stream[len(engine._states[ids[0]].token_ids):][:tiny_layout.action_len] == \
        tiny_layout.encode_actions(requests[0].actions).tolist()
    stats = engine.stats()
    assert (stats.live_states, stats.branches_completed, stats.tokens_generated) == (5, 6, 6 * 13)
    engine.release(ids + kept)
    stats = engine.stats()
    assert (stats.kv_blocks_used, stats.live_states, stats.queue_depth) == (0, 0, 0)
    assert engine.kv.num_free_blocks == stats.kv_blocks_total == 1024
    assert all(block.ref_count == 0 for block in engine.kv.pool.blocks)


def test_multi_chunk_branches_until_max_chunks(tiny_checkpoint, tiny_layout):
    engine = make_engine(tiny_checkpoint)
    (state,) = engine.create_states([start_state(tiny_layout, 3)])
    for chunk in range(3):
        (result,) = engine.imagine([branch(tiny_layout, state, seed=chunk, keep_state=True)], SAMPLED)
        state = result.state_id
        assert len(engine._states[state].token_ids) == 34 + (chunk + 1) * tiny_layout.chunk_len
    with pytest.raises(CapacityError, match=r"branches\[0\]: state \d+ already holds 3 action chunks; "
                                            r"max_chunks_per_branch=3"):
        engine.imagine([branch(tiny_layout, state, seed=9)], SAMPLED)


def test_same_branch_alone_and_in_a_batch_of_hundreds_gives_identical_tokens(engine, tiny_layout):
    ids = engine.create_states([start_state(tiny_layout, s, f"task {s}") for s in range(8)])
    sampling = SamplingParams(temperature=0.9, top_k=12, top_p=0.95)
    probe = branch(tiny_layout, ids[0], seed=12345)
    (alone,) = engine.imagine([probe], sampling, return_tokens=True)
    crowd = [branch(tiny_layout, ids[i % 8], seed=i) for i in range(300)]
    batch = engine.imagine(crowd[:150] + [probe] + crowd[150:], sampling, return_tokens=True)
    in_batch = batch[150]
    assert np.array_equal(alone.tokens, in_batch.tokens) and alone.success == in_batch.success
    assert alone.success_prob == pytest.approx(in_batch.success_prob, abs=1e-6)
    # Different seeds on the same state and actions do diverge (the test would catch a constant sampler).
    (other,) = engine.imagine([BranchRequest(ids[0], probe.actions, seed=54321)], sampling, return_tokens=True)
    assert not np.array_equal(other.tokens, alone.tokens)
    engine.release(ids)
    assert engine.stats().kv_blocks_used == 0


def test_preemption_in_a_tiny_pool_completes_every_branch_with_the_same_tokens(tiny_checkpoint, tiny_layout):
    roomy = make_engine(tiny_checkpoint)
    # 30 blocks: the state takes 9; two branches are admitted (10 blocks each for the action chunk) and
    # then run out while decoding, so the newer one is preempted and recomputed later.
    tight = make_engine(tiny_checkpoint, num_kv_blocks=30, max_num_batched_tokens=64)
    results = []
    for engine in (roomy, tight):
        (state,) = engine.create_states([start_state(tiny_layout, 5)])
        results.append(engine.imagine([branch(tiny_layout, state, seed=i) for i in range(12)], SAMPLED,
                                      return_tokens=True))
        engine.release([state])
        assert engine.stats().kv_blocks_used == 0
    assert tight.stats().extra["num_preemptions"] > 0
    assert tight.stats().extra["peak_kv_blocks_used"] == 30
    for a, b in zip(*results, strict=True):
        assert np.array_equal(a.tokens, b.tokens) and a.success == b.success


def test_unfittable_request_raises_capacity_error_and_engine_keeps_serving(tiny_checkpoint, tiny_layout):
    engine = make_engine(tiny_checkpoint, num_kv_blocks=24)
    (state,) = engine.create_states([start_state(tiny_layout, 5)])  # 34 tokens: 9 blocks
    (small,) = engine.create_states([start_state(tiny_layout, 6, "x")])  # 15 tokens: 4 blocks
    # A branch of `state` needs 12 blocks of its own (80 tokens, 8 full blocks shared): only 11 are free.
    with pytest.raises(CapacityError, match=r"KV cache exhausted: 13 of 24 blocks are held by 2 live states and "
                                            r"a 77-token stream does not fit; release states or raise num_kv_blocks"):
        engine.imagine([branch(tiny_layout, state, seed=0)], SAMPLED)
    assert engine.stats().kv_blocks_used == 13  # the failed branch gave its blocks back
    engine.release([small])
    (result,) = engine.imagine([branch(tiny_layout, state, seed=0)], SAMPLED)
    assert result.state_id is None and engine.stats().kv_blocks_used == 9


def test_create_states_that_runs_out_of_blocks_releases_the_states_it_made(tiny_checkpoint, tiny_layout):
    engine = make_engine(tiny_checkpoint, num_kv_blocks=20)
    (held,) = engine.create_states([start_state(tiny_layout, 5)])  # 9 blocks
    # The first new state is prefilled and finished (6 blocks of its own) before the second finds 5 free blocks
    # for its 9: the call fails, and the finished state, whose id the caller never gets, is released with it.
    with pytest.raises(CapacityError, match=r"KV cache exhausted: 15 of 20 blocks are held by 2 live states and "
                                            r"a 35-token stream does not fit"):
        engine.create_states([start_state(tiny_layout, 6, "pick up the green cube"),
                              start_state(tiny_layout, 7, "pick up the blue cube")])
    stats = engine.stats()
    assert (stats.live_states, stats.kv_blocks_used) == (1, 9)
    engine.release([held])
    assert engine.stats().kv_blocks_used == 0


def test_fail_all_releases_the_states_a_create_states_had_made(tiny_checkpoint, tiny_layout):
    engine = make_engine(tiny_checkpoint, max_num_batched_tokens=40)  # one 34-token prefill per step
    request = engine.add_states([start_state(tiny_layout, 5), start_state(tiny_layout, 6)])
    engine.step()
    assert request.state_ids[0] >= 0 and request.state_ids[1] == -1  # the first state is made, the second waits
    engine.fail_all(RuntimeError("the engine was closed"))
    with pytest.raises(RuntimeError, match="the engine was closed"):
        request.future.result()
    stats = engine.stats()
    assert (stats.live_states, stats.kv_blocks_used, stats.queue_depth) == (0, 0, 0)


def test_imagine_that_runs_out_of_blocks_releases_the_states_it_kept(tiny_checkpoint, tiny_layout):
    engine = make_engine(tiny_checkpoint, num_kv_blocks=30, max_num_batched_tokens=64)
    (state,) = engine.create_states([start_state(tiny_layout, 5)])  # 9 blocks
    # The first kept branch finishes and holds its blocks; the next cannot fit beside it and nothing else runs.
    with pytest.raises(CapacityError, match=r"KV cache exhausted: 21 of 30 blocks are held by 2 live states and "
                                            r"a 74-token stream does not fit"):
        engine.imagine([branch(tiny_layout, state, seed=i, keep_state=True) for i in range(3)], SAMPLED)
    stats = engine.stats()
    assert (stats.live_states, stats.kv_blocks_used) == (1, 9)


@pytest.mark.parametrize(
    ("make_request", "error", "message"),
    [
        (lambda s, lay: BranchRequest(s, np.zeros((3, 4))), InvalidRequestError,
         r"branches\[1\]: actions have shape \(3, 4\), expected \(8, 4\) \(chunk_size, action_dim\)"),
        (lambda s, lay: BranchRequest(s, np.full((8, 4), np.nan)), InvalidRequestError,
         r"branches\[1\]: actions contain NaN or inf"),
        (lambda s, lay: BranchRequest(s, actions(lay, 0), seed=-1), InvalidRequestError,
         r"branches\[1\]: seed must be an integer in \[0, 2\*\*63-1\], got -1"),
        (lambda s, lay: BranchRequest(s, actions(lay, 0), seed=MAX_SEED + 1), InvalidRequestError,
         r"seed must be an integer in \[0, 2\*\*63-1\], got 9223372036854775808"),
        (lambda s, lay: BranchRequest(s, actions(lay, 0), seed=1.5), InvalidRequestError, r"got 1\.5"),
        (lambda s, lay: BranchRequest(s + 1000, actions(lay, 0)), StateNotFoundError,
         r"branches\[1\]: state \d+ is unknown or already released"),
        (lambda s, lay: BranchRequest(s, actions(lay, 0), keep_state="yes"), InvalidRequestError,
         r"keep_state must be a bool"),
    ],
)
def test_bad_branch_raises_typed_error_and_changes_nothing(engine, tiny_layout, make_request, error, message):
    (state,) = engine.create_states([start_state(tiny_layout, 7)])
    before = engine.stats()
    with pytest.raises(error, match=message):
        engine.imagine([branch(tiny_layout, state, 0), make_request(state, tiny_layout)], SAMPLED)
    after = engine.stats()
    assert (after.kv_blocks_used, after.queue_depth) == (before.kv_blocks_used, before.queue_depth)
    (result,) = engine.imagine([branch(tiny_layout, state, 0)], SAMPLED)  # still serving
    assert result.index == 0
    engine.release([state])


def test_max_seed_is_accepted(engine, tiny_layout):
    (state,) = engine.create_states([start_state(tiny_layout, 7)])
    (result,) = engine.imagine([BranchRequest(state, actions(tiny_layout, 0), seed=MAX_SEED)], SAMPLED)
    assert result.index == 0
    engine.release([state])


@pytest.mark.parametrize(
    ("make_state", "message"),
    [
        (lambda s: StartState("", s.images), r"states\[0\]: instruction is empty"),
        (lambda s: StartState("x" * 97, s.images), r"states\[0\]: instruction is 97 UTF-8 bytes"),
        (lambda s: StartState("go", {"head": s.images["head"]}),
         r"states\[0\]: images must have exactly the views \['head', 'wrist'\], got \['head'\]"),
        (lambda s: StartState("go", {**s.images, "wrist": s.images["wrist"].astype(np.float32)}),
         r"states\[0\]: image for view 'wrist' must be uint8 \(8, 8, 3\), got float32 \(8, 8, 3\)"),
        (lambda s: StartState("go", {**s.images, "head": s.images["head"][:4]}),
         r"image for view 'head' must be uint8 \(8, 8, 3\), got uint8 \(4, 8, 3\)"),
    ],
)
def test_bad_start_state_raises_invalid_request(engine, tiny_layout, make_state, message):
    with pytest.raises(InvalidRequestError, match=message):
        engine.create_states([make_state(start_state(tiny_layout, 0))])


def test_release_is_atomic(engine, tiny_layout):
    ids = engine.create_states([start_state(tiny_layout, 8)])
    with pytest.raises(StateNotFoundError, match="state 999999 is unknown or already released"):
        engine.release([ids[0], 999999])
    assert engine.stats().live_states >= 1 and engine.imagine([branch(tiny_layout, ids[0], 1)], SAMPLED)
    engine.release(ids)
    with pytest.raises(StateNotFoundError, match=f"state {ids[0]} is unknown or already released"):
        engine.release(ids)
    with pytest.raises(StateNotFoundError, match=rf"branches\[0\]: state {ids[0]} is unknown or already released"):
        engine.imagine([branch(tiny_layout, ids[0], 1)], SAMPLED)


def test_sampling_params_are_validated():
    with pytest.raises(InvalidRequestError, match="temperature must be finite and >= 0, got nan"):
        SamplingParams(temperature=float("nan"))
    with pytest.raises(InvalidRequestError, match=r"top_p must lie in \(0, 1\], got 0"):
        SamplingParams(top_p=0)
    with pytest.raises(InvalidRequestError, match="top_k must be an integer >= 0, got -1"):
        SamplingParams(top_k=-1)


def test_stream_beyond_max_position_embeddings_is_a_capacity_error(tmp_path, tiny_layout):
    from engine.checkpoint import write_random_checkpoint

    path = write_random_checkpoint(tmp_path / "short", tiny_layout, max_position_embeddings=64, **TINY_MODEL)
    engine = make_engine(path)
    (state,) = engine.create_states([start_state(tiny_layout, 0)])  # 34 tokens; a chunk adds 46
    with pytest.raises(CapacityError, match="the stream would reach 80 tokens, more than max_position_embeddings=64"):
        engine.imagine([branch(tiny_layout, state, 0)], SAMPLED)
