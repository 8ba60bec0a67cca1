"""End to end through the real server: branched multi-chunk rollouts, streaming, stats, and no leaks."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from engine.config import EngineConfig
from protos.vla_mbpo.v1 import world_model_pb2 as pb
from tests.runtime.conftest import ACTION_DIM, CHUNK_SIZE, VIEWS, action_chunks, observations, stub
from trainer.rollout_client import RolloutServerError, WorldModelClient


def test_model_info_through_client_and_raw_stub(server):
    with WorldModelClient(server.target) as client:
        info = client.model_info()
    assert info.views == VIEWS
    assert (info.image_height, info.image_width, info.chunk_size, info.action_dim) == (8, 8, CHUNK_SIZE, ACTION_DIM)
    assert (info.tokens_per_view, info.max_chunks_per_branch, info.model_name) == (4, 3, "tiny")
    np.testing.assert_array_equal(info.action_low, [-1, -1])
    assert (info.max_states_per_request, info.max_branches_per_request) == (1024, 8192)
    channel, raw = stub(server.target)
    with channel:
        msg = raw.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert msg.model_version == server.server.info.model_version and len(msg.model_version) > 0


def test_branched_multi_chunk_rollout(server):
    with WorldModelClient(server.target) as client:
        roots = client.create_states(["open the drawer", "lift the cube"], observations(2))
        assert len(set(roots)) == 2 and all(len(r) == 16 for r in roots)
        # Chunk 1: 4 branches from each root, all kept.
        parents = [roots[i // 4] for i in range(8)]
        chunk1 = sorted(client.imagine(parents, action_chunks(8), seeds=range(8), keep_state=True,
                                       return_tokens=True, return_images=True), key=lambda r: r.index)
        assert [r.index for r in chunk1] == list(range(8))
        assert len({r.state_id for r in chunk1}) == 8
        for r in chunk1:
            assert r.tokens.shape == (2, 4) and r.tokens.min() >= 0 and r.tokens.max() < 16
            assert sorted(r.images) == list(VIEWS) and r.images["head"].shape == (8, 8, 3)
            assert r.images["wrist"].dtype == np.uint8 and 0.0 <= r.success_prob <= 1.0
        assert server.engine_stats().live_states == 2 + 8
        # Chunks 2 and 3 continue every kept branch; the model's horizon is 3 chunks.
        chunk2 = sorted(client.imagine([r.state_id for r in chunk1], action_chunks(8, 1), keep_state=True),
                        key=lambda r: r.index)
        chunk3 = list(client.imagine([r.state_id for r in chunk2], action_chunks(8, 2), keep_state=True))
        with pytest.raises(RolloutServerError) as info:
            list(client.imagine([chunk3[0].state_id], action_chunks(1)))
        assert info.value.code.name == "OUT_OF_RANGE"
        assert info.value.details == (f"branches[0].state_id={chunk3[0].state_id!r} has been rolled 3 chunks already, "
                                      f"the model's max_chunks_per_branch=3")
        kept = [r.state_id for r in chunk1 + chunk2 + chunk3]
        assert client.stats().live_states == 2 + 24
        assert client.release(roots + kept) == 26
        stats = client.stats()
    assert (stats.live_states, stats.kv_blocks_used, stats.branches_completed) == (0, 0, 24)


def test_same_seed_same_tokens_any_batch(server):
    with WorldModelClient(server.target) as client:
        (root,) = client.create_states(["stack"], observations(1, seed=3))
        actions = action_chunks(1, seed=9)
        alone = next(client.imagine([root], actions, seeds=[42], return_tokens=True))
        crowd = np.concatenate([action_chunks(31, seed=5), actions])
        batch = [r for r in client.imagine([root] * 32, crowd, seeds=list(range(31)) + [42], return_tokens=True)
                 if r.index == 31]
        greedy = [next(client.imagine([root], actions, seeds=[s], temperature=0.0, return_tokens=True)) for s in (1, 2)]
        client.release([root])
    np.testing.assert_array_equal(batch[0].tokens, alone.tokens)
    assert batch[0].success_prob == pytest.approx(alone.success_prob, rel=1e-5)  # batch shape changes fp32 sums
    np.testing.assert_array_equal(greedy[0].tokens, greedy[1].tokens)  # greedy ignores the seed


def test_results_stream_as_branches_finish(start_server):
    # At most 4 sequences per engine step: 64 branches finish in 16 waves, so streaming shows.
    server = start_server(EngineConfig(block_size=8, num_kv_blocks=2048, max_num_seqs=4))
    channel, raw = stub(server.target)
    with channel, WorldModelClient(server.target) as client:
        (root,) = client.create_states(["push"], observations(1))
        request = pb.ImagineRequest(sampling=pb.SamplingParams(temperature=1.0))
        for i, row in enumerate(action_chunks(64).reshape(64, -1)):
            request.branches.add(state_id=root, actions=row.tolist(), seed=i)
        arrivals, unfinished_at_first = [], None
        for result in raw.Imagine(request, timeout=60):
            arrivals.append((time.monotonic(), result.index))
            if unfinished_at_first is None:
                unfinished_at_first = client.stats().queue_depth
        client.release([root])
    assert sorted(i for _, i in arrivals) == list(range(64))
    assert unfinished_at_first > 0  # the first result came while the engine still had branches to run
    assert arrivals[0][0] < arrivals[-1][0]


def test_prefix_cache_and_stats(server):
    obs = observations(1, seed=11)
    with WorldModelClient(server.target) as client:
        first = client.create_states(["same task"], obs)
        before = client.stats()
        second = client.create_states(["same task"], obs)
        after = client.stats()
        assert after.prefix_cache_hit_rate > before.prefix_cache_hit_rate
        assert after.kv_blocks_total == 2048 and after.live_states == 2 and after.queue_depth == 0
        list(client.imagine(first * 8, action_chunks(8)))
        stats = client.stats()
        assert (stats.branches_completed, stats.tokens_generated) == (8, 8 * 13)  # 13 generated per chunk
        client.release(first + second)
        engine = server.engine_stats()
        final = client.stats()
    assert (final.kv_blocks_used, final.kv_blocks_cached) == (engine.kv_blocks_used, engine.kv_blocks_cached)
    assert final.kv_blocks_used == 0 and final.kv_blocks_cached > 0  # freed, still findable by the prefix cache


@pytest.mark.slow
def test_thousands_of_branches_then_nothing_is_held(start_server):
    """4 clients in parallel, 2 rounds each of 8 states x 32 branches x 2 chunks: 4,096 branches."""
    server = start_server(EngineConfig(block_size=8, num_kv_blocks=8192))
    errors: list[BaseException] = []

    def trainer(worker: int) -> None:
        try:
            with WorldModelClient(server.target, client_id=f"trainer-{worker}") as client:
                for round_ in range(2):
                    roots = client.create_states([f"task {worker}"] * 8, observations(8, seed=worker * 10 + round_))
                    parents = [roots[i // 32] for i in range(256)]
                    kept = [r.state_id for r in client.imagine(parents, action_chunks(256, round_), keep_state=True)]
                    results = list(client.imagine(kept, action_chunks(256, round_ + 1), keep_state=False))
                    assert sorted(r.index for r in results) == list(range(256))
                    assert all(r.state_id is None for r in results)
                    assert client.release(roots + kept) == 8 + 256
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=trainer, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    assert errors == []
    with WorldModelClient(server.target) as client:
        stats = client.stats()
    assert stats.branches_completed == 4 * 2 * 2 * 256
    assert (stats.live_states, stats.kv_blocks_used, stats.queue_depth) == (0, 0, 0)
    assert stats.kv_blocks_cached <= stats.kv_blocks_total
    assert len(server.server.leases) == 0
