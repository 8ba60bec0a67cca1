"""The simulator world model: branches replayed and stepped in the real env, exact to the recorded frames."""

import json

import numpy as np
import pytest
import torch

from trainer.config import PolicyConfig
from trainer.data import DatasetMeta, Episode, EpisodeWriter
from trainer.envs import make_env
from trainer.envs.expert import ScriptedExpert
from trainer.imagination import RecordedOrigin, StartState
from trainer.mbpo import StartStateSampler, main
from trainer.policy import VlaPolicy, bins_to_actions, save_policy
from trainer.sim_imagination import SimulatorError, SimulatorImaginer

SIZE = 16
CHUNK = 2
TINY = PolicyConfig(conv_channels=(4, 8), image_size=SIZE, hidden_dim=32, image_feature_dim=16, text_feature_dim=8,
                    text_embed_dim=8, critic_hidden_dim=8, chunk_size=CHUNK, action_dim=4, num_bins=5)
SEED = 7


def record(task: str, seed: int, actions: np.ndarray) -> Episode:
    """An episode of `actions` in the env at SIZE x SIZE, every frame kept (stopping at a success)."""
    env = make_env(task, image_size=SIZE)
    obs, info = env.reset(seed=seed)
    frames, success, taken = [obs], [info["success"]], []
    for action in actions:
        obs, _, terminated, truncated, info = env.step(action)
        frames.append(obs)
        success.append(info["success"])
        taken.append(action)
        if terminated or truncated:
            break
    env.close()
    return Episode(np.stack([f["head"] for f in frames]), np.stack([f["wrist"] for f in frames]),
                   np.asarray(taken, np.float32), np.asarray(success), env.instruction, task, seed)


def start_at(episode: Episode, t: int) -> StartState:
    return StartState(episode.instruction, episode.head[t], episode.wrist[t],
                      RecordedOrigin(episode.task, episode.seed, episode.actions[:t]))


@pytest.fixture(scope="module")
def random_episode() -> Episode:
    return record("push", SEED, np.random.default_rng(0).uniform(-1, 1, (12, 4)).astype(np.float32))


@pytest.fixture()
def sim():
    imaginer = SimulatorImaginer(CHUNK, (-1.0,) * 4, (1.0,) * 4)
    yield imaginer
    imaginer.close()


def test_a_kept_branch_steps_on_from_its_parent_and_renders_the_recorded_frames(sim, random_episode):
    owned: list[str] = []
    (state,) = sim._create_states([start_at(random_episode, 4)], owned)
    first = sim._imagine([state, state], np.stack([random_episode.actions[4:6].reshape(-1)] * 2), [0, 1], keep=True,
                         temperature=1.0, owned=owned)
    assert [r.index for r in first] == [0, 1] and first[0].state_id != first[1].state_id  # two forks of one state
    for result in first:
        assert np.array_equal(result.images["head"], random_episode.head[6])
        assert np.array_equal(result.images["wrist"], random_episode.wrist[6])
        assert (result.success, result.success_prob) == (False, 0.0)
    (second,) = sim._imagine([first[0].state_id], random_episode.actions[6:8].reshape(1, -1), [0], keep=False,
                             temperature=1.0, owned=owned)
    assert second.state_id is None and np.array_equal(second.images["wrist"], random_episode.wrist[8])
    assert sim.real_env_steps == 3 * CHUNK  # chunk steps only, not the replays that rebuild a state
    assert len(owned) == 3
    sim._release(owned)
    with pytest.raises(SimulatorError, match="unknown simulator state 'sim-1'"):
        sim._imagine(["sim-1"], random_episode.actions[6:8].reshape(1, -1), [0], keep=False, temperature=1.0,
                     owned=[])


