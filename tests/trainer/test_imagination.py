"""Served rollouts when other clients' states fill the server's KV cache: the rollout releases what it holds,
waits and starts again (`Imaginer.capacity_retry`), against a real `vla-mbpo serve` with a small cache."""

import dataclasses

import grpc
import numpy as np
import pytest
import torch
from served_fixtures import TINY_POLICY, write_tiny_world_model

from trainer.imagination import Imaginer, StartState
from trainer.policy import VlaPolicy
from trainer.rollout_client import RetryPolicy, RolloutServerError, WorldModelClient
from trainer.server_process import ServerProcess

# Block size 8: a start state takes 7 blocks, each kept chunk 6 more. The rollout below (2 start states, 2 branches
# each, 2 chunks) fits in 64 blocks alone; beside 4 states held by another client (24 blocks: their instructions
# share a prefix block) its second chunk does not: the server fails that Imagine with RESOURCE_EXHAUSTED.
KV_ARGS = ["--engine-num-kv-blocks", "64", "--engine-block-size", "8"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    with ServerProcess(write_tiny_world_model(root / "ckpt"), root / "server.log", KV_ARGS) as process:
        yield process


def observation(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {view: rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for view in ("head", "wrist")}


def start_states() -> list[StartState]:
    return [StartState(text, obs["head"], obs["wrist"])
            for text, obs in (("lift the cube", observation(1)), ("push the ball", observation(2)))]


@dataclasses.dataclass(frozen=True)
class ReleaseWhileWaiting(RetryPolicy):
    """A retry policy whose wait stands for another client releasing its states meanwhile."""

    holder: WorldModelClient | None = None
    held: tuple[str, ...] = ()

    def backoff(self, retry: int, rng) -> float:
        self.holder.release(list(self.held))
        return 0.0


def hold_four_states(holder: WorldModelClient) -> tuple[str, ...]:
    return tuple(holder.create_states([f"hold {i}" for i in range(4)], [observation(10 + i) for i in range(4)]))


def roll(imaginer: Imaginer, starts: list[StartState] | None = None):
    return imaginer.rollout(VlaPolicy(TINY_POLICY), starts or start_states(), branches_per_state=2, horizon_chunks=2,
                            generator=torch.Generator().manual_seed(0), seed_base=0, reward_threshold=1.1)


def test_a_rollout_refused_for_kv_capacity_releases_its_states_and_starts_again(server):
    with WorldModelClient(server.target, client_id="holder") as holder, \
            WorldModelClient(server.target, client_id="trainer") as client:
        held = hold_four_states(holder)
        imaginer = Imaginer(client, capacity_retry=ReleaseWhileWaiting(max_attempts=2, holder=holder, held=held))
        rollouts = roll(imaginer)
        stats = client.stats()
    assert imaginer.num_capacity_retries == 1
    assert rollouts.valid.shape == (4, 2) and bool(rollouts.valid.all())
    assert (stats.live_states, stats.kv_blocks_used) == (0, 0)


def test_the_last_attempt_raises_and_leaves_nothing_of_the_rollout_behind(server):
    with WorldModelClient(server.target, client_id="holder") as holder, \
            WorldModelClient(server.target, client_id="trainer") as client:
        held = hold_four_states(holder)
        imaginer = Imaginer(client, capacity_retry=RetryPolicy(max_attempts=2, initial_backoff=0.01,
                                                               max_backoff=0.01))
        try:
            with pytest.raises(RolloutServerError, match=r"KV cache exhausted: 62 of 64 blocks are held by 10 live "
                               r"states and a 113-token stream does not fit; .* \(the rollout gave up after 2 "
                               r"attempts and 0 s of waiting for other clients' states\)") as failure:
                roll(imaginer)
            stats = client.stats()
        finally:
            holder.release(list(held))
    assert (failure.value.code, failure.value.attempts) == (grpc.StatusCode.RESOURCE_EXHAUSTED, 2)
    assert imaginer.num_capacity_retries == 1
    assert (stats.live_states, stats.kv_blocks_used) == (4, 24)  # the holder's: each attempt released its own


def test_a_rollout_too_large_for_the_cache_alone_fails_at_once(server):
    starts = start_states() * 2  # 4 start states, 2 branches each: more kept states than 64 blocks hold
    with WorldModelClient(server.target, client_id="trainer") as client:
        imaginer = Imaginer(client)
        with pytest.raises(RolloutServerError, match=r"KV cache exhausted: .* blocks are held by \d+ live states and "
                                                     r"a \d+-token stream does not fit; release states or raise "
                                                     r"num_kv_blocks$") as failure:
            roll(imaginer, starts)
        stats = client.stats()
    assert (failure.value.attempts, imaginer.num_capacity_retries) == (1, 0)
    assert (stats.live_states, stats.kv_blocks_used) == (0, 0)
