"""The simulator world model: branches replayed and stepped in the real env, exact to the recorded frames."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.collect import record_episode
from trainer.config import ConfigError, MBPOConfig, PolicyConfig, PPOConfig
from trainer.data import DatasetMeta, Episode, EpisodeWriter
from trainer.envs import make_env
from trainer.envs.expert import ScriptedExpert
from trainer.imagination import Imaginer, RecordedOrigin, StartState
from trainer.mbpo import MBPOTrainer, StartStateSampler, main
from trainer.policy import PolicyOutput, VlaPolicy, actions_to_bins, bins_to_actions, save_policy
from trainer.sim_imagination import SimulatorError, SimulatorImaginer

SIZE = 16
CHUNK = 2
TINY = PolicyConfig(conv_channels=(4, 8), image_size=SIZE, hidden_dim=32, image_feature_dim=16, text_feature_dim=8,
                    text_embed_dim=8, critic_hidden_dim=8, chunk_size=CHUNK, action_dim=4, num_bins=5)
SEED = 7


class Replay:
    """Plays given actions, one per act() (the expert interface of trainer.collect.record_episode)."""

    def __init__(self, actions: np.ndarray) -> None:
        self.actions = iter(actions)

    def act(self, obs=None) -> np.ndarray:
        return next(self.actions)


class OnTinyGrid:
    """The full-skill expert's actions rounded to TINY's 5 bins, so that a policy can emit them exactly."""

    def __init__(self, env) -> None:
        self.expert = ScriptedExpert(env, skill=1.0, seed=0)

    def act(self, obs=None) -> np.ndarray:
        return quantize(self.expert.act(obs)[None])[0]


class FixedChunk(VlaPolicy):
    """Puts (nearly) all probability on one action chunk, whatever it sees; its critic says VALUE everywhere."""

    VALUE = 0.25

    def __init__(self, chunk: np.ndarray) -> None:
        super().__init__(TINY)
        self.bins = actions_to_bins(torch.from_numpy(chunk)[None], TINY.num_bins)[0]  # [k * d]

    def forward(self, batch) -> PolicyOutput:
        logits = torch.full((len(batch), self.bins.shape[0], TINY.num_bins), -1e4)
        logits[:, torch.arange(self.bins.shape[0]), self.bins] = 0.0
        return PolicyOutput(logits, torch.full((len(batch),), self.VALUE))


def quantize(actions: np.ndarray) -> np.ndarray:
    """The nearest TINY bin centres (policy.actions_to_bins, then the centre of each bin), float32."""
    bins = actions_to_bins(torch.from_numpy(np.asarray(actions, np.float32))[None], TINY.num_bins)[0].numpy()
    return (bins * (2.0 / (TINY.num_bins - 1)) - 1.0).astype(np.float32).reshape(np.shape(actions))


def record(task: str, seed: int, expert_of, max_steps: int | None = None) -> Episode:
    """One episode of `expert_of(env)` at SIZE x SIZE, to its first success or max_steps."""
    env = make_env(task, image_size=SIZE)
    try:
        return record_episode(env, expert_of(env), seed, max_steps)
    finally:
        env.close()


def start_at(episode: Episode, t: int) -> StartState:
    return StartState(episode.instruction, episode.head[t], episode.wrist[t],
                      RecordedOrigin(episode.task, episode.seed, episode.actions[:t]))


def random_actions(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def random_episode() -> Episode:
    return record("push", SEED, lambda env: Replay(random_actions(0, 12)), 12)


@pytest.fixture(scope="module")
def expert_episode() -> Episode:
    episode = record("lift", SEED, OnTinyGrid)
    assert episode.success[-1] and not episode.success[-2]  # stopped at its first success
    return episode


@pytest.fixture()
def sim():
    imaginer = SimulatorImaginer(CHUNK, SIZE, SIZE)
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
    sim._imagine([state], np.ones((1, 8), np.float32), [2], keep=False, temperature=1.0, owned=owned)  # elsewhere
    (second,) = sim._imagine([first[0].state_id], random_episode.actions[6:8].reshape(1, -1), [0], keep=False,
                             temperature=1.0, owned=owned)
    assert second.state_id is None and np.array_equal(second.images["wrist"], random_episode.wrist[8])
    assert sim.real_env_steps == 4 * CHUNK  # chunk steps only, not the replay that rebuilt the start state
    assert len(owned) == 3
    sim._release(owned)
    assert sim._states == {}
    with pytest.raises(SimulatorError, match="unknown simulator state 'sim-1'"):
        sim._imagine(["sim-1"], random_episode.actions[6:8].reshape(1, -1), [0], keep=False, temperature=1.0,
                     owned=[])


def test_a_success_inside_a_chunk_ends_the_branch_with_the_env_reward(sim, expert_episode, random_episode):
    last = expert_episode.num_steps - 1  # one action before the first success
    chunk = np.stack([expert_episode.actions[last], np.zeros(4, np.float32)])
    rollouts = sim.rollout(FixedChunk(chunk), [start_at(expert_episode, last), start_at(random_episode, 0)], 2, 2,
                           torch.Generator().manual_seed(0), seed_base=0)
    assert rollouts.terminated.tolist() == [[True, False]] * 2 + [[False, False]] * 2
    assert rollouts.rewards.tolist() == [[1.0, 0.0]] * 2 + [[0.0, 0.0]] * 2
    assert rollouts.valid.tolist() == [[True, False]] * 2 + [[True, True]] * 2
    assert rollouts.bootstrap_values.tolist() == [0.0] * 2 + [FixedChunk.VALUE] * 2  # a success is not bootstrapped
    assert sim.real_env_steps == 2 * 1 + 2 * 2 * CHUNK  # the env stopped each successful chunk at its first step
    with pytest.raises(SimulatorError, match=f"episode seed {SEED} \\(lift, .*\\) after {last + 1} steps: the task "
                                             "is already done"):
        sim._create_states([start_at(expert_episode, last + 1)])


def test_a_multi_task_recording_is_rebuilt_in_the_multi_task_env(sim):
    episode = record("multi", SEED, lambda env: Replay(random_actions(1, 6)), 6)
    assert episode.task in ("lift", "push", "place")  # a recording names the family drawn, not "multi"
    (state,) = sim._create_states([start_at(episode, 4)])
    (result,) = sim._imagine([state], episode.actions[4:6].reshape(1, -1), [0], keep=False, temperature=1.0, owned=[])
    assert np.array_equal(result.images["head"], episode.head[6])
    assert sim._env_task_of == {episode.task: "multi"}  # tried first for that family from now on


def test_a_start_state_it_cannot_rebuild_is_refused_by_name(sim, random_episode):
    good = start_at(random_episode, 4)
    where = f"episode seed {SEED} \\(push, '{good.instruction}'\\) after 4 steps"
    shifted = StartState(good.instruction, random_episode.head[5], good.wrist, good.origin)
    with pytest.raises(SimulatorError, match=f"{where}: replaying its actions does not give the recorded"):
        sim._create_states([shifted])
    renamed = StartState("lift the moon", good.head, good.wrist, good.origin)
    with pytest.raises(SimulatorError, match="does not give the recorded instruction and frames"):
        sim._create_states([renamed])
    with pytest.raises(SimulatorError, match=f"{where}: frames of \\(8, 8\\), the simulator renders \\(16, 16\\)"):
        sim._create_states([StartState(good.instruction, good.head[:8, :8], good.wrist[:8, :8], good.origin)])
    with pytest.raises(SimulatorError, match="without its recorded origin"):
        sim._create_states([StartState(good.instruction, good.head, good.wrist)])


def test_a_policy_of_another_chunk_shape_is_refused(random_episode):
    sim = SimulatorImaginer(3, SIZE, SIZE)
    with pytest.raises(SimulatorError, match="the policy acts in chunks of 2 x 4; the simulator steps 3 x 4"):
        sim.rollout(VlaPolicy(TINY), [start_at(random_episode, 0)], 1, 1, torch.Generator(), seed_base=0)


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


def test_train_cli_on_the_simulator_counts_its_real_steps(random_episode, tmp_path, capsys):
    buffer = tmp_path / "buffer"
    writer = EpisodeWriter(buffer, DatasetMeta(SIZE, SIZE, 4, (-1.0,) * 4, (1.0,) * 4, CHUNK))
    writer.add(random_episode)
    writer.add(record("lift", SEED + 1, lambda env: Replay(random_actions(1, 6)), 6))
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

    capsys.readouterr()
    unserved = object.__new__(Imaginer)  # the served kind, without a server: resume never calls one
    served = MBPOTrainer(VlaPolicy(TINY), unserved, StartStateSampler(buffer), tmp_path / "run", MBPOConfig(),
                         PPOConfig())
    with pytest.raises(ConfigError, match="was trained with SimulatorImaginer, not Imaginer: resume it the same way"):
        served.resume()
    capsys.readouterr()
    assert main([*argv, "--iterations", "4", "--resume", "--ratio-per", "chunk"]) == 2  # trained per dim, the default
    assert "was trained with PPO ratios per dim, not per chunk: pass --ratio-per dim" in capsys.readouterr().err
    assert main([*argv, "--iterations", "4", "--token", "t"]) == 2
    assert "--token is for a rollout server" in capsys.readouterr().err


def test_importing_the_trainer_loop_does_not_load_mujoco():
    """MuJoCo picks its GL backend when imported; `vla-mbpo train` sets MUJOCO_GL first, so the module must not."""
    env = {k: v for k, v in os.environ.items() if k != "MUJOCO_GL"}
    code = "import sys, trainer.mbpo; assert 'mujoco' not in sys.modules, 'mujoco imported'"
    repo = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=repo)
