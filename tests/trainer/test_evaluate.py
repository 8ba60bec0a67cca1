"""Real-env evaluation: seeded episodes, step accounting, recording into the replay-buffer format."""

import argparse

import numpy as np
import pytest
import torch

from trainer.cli_args import add_eval_arguments, eval_config_from_args
from trainer.config import ConfigError, EvalConfig, PolicyConfig
from trainer.data import EpisodeDataset
from trainer.evaluate import (
    EpisodeOutcome,
    EvalResult,
    episode_generator,
    evaluate_in_training,
    evaluate_policy,
    family_name,
    format_table,
    record_to,
)
from trainer.machine import machine_fingerprint
from trainer.policy import VlaPolicy, save_policy

# 64x64 like the env; four halvings keep the CNN tiny.
SMALL = PolicyConfig(conv_channels=(4, 4, 8, 8), hidden_dim=32, image_feature_dim=16, text_feature_dim=8,
                     text_embed_dim=8, critic_hidden_dim=8)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("policy")
    save_policy(VlaPolicy(SMALL), path)
    return path


def test_family_name():
    assert family_name("VlaMbpo/Lift-v0") == "lift" and family_name("VlaMbpo/MultiTask-v0") == "multitask"


def test_evaluation_counts_steps_and_is_reproducible(policy_dir):
    config = EvalConfig(env_ids=("VlaMbpo/Lift-v0", "VlaMbpo/Push-v0"), episodes=2, seed=7, num_workers=1,
                        envs_per_worker=2, max_steps=16)
    first = evaluate_policy(policy_dir, config)
    assert [(o.env_id, o.seed, o.env_steps) for o in first.episodes] == [
        ("VlaMbpo/Lift-v0", 7, 16), ("VlaMbpo/Lift-v0", 8, 16), ("VlaMbpo/Push-v0", 7, 16), ("VlaMbpo/Push-v0", 8, 16)]
    assert first.success_rate == {"lift": 0.0, "push": 0.0} and first.mean_success == 0.0
    again = evaluate_policy(policy_dir, config)
    assert [o.success for o in again.episodes] == [o.success for o in first.episodes]


def test_evaluation_during_training_snapshots_the_policy(tmp_path):
    torch.manual_seed(0)
    config = EvalConfig(env_ids=("VlaMbpo/Lift-v0",), episodes=1, seed=7, num_workers=1, max_steps=8)
    metrics = evaluate_in_training(VlaPolicy(SMALL), tmp_path, config, stage="mbpo", iteration=3)
    assert metrics == {"real/success_mean": 0.0, "real/success_lift": 0.0}
    assert (tmp_path / "eval_snapshot").is_dir()
    sampled = EvalConfig(env_ids=("VlaMbpo/Lift-v0",), episodes=1, seed=7, num_workers=1, max_steps=8, greedy=False,
                         temperature=0.5)
    metrics = evaluate_in_training(VlaPolicy(SMALL), tmp_path, sampled, stage="mbpo", iteration=3)
    assert metrics == {"real/success_mean": 0.0, "real/success_lift": 0.0, "real/eval_temperature": 0.5}


def test_training_loops_evaluate_at_the_mode_unless_given_a_temperature():
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser, eval_every=5, eval_episodes=100)
    mode = eval_config_from_args(parser.parse_args([]))
    assert (mode.greedy, mode.temperature, mode.episodes) == (True, 1.0, 100)
    sampled = eval_config_from_args(parser.parse_args(["--eval-temperature", "0.5"]))
    assert (sampled.greedy, sampled.temperature) == (False, 0.5)
    assert eval_config_from_args(parser.parse_args(["--eval-episodes", "0"])) is None
    with pytest.raises(ConfigError, match="temperature must be finite and > 0, got -1.0"):
        eval_config_from_args(parser.parse_args(["--eval-temperature", "-1"]))


def test_recorded_episodes_become_a_replay_buffer(policy_dir, tmp_path):
    config = EvalConfig(env_ids=("VlaMbpo/MultiTask-v0",), episodes=2, seed=3, num_workers=1, max_steps=12,
                        greedy=False)
    result = evaluate_policy(policy_dir, config, record=True)
    episode = result.episodes[0].episode
    assert episode.num_steps == 12 and episode.head.shape == (13, 64, 64, 3) and episode.seed == 3
    counts = record_to(result, tmp_path / "buffer", chunk_size=8)
    assert counts["episodes"] == 2 and counts["steps"] == 24 and counts["successes"] == 0
    assert EpisodeDataset(tmp_path / "buffer").load(1).num_steps == 12


