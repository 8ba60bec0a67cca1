"""VLA-MBPO: start-state sampling, GAE over imagined branches, and a tiny run against a real `vla-mbpo serve`."""

import json

import numpy as np
import pytest
import torch
from served_fixtures import TINY_POLICY, write_tiny_world_model

from trainer.config import ConfigError, MBPOConfig, PPOConfig
from trainer.data import DatasetMeta, Episode, EpisodeWriter
from trainer.imagination import ImaginedRollouts, Imaginer
from trainer.mbpo import MBPOTrainer, StartStateSampler, main, pool_wave_stats, rollouts_to_batch
from trainer.policy import VlaPolicy, load_policy, save_policy
from trainer.rollout_client import RolloutServerError, WorldModelClient
from trainer.server_process import ServerProcess

TINY = TINY_POLICY
LENGTHS = (3, 5, 4)
INSTRUCTIONS = ("lift the cube", "push the ball", "put the box in the bin")


@pytest.fixture(scope="module")
def buffer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("buffer")
    writer = EpisodeWriter(path, DatasetMeta(16, 16, 4, (-1.0,) * 4, (1.0,) * 4, 2))
    for i, num_steps in enumerate(LENGTHS):
        frames = np.full((num_steps + 1, 16, 16, 3), 0, dtype=np.uint8)
        frames[:, 0, 0, 0] = np.arange(num_steps + 1) + 10 * i  # pixel (0, 0) names (episode, t)
        writer.add(Episode(frames, frames.copy(), np.zeros((num_steps, 4), np.float32),
                           np.array([False] * num_steps + [i == 1]), INSTRUCTIONS[i], "lift", i))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    checkpoint = write_tiny_world_model(root / "ckpt")
    with ServerProcess(checkpoint, root / "server.log", ["--max-branches-per-request", "5"]) as process:
        yield process