def test_a_success_inside_a_chunk_ends_it_with_the_env_reward():
    env = make_env("lift", image_size=SIZE)
    env.reset(seed=SEED)
    expert = ScriptedExpert(env, skill=1.0, seed=0)
    actions = []
    for _ in range(96):
        action = expert.act()
        actions.append(action)
        if env.step(action)[2]:
            break
    env.close()
    episode = record("lift", SEED, np.asarray(actions, np.float32))
    first_success = int(np.argmax(episode.success))
    assert episode.success[-1] and first_success == episode.num_steps
    sim = SimulatorImaginer(CHUNK, (-1.0,) * 4, (1.0,) * 4)
    (state,) = sim._create_states([start_at(episode, first_success - 1)])
    chunk = np.concatenate([episode.actions[-1], np.zeros(4, np.float32)])  # succeeds at its first step
    (result,) = sim._imagine([state], chunk[None], [0], keep=True, temperature=1.0, owned=[])
    assert (result.success, result.success_prob) == (True, 1.0)
    assert np.array_equal(result.images["head"], episode.head[first_success])
    assert sim.real_env_steps == 1  # the env stopped at the success, inside the chunk
    with pytest.raises(SimulatorError, match=f"episode seed {SEED} \\(lift\\) after {first_success} steps: the task "
                                             "is already done"):
        sim._create_states([start_at(episode, first_success)])
    sim.close()


def test_a_start_state_it_cannot_rebuild_is_refused_by_name(sim, random_episode):
    good = start_at(random_episode, 4)
    shifted = StartState(good.instruction, random_episode.head[5], good.wrist, good.origin)
    with pytest.raises(SimulatorError, match=f"episode seed {SEED} \\(push\\) after 4 steps: replaying its actions "
                                             "does not render the recorded frames"):
        sim._create_states([shifted])
    with pytest.raises(SimulatorError, match="without its recorded origin"):
        sim._create_states([StartState(good.instruction, good.head, good.wrist)])


def test_policy_rollouts_match_the_env_stepped_with_the_same_actions(sim, random_episode):
    torch.manual_seed(0)
    policy = VlaPolicy(TINY)
    rollouts = sim.rollout(policy, [start_at(random_episode, 4), start_at(random_episode, 0)], 2, 2,
                           torch.Generator().manual_seed(0), seed_base=0)
    assert rollouts.valid.all() and not rollouts.terminated.any()  # an untrained policy pushes nothing onto a pad
    assert sim.real_env_steps == 8 * CHUNK and sim._states == {}  # every state released
    env = make_env("push", image_size=SIZE)
    for branch, t in enumerate((4, 4, 0, 0)):
        env.reset(seed=SEED)
        if t:
            env.step_chunk(random_episode.actions[:t])
        obs, *_ = env.step_chunk(bins_to_actions(rollouts.bins[branch, :1], TINY)[0].numpy())
        assert np.array_equal(rollouts.head[branch, 1], obs["head"])  # the observation chunk 1 was chosen from
        assert np.array_equal(rollouts.wrist[branch, 1], obs["wrist"])
    env.close()


def test_train_cli_on_the_simulator_counts_its_real_steps(random_episode, tmp_path):
    buffer = tmp_path / "buffer"
    writer = EpisodeWriter(buffer, DatasetMeta(SIZE, SIZE, 4, (-1.0,) * 4, (1.0,) * 4, CHUNK))
    writer.add(random_episode)
    writer.add(record("lift", SEED + 1, np.random.default_rng(1).uniform(-1, 1, (6, 4)).astype(np.float32)))
    torch.manual_seed(0)
    save_policy(VlaPolicy(TINY), tmp_path / "sft")
    argv = ["--simulator", "--data", str(buffer), "--policy", str(tmp_path / "sft"), "--out", str(tmp_path / "run"),
            "-M", "3", "-G", "2", "--critic-warmup-steps", "0", "--updates-per-refill", "1", "--minibatch-size", "4",
            "--no-progress"]
    assert main([*argv, "--iterations", "2"]) == 0
    start, *records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    buffer_steps = StartStateSampler(buffer).real_env_steps
    assert buffer_steps == 18 and start["real_env_steps"] == buffer_steps
    assert [r["imagine/success_rate"] for r in records] == [0.0, 0.0]
    # 6 branches x 2 chunks x 2 steps per iteration, all real
    assert [r["imagine/chunks"] for r in records] == [12, 12]
    assert [r["real_env_steps"] for r in records] == [buffer_steps + 24, buffer_steps + 48]
    assert main([*argv, "--iterations", "3", "--resume"]) == 0  # the count survives a resume
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert (last["iteration"], last["real_env_steps"]) == (3, buffer_steps + 72)