def test_format_table_exact():
    result = EvalResult({"lift": 0.5, "push": 0.25}, 0.375, (EpisodeOutcome("VlaMbpo/Lift-v0", 0, True, 10),), 1.0)
    assert format_table({"sft": result}) == ("| method | lift | push | mean |\n|---|---|---|---|\n"
                                             "| sft | 50.0 | 25.0 | 37.5 |")


def test_eval_config_validation():
    with pytest.raises(ConfigError, match="invalid EvalConfig: episodes must be >= 1, got 0"):
        EvalConfig(episodes=0)
    with pytest.raises(ConfigError, match="invalid EvalConfig: temperature must be finite and > 0, got 0.0"):
        EvalConfig(temperature=0.0)
    with pytest.raises(ConfigError, match="invalid EvalConfig: sample_seed must be >= 0, got -1"):
        EvalConfig(sample_seed=-1)


def test_sampling_temperature_reaches_the_policy(policy_dir):
    """A near-zero temperature samples the mode; temperature 1 does not: the option is what the actions use."""
    def recorded_actions(greedy: bool, temperature: float) -> np.ndarray:
        config = EvalConfig(env_ids=("VlaMbpo/Lift-v0",), episodes=1, seed=5, num_workers=1, max_steps=16,
                            greedy=greedy, temperature=temperature)
        return evaluate_policy(policy_dir, config, record=True).episodes[0].episode.actions

    mode = recorded_actions(greedy=True, temperature=1.0)
    assert np.array_equal(recorded_actions(greedy=False, temperature=1e-4), mode)
    assert not np.array_equal(recorded_actions(greedy=False, temperature=1.0), mode)


def test_sampled_actions_do_not_depend_on_how_episodes_are_split(policy_dir):
    """One sample stream per episode: groups of 1 or 3 envs, in one process or two, record the same actions;
    another sample seed draws other actions over the same scenes."""
    def recorded(**overrides) -> list[np.ndarray]:
        settings = dict(env_ids=("VlaMbpo/Lift-v0", "VlaMbpo/Push-v0"), episodes=3, seed=5, num_workers=1,
                        envs_per_worker=3, max_steps=16, greedy=False)
        result = evaluate_policy(policy_dir, EvalConfig(**{**settings, **overrides}), record=True)
        return [o.episode.actions for o in result.episodes]

    together = recorded()
    for split in (recorded(envs_per_worker=1), recorded(num_workers=2, envs_per_worker=2)):
        assert all(np.array_equal(a, b) for a, b in zip(split, together, strict=True))
    # lift and push share env seeds but not streams, and episodes do not share one
    assert not np.array_equal(together[0], together[3]) and not np.array_equal(together[0], together[1])
    assert not any(np.array_equal(a, b) for a, b in zip(recorded(sample_seed=1), together, strict=True))


def test_episode_streams_are_fixed_by_sample_seed_env_and_env_seed():
    first = episode_generator(0, "VlaMbpo/Lift-v0", 5).initial_seed()
    assert first == episode_generator(0, "VlaMbpo/Lift-v0", 5).initial_seed()
    assert len({first, episode_generator(1, "VlaMbpo/Lift-v0", 5).initial_seed(),
                episode_generator(0, "VlaMbpo/Push-v0", 5).initial_seed(),
                episode_generator(0, "VlaMbpo/Lift-v0", 6).initial_seed()}) == 4


def test_evaluation_json_states_its_rule_and_machine(policy_dir):
    sampled = EvalConfig(env_ids=("VlaMbpo/Lift-v0",), episodes=1, seed=5, num_workers=1, max_steps=8, greedy=False,
                         temperature=0.5, sample_seed=3)
    out = evaluate_policy(policy_dir, sampled).to_json()
    assert (out["action_rule"], out["seed"], out["episodes_per_family"], out["sample_seed"]) == \
        ("sampled T=0.5", 5, 1, 3)
    mode = evaluate_policy(policy_dir, EvalConfig(env_ids=("VlaMbpo/Lift-v0",), episodes=1, seed=5, num_workers=1,
                                                  max_steps=8, sample_seed=3)).to_json()
    assert (mode["action_rule"], mode["sample_seed"]) == ("mode", None)
    assert out["machine"] == mode["machine"] == machine_fingerprint()