def test_start_states_are_uniform_over_every_unfinished_observation(buffer_dir):
    sampler = StartStateSampler(buffer_dir)
    assert sampler.real_env_steps == sum(LENGTHS)
    assert sampler.unfinished_states.tolist() == [4, 5, 5]  # episode 1's last observation is its success
    states = sampler.sample(6000, np.random.default_rng(0))
    codes = [int(s.head[0, 0, 0]) for s in states]
    expected = {10 * i + t for i, n in enumerate(LENGTHS) for t in range(n + 1)} - {15}  # 14 observations
    assert set(codes) == expected
    counts = np.bincount(codes)[sorted(expected)]
    assert counts.min() > 6000 / 14 * 0.8 and counts.max() < 6000 / 14 * 1.2
    assert {s.instruction for s in states if s.head[0, 0, 0] // 10 == 1} == {INSTRUCTIONS[1]}


def test_real_success_within_the_horizon_counts_the_buffer_outcomes(buffer_dir):
    sampler = StartStateSampler(buffer_dir)
    # 14 start states; only episode 1 succeeds, at t = 5: within 1 chunk (2 steps) from t = 3, 4, within 2
    # from t = 1..4, within 3 from all 5 of its states; episodes 0 and 2 end without one.
    assert sampler.real_success_within(2, 1) == 2 / 14
    assert sampler.real_success_within(2, 2) == 4 / 14
    assert sampler.real_success_within(2, 3) == 5 / 14


def test_rollouts_to_batch_gae_and_masking_by_hand():
    # Branch 0 succeeds after chunk 0 (chunk 1 never taken); branch 1 runs both chunks and is bootstrapped.
    b, t = 2, 2
    images = np.zeros((b, t, 16, 16, 3), dtype=np.uint8)
    images[1, 1, 0, 0, 0] = 7
    rollouts = ImaginedRollouts(
        head=images, wrist=images.copy(), instructions=["lift the cube", "push the ball"],
        bins=torch.arange(b * t * 8).reshape(b, t, 8) % 5, log_probs=torch.tensor([[-1.0, 0.0], [-2.0, -3.0]]),
        values=torch.tensor([[0.5, 0.0], [0.25, 0.5]]), rewards=torch.tensor([[1.0, 0.0], [0.0, 0.0]]),
        success_prob=torch.tensor([[0.9, 0.0], [0.1, 0.2]]),
        terminated=torch.tensor([[True, False], [False, False]]),
        valid=torch.tensor([[True, False], [True, True]]), bootstrap_values=torch.tensor([0.0, 1.0]))
    batch, stats = rollouts_to_batch(rollouts, PPOConfig(gamma=0.5, gae_lambda=0.5), TINY)
    # branch 0: A = 1 - 0.5 = 0.5; branch 1: d1 = 0.5 * 1 - 0.5 = 0, d0 = 0.5 * 0.5 - 0.25 = 0, A = 0, 0
    assert batch.advantages.tolist() == [0.5, 0.0, 0.0]
    assert batch.returns.tolist() == [1.0, 0.25, 0.5]
    assert batch.old_log_probs.tolist() == [-1.0, -2.0, -3.0]
    assert batch.bins.tolist() == rollouts.bins[rollouts.valid].tolist()
    assert batch.observations.head[:, 0, 0, 0].tolist() == [0, 0, 7]
    assert stats["imagine/success_rate"] == 0.5 and stats["imagine/valid_steps"] == 3
    assert stats["imagine/success_prob_mean"] == pytest.approx(0.4)


def test_group_baseline_replaces_the_first_chunk_critic_by_the_sibling_branches():
    # Two branches of one start state (same V(s_0) = 0.25): branch 0 succeeds after chunk 0, branch 1 runs both
    # chunks and is bootstrapped with V = 1.
    b, t = 2, 2
    images = np.zeros((b, t, 16, 16, 3), dtype=np.uint8)
    rollouts = ImaginedRollouts(
        head=images, wrist=images.copy(), instructions=["lift the cube"] * 2,
        bins=torch.zeros((b, t, 8), dtype=torch.int64), log_probs=torch.zeros((b, t)),
        values=torch.tensor([[0.25, 0.0], [0.25, 0.5]]), rewards=torch.tensor([[1.0, 0.0], [0.0, 0.0]]),
        success_prob=torch.tensor([[0.9, 0.0], [0.1, 0.2]]),
        terminated=torch.tensor([[True, False], [False, False]]),
        valid=torch.tensor([[True, False], [True, True]]), bootstrap_values=torch.tensor([0.0, 1.0]))
    ppo = PPOConfig(gamma=0.5, gae_lambda=0.5)
    critic, stats = rollouts_to_batch(rollouts, ppo, TINY, group_size=2)
    grouped, _ = rollouts_to_batch(rollouts, ppo, TINY, group_size=2, group_baseline=True)
    # critic: A_0 = 1 - 0.25 and 0.5 * 0.5 - 0.25 = 0; lambda-returns of the first chunk 1.0 and 0.25
    assert critic.advantages.tolist() == [0.75, 0.0, 0.0]
    # grouped: 1.0 - 0.25 and 0.25 - 1.0; the second chunk (an imagined state of its own) keeps the critic's
    assert grouped.advantages.tolist() == [0.75, -0.75, 0.0]
    assert grouped.returns.tolist() == critic.returns.tolist() == [1.0, 0.25, 0.5]  # the critic's targets
    assert stats["imagine/mixed_groups"] == 1.0


def test_wave_stats_pool_each_rate_in_its_own_unit():
    # Wave 0: 8 branches (4 start states of G = 2), 10 valid steps; wave 1: 4 branches (2 states), 30 steps.
    waves = [{"imagine/success_rate": 0.5, "imagine/mixed_groups": 0.25, "imagine/valid_steps": 10,
              "ppo/advantage_mean": 1.0, "ppo/advantage_std": 1.0},
             {"imagine/success_rate": 0.0, "imagine/mixed_groups": 1.0, "imagine/valid_steps": 30,
              "ppo/advantage_mean": -1.0, "ppo/advantage_std": 0.0}]
    pooled = pool_wave_stats(waves, num_branches=[8, 4], group_size=2)
    assert pooled["imagine/success_rate"] == 4 / 12  # 4 of 12 branches succeeded
    assert pooled["imagine/mixed_groups"] == 0.5  # 1 + 2 of 6 start states
    assert pooled["imagine/valid_steps"] == 40
    assert pooled["ppo/advantage_mean"] == -0.5  # (10 * 1 - 30 * 1) / 40
    # E[A^2] over the 40 steps = (10 * (1 + 1) + 30 * 1) / 40 = 1.25, minus the mean's square 0.25
    assert pooled["ppo/advantage_std"] == 1.0


def test_group_baseline_needs_several_branches():
    with pytest.raises(ConfigError, match="group_baseline needs branches_per_state >= 2, got 1"):
        MBPOConfig(group_baseline=True)
    assert MBPOConfig(group_baseline=True, branches_per_state=4).group_baseline


@pytest.mark.parametrize("ratio_per", ["chunk", "dim"])
def test_tiny_vla_mbpo_run_against_a_real_server(server, buffer_dir, tmp_path, ratio_per):
    torch.manual_seed(0)
    policy = VlaPolicy(TINY)
    start = {k: v.clone() for k, v in policy.state_dict().items()}
    config = MBPOConfig(iterations=2, num_start_states=6, branches_per_state=2, horizon_chunks=2, states_per_wave=4,
                        critic_warmup_steps=0, group_baseline=True)
    ppo = PPOConfig(updates_per_refill=2, minibatch_size=8, actor_lr=1e-3, ratio_per=ratio_per)
    with WorldModelClient(server.target) as client:  # per dim the learner checks the served branches' log-probs
        trainer = MBPOTrainer(policy, Imaginer(client), StartStateSampler(buffer_dir), tmp_path / "run", config, ppo)
        trainer.train(progress=False)
        stats = client.stats()
    assert stats.live_states == 0 and stats.kv_blocks_used == 0  # every created and kept state released
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    start_record, *records = [json.loads(line) for line in lines]
    # no warm-up, no evaluation: iteration 0 holds the buffer's real success within the 2-chunk horizon only
    assert start_record == {"iteration": 0, "real_env_steps": 12, "buffer/real_success_within_horizon": 4 / 14}
    assert [r["iteration"] for r in records] == [1, 2]
    assert all(r["imagine/branches"] == 12 and r["real_env_steps"] == 12 for r in records)
    # 12 branches: chunk 0 always, chunk 1 only for branches the model did not judge successful
    assert all(12 <= r["imagine/chunks"] <= 24 and r["imagine/chunks"] == r["imagine/valid_steps"] for r in records)
    assert set(records[0]) >= {"imagine/success_rate", "imagine/chunks_per_second", "ppo/actor_loss",
                               "ppo/critic_loss", "ppo/clip_fraction", "ppo/approx_kl", "ppo/advantage_mean",
                               "imagine/mixed_groups"}
    final, meta = load_policy(tmp_path / "run" / "policy")
    assert meta["iteration"] == 2
    assert any(not torch.equal(start[k], v) for k, v in final.state_dict().items())

    resumed = MBPOTrainer(VlaPolicy(TINY), Imaginer(WorldModelClient(server.target)), StartStateSampler(buffer_dir),
                          tmp_path / "run", config, ppo)
    assert resumed.resume() and resumed.iteration == 2
    assert all(torch.equal(v, final.state_dict()[k]) for k, v in resumed.policy.state_dict().items())


def test_critic_warm_up_on_buffer_returns_is_logged_before_the_first_iteration(server, buffer_dir, tmp_path):
    torch.manual_seed(0)
    config = MBPOConfig(iterations=1, num_start_states=4, horizon_chunks=1, critic_warmup_steps=3)
    ppo = PPOConfig(updates_per_refill=1, minibatch_size=8)
    with WorldModelClient(server.target) as client:
        MBPOTrainer(VlaPolicy(TINY), Imaginer(client), StartStateSampler(buffer_dir), tmp_path / "run", config,
                    ppo).train(progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1]
    assert records[0]["critic_warmup/steps"] == 3 and records[0]["real_env_steps"] == 12
    assert records[0]["buffer/real_success_within_horizon"] == 2 / 14  # the counterpart of imagine/success_rate
    assert {"critic_warmup/first_loss", "critic_warmup/final_loss"} <= set(records[0])


def test_start_state_returns_are_the_buffer_outcomes(buffer_dir):
    """Episode 1 (5 steps) succeeds on its last observation: with k = 2 its t = 0..5 are 3, 2, 2, 1, 1 chunks
    from it (t = 5 is the success: one chunk pays); the other episodes never succeed."""
    states, returns = StartStateSampler(buffer_dir).sample_with_returns(3000, np.random.default_rng(0), 2, 0.5)
    expected = {10 + t: 0.5 ** (c - 1) for t, c in enumerate([3, 2, 2, 1, 1, 1])}
    for state, value in zip(states, returns, strict=True):
        code = int(state.head[0, 0, 0])
        assert value == expected.get(code, 0.0), code


def test_branches_longer_than_the_model_window_continue_from_their_imagined_observation(server, buffer_dir):
    """n = 4 chunks on a model whose window is 3: chunk 3 starts from a state made of the chunk-2 prediction."""
    policy = VlaPolicy(TINY)
    starts = StartStateSampler(buffer_dir).sample(3, np.random.default_rng(1))
    with WorldModelClient(server.target) as client:
        imaginer = Imaginer(client)
        assert imaginer.info.max_chunks_per_branch == 3
        held = client.create_states([starts[0].instruction], [{"head": starts[0].head, "wrist": starts[0].wrist}])
        try:
            with pytest.raises(RolloutServerError, match="max_chunks_per_branch"):  # one stream refuses chunk 4
                for _ in range(4):
                    (result,) = client.imagine(held[-1:], np.zeros((1, 2, 4)), seeds=[0], keep_state=True)
                    held.append(result.state_id)
            assert len(held) == 4  # the start state and three chunks
        finally:
            client.release(held)
        rollouts = imaginer.rollout(policy, starts, branches_per_state=2, horizon_chunks=4,
                                    generator=torch.Generator().manual_seed(0), seed_base=0, reward_threshold=1.1)
        stats = client.stats()
    assert rollouts.valid.shape == (6, 4) and bool(rollouts.valid.all())  # never judged done: all 4 chunks ran
    assert rollouts.head.shape == (6, 4, 16, 16, 3)
    assert stats.live_states == 0 and stats.kv_blocks_used == 0


def test_train_cli_refuses_to_overwrite_and_resumes(server, buffer_dir, tmp_path, capsys):
    torch.manual_seed(0)
    save_policy(VlaPolicy(TINY), tmp_path / "sft")
    args = ["--server", server.target, "--data", str(buffer_dir), "--policy", str(tmp_path / "sft"), "--out",
            str(tmp_path / "run"), "-M", "3", "-n", "1", "--updates-per-refill", "1", "--minibatch-size", "4",
            "--critic-warmup-steps", "2", "--no-progress"]
    assert main([*args, "--iterations", "1"]) == 0
    assert main([*args, "--iterations", "2"]) == 2
    assert "already holds a run; pass --resume or pick a new --out" in capsys.readouterr().err
    assert main([*args, "--iterations", "2", "--resume"]) == 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [0, 1, 2]  # 0: the critic warm-up


def test_train_cli_names_an_invalid_option_without_a_traceback(tmp_path, capsys):
    args = ["--server", "127.0.0.1:1", "--data", str(tmp_path), "--policy", str(tmp_path), "--out",
            str(tmp_path / "run")]
    assert main([*args, "--group-baseline"]) == 2
    assert capsys.readouterr().err == ("vla-mbpo train: error: invalid MBPOConfig: group_baseline needs "
                                       "branches_per_state >= 2, got 1\n")
    assert main([*args, "-G", "2", "--iterations", "0"]) == 2
    assert "iterations must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing was started