def test_worker_processes_give_the_same_outcomes_as_in_process(policy_dir):
    config = EvalConfig(env_ids=("VlaMbpo/Place-v0",), episodes=2, seed=11, num_workers=1, max_steps=8)
    in_process = evaluate_policy(policy_dir, config)
    spawned = evaluate_policy(policy_dir, EvalConfig(env_ids=("VlaMbpo/Place-v0",), episodes=2, seed=11,
                                                     num_workers=2, max_steps=8))
    assert [(o.seed, o.success, o.env_steps) for o in spawned.episodes] == [
        (o.seed, o.success, o.env_steps) for o in in_process.episodes] == [(11, False, 8), (12, False, 8)]


def test_recorder_films_on_for_exactly_the_post_success_steps():
    from trainer.envs import make_env
    from trainer.envs.expert import ScriptedExpert
    from trainer.evaluate import EpisodeRecorder

    # Lift seed 4 with the full-skill expert first succeeds on step 18.
    env = make_env("lift", image_size=16, max_steps=96 + 13, terminate_on_success=False)
    try:
        obs, _ = env.reset(seed=4)
        recorder = EpisodeRecorder(obs, env.instruction, "lift", 4, max_steps=96, post_success_steps=13)
        expert = ScriptedExpert(env, 1.0, seed=0)
        while recorder.success_step is None:
            obs, info = recorder.step_chunk(env, expert.act(obs)[None])
        assert (recorder.success_step, recorder.done) == (18, False)
        recorder.step_chunk(env, np.zeros((8, 4), np.float32))
        assert len(recorder.actions) == 26 and not recorder.done
        recorder.step_chunk(env, np.zeros((8, 4), np.float32))  # stops after 5 of these 8 actions
        assert len(recorder.actions) == 31 and recorder.done and recorder.outcome_steps == 18
    finally:
        env.close()
    episode = recorder.finish()
    assert episode.num_steps == 31 and episode.success.tolist() == [False] * 18 + [True] * 14


def test_recorder_without_success_stops_at_max_steps():
    from trainer.envs import make_env
    from trainer.evaluate import EpisodeRecorder

    env = make_env("place", image_size=16, max_steps=10 + 16, terminate_on_success=False)
    try:
        obs, _ = env.reset(seed=0)
        recorder = EpisodeRecorder(obs, env.instruction, "place", 0, max_steps=10, post_success_steps=16)
        recorder.step_chunk(env, np.zeros((8, 4), np.float32))
        recorder.step_chunk(env, np.zeros((8, 4), np.float32))
    finally:
        env.close()
    assert len(recorder.actions) == 10 and recorder.done and recorder.outcome_steps == 10
    assert recorder.success_step is None


def test_recording_with_post_success_steps_keeps_the_evaluation(policy_dir):
    # The untrained policy never succeeds: the recording (and every outcome) is the same with or without them.
    config = EvalConfig(env_ids=("VlaMbpo/Lift-v0",), episodes=2, seed=5, num_workers=1, max_steps=12)
    plain = evaluate_policy(policy_dir, config, record=True)
    filmed = evaluate_policy(policy_dir, config, record=True, post_success_steps=16)
    assert [(o.success, o.env_steps, o.episode.num_steps) for o in filmed.episodes] == \
        [(o.success, o.env_steps, o.episode.num_steps) for o in plain.episodes] == [(False, 12, 12)] * 2


def test_cli_rejects_a_temperature_without_sampling(policy_dir, capsys):
    from trainer.evaluate import main

    assert main(["--policy", str(policy_dir), "--temperature", "0.5"]) == 2
    assert "--temperature needs --sample" in capsys.readouterr().err
    assert main(["--policy", str(policy_dir), "--sample-seed", "2"]) == 2
    assert "--sample-seed needs --sample" in capsys.readouterr().err
    assert main(["--policy", str(policy_dir), "--sample", "--sample-seed", "-1"]) == 2
    assert "sample_seed must be >= 0, got -1" in capsys.readouterr().err
