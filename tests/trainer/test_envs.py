"""The MuJoCo tabletop env: API contract, determinism, chunked stepping, success, and bad-input errors."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from trainer.envs import (
    ENV_IDS,
    TASK_FAMILIES,
    ActionError,
    EnvConfigError,
    EpisodeOverError,
    TaskError,
    all_instructions,
    make_env,
    scene,
    tasks,
)
from trainer.envs.expert import ExpertError, ScriptedExpert


@pytest.fixture(scope="module")
def lift_env():
    env = make_env("lift")
    yield env
    env.close()


def run_expert(env, seed: int, skill: float = 1.0, max_steps: int = 200):
    """(frames per step, actions, final info) of one expert episode."""
    obs, info = env.reset(seed=seed)
    expert = ScriptedExpert(env, skill, seed=seed)
    frames, actions = [obs], []
    for _ in range(max_steps):
        action = expert.act(obs)
        obs, _, terminated, truncated, info = env.step(action)
        frames.append(obs)
        actions.append(action)
        if terminated or truncated:
            break
    return frames, np.array(actions), info


def test_registered_ids_make_envs_with_the_contract_spaces():
    assert ENV_IDS == {"lift": "VlaMbpo/Lift-v0", "push": "VlaMbpo/Push-v0", "place": "VlaMbpo/Place-v0",
                       "multi": "VlaMbpo/MultiTask-v0"}
    env = gym.make("VlaMbpo/Push-v0", image_size=32)
    try:
        assert env.action_space == gym.spaces.Box(-1.0, 1.0, shape=(4,), dtype=np.float32)
        assert list(env.observation_space.spaces) == ["head", "wrist"]
        obs, info = env.reset(seed=3)
        assert sorted(obs) == ["head", "wrist"]
        for view in ("head", "wrist"):
            assert obs[view].shape == (32, 32, 3) and obs[view].dtype == np.uint8
        assert info["task"] == "push" and info["success"] is False
        assert info["instruction"] == env.unwrapped.instruction
        assert info["instruction"].startswith("push the ") and info["instruction"].endswith(" target")
        obs, reward, terminated, truncated, info = env.step(np.zeros(4, dtype=np.float32))
        assert (reward, terminated, truncated, info["success"]) == (0.0, False, False, False)
    finally:
        env.close()


def test_task_families_and_instructions():
    assert TASK_FAMILIES == ("lift", "push", "place")
    instructions = all_instructions()
    # 4 colours x 2 shapes: 8 lift + 8 place + 24 push (3 pad colours)
    assert len(instructions) == 40 == len(set(instructions))
    assert "put the red cube in the bin" in instructions
    assert "lift the yellow cylinder" in instructions
    assert "push the blue cube onto the orange target" in instructions
    assert all_instructions("lift") == sorted(f"lift the {c} {s}" for c in ("red", "green", "blue", "yellow")
                                              for s in ("cube", "cylinder"))
    with pytest.raises(TaskError, match="unknown task 'stack'"):
        all_instructions("stack")


def test_instruction_names_the_object_that_success_is_about(lift_env):
    for seed in range(5):
        lift_env.reset(seed=seed)
        state = lift_env.sim_state()
        index = state.goal.object_index
        colour = scene.OBJECT_COLOURS[state.layout.object_colours[index]].name
        assert lift_env.instruction == f"lift the {colour} {scene.OBJECT_SHAPES[index]}"
        # colours within a scene are distinct, so the instruction picks out exactly one object
        assert len(set(state.layout.object_colours)) == scene.NUM_OBJECTS


def test_multitask_env_draws_every_family():
    env = make_env("multi", image_size=16)
    try:
        families = {env.reset(seed=seed)[1]["task"] for seed in range(30)}
    finally:
        env.close()
    assert families == {"lift", "push", "place"}


def test_same_seed_gives_identical_frames_and_actions(lift_env):
    frames_a, actions_a, info_a = run_expert(lift_env, seed=11, skill=0.5, max_steps=25)
    frames_b, actions_b, info_b = run_expert(lift_env, seed=11, skill=0.5, max_steps=25)
    assert len(frames_a) == len(frames_b) == 26
    np.testing.assert_array_equal(actions_a, actions_b)
    for a, b in zip(frames_a, frames_b, strict=True):
        np.testing.assert_array_equal(a["head"], b["head"])
        np.testing.assert_array_equal(a["wrist"], b["wrist"])
    assert info_a == info_b


def test_different_seeds_give_different_layouts(lift_env):
    layouts, heads = [], []
    for seed in range(6):
        obs, _ = lift_env.reset(seed=seed)
        layouts.append(lift_env.sim_state().object_pos.copy())
        heads.append(obs["head"])
    for i in range(6):
        for j in range(i + 1, 6):
            assert np.abs(layouts[i] - layouts[j]).max() > 0.01, (i, j)
            assert not np.array_equal(heads[i], heads[j]), (i, j)


def test_layout_keeps_items_apart_and_on_the_table():
    rng = np.random.default_rng(0)
    for _ in range(50):
        layout = tasks.sample_layout(rng)
        assert np.all(np.abs(layout.object_xy) < scene.TABLE_HALF_EXTENT - scene.OBJECT_HALF_SIZE)
        for i in range(scene.NUM_OBJECTS):
            for j in range(i + 1, scene.NUM_OBJECTS):
                assert np.linalg.norm(layout.object_xy[i] - layout.object_xy[j]) >= 2 * tasks.OBJECT_CLEARANCE
            # no object starts on a pad or in the bin, so no episode is solved at reset
            assert np.linalg.norm(layout.object_xy[i] - layout.bin_xy) >= tasks.BIN_CLEARANCE
            for pad in layout.pad_xy:
                assert np.linalg.norm(layout.object_xy[i] - pad) >= tasks.PAD_CLEARANCE


@pytest.mark.parametrize("family", ["lift", "push", "place"])
def test_full_skill_expert_succeeds_and_the_episode_terminates(family):
    env = make_env(family, image_size=16)
    try:
        for seed in range(4):
            frames, actions, info = run_expert(env, seed=seed)
            assert info["success"] is True, (family, seed)
            assert len(actions) < env.config.max_steps
            with pytest.raises(EpisodeOverError, match="the episode is over"):
                env.step(np.zeros(4))
    finally:
        env.close()


def test_success_reward_is_sparse_and_latched(lift_env):
    obs, _ = lift_env.reset(seed=2)
    expert = ScriptedExpert(lift_env, 1.0, seed=0)
    rewards, successes = [], []
    done = False
    while not done:
        obs, reward, terminated, truncated, info = lift_env.step(expert.act(obs))
        rewards.append(reward)
        successes.append(info["success"])
        done = terminated or truncated
    assert terminated and not truncated
    assert rewards == [0.0] * (len(rewards) - 1) + [1.0]
    assert successes == [False] * (len(successes) - 1) + [True]
    # the success condition is the simulator state: the object's bottom is LIFT_HEIGHT above the table
    state = lift_env.sim_state()
    assert state.object_pos[state.goal.object_index, 2] - scene.OBJECT_HALF_SIZE >= tasks.LIFT_HEIGHT


def test_episode_truncates_at_max_steps():
    env = make_env("place", image_size=16, max_steps=5)
    try:
        env.reset(seed=0)
        flags = [env.step(np.zeros(4))[2:4] for _ in range(5)]
    finally:
        env.close()
    assert flags == [(False, False)] * 4 + [(False, True)]


def test_gripper_command_closes_and_opens_the_fingers(lift_env):
    lift_env.reset(seed=0)
    assert lift_env.sim_state().finger_opening == pytest.approx(scene.FINGER_OPEN)
    for _ in range(10):  # the finger actuators' time constant is 0.1 s; 10 steps are 0.4 s
        lift_env.step(np.array([0.0, 0.0, 0.0, 1.0]))
    state = lift_env.sim_state()
    assert state.gripper_closed and state.finger_opening < 0.002
    for _ in range(10):
        lift_env.step(np.array([0.0, 0.0, 0.0, -1.0]))
    assert lift_env.sim_state().finger_opening > scene.FINGER_OPEN - 0.002


def test_hand_moves_by_the_scaled_delta(lift_env):
    lift_env.reset(seed=0)
    start = lift_env.data.mocap_pos[0].copy()
    lift_env.step(np.array([1.0, -0.5, 0.25, -1.0]))
    moved = lift_env.data.mocap_pos[0] - start
    np.testing.assert_allclose(moved, np.array([1.0, -0.5, 0.25]) * lift_env.config.max_step_size, atol=1e-12)
    lift_env.step(np.array([7.0, 0.0, 0.0, -1.0]))  # out of range: clipped to 1
    np.testing.assert_allclose(lift_env.data.mocap_pos[0, 0] - start[0], 2 * lift_env.config.max_step_size)


def test_step_chunk_matches_stepping_one_by_one():
    env_a, env_b = make_env("lift", image_size=24), make_env("lift", image_size=24)
    try:
        env_a.reset(seed=5)
        env_b.reset(seed=5)
        actions = np.random.default_rng(0).uniform(-1, 1, size=(8, 4)).astype(np.float32)
        for action in actions:
            obs_a, *_ = env_a.step(action)
        obs_b, reward, terminated, truncated, info = env_b.step_chunk(actions)
        assert info["num_steps_taken"] == 8 and (reward, terminated, truncated) == (0.0, False, False)
        np.testing.assert_array_equal(obs_a["head"], obs_b["head"])
        np.testing.assert_array_equal(obs_a["wrist"], obs_b["wrist"])
    finally:
        env_a.close()
        env_b.close()


def test_step_chunk_stops_when_the_episode_ends():
    env = make_env("lift", image_size=16, max_steps=10)
    try:
        env.reset(seed=0)
        _, _, terminated, truncated, info = env.step_chunk(np.zeros((8, 4)))
        assert (terminated, truncated, info["num_steps_taken"]) == (False, False, 8)
        _, _, terminated, truncated, info = env.step_chunk(np.zeros((8, 4)))
        assert (terminated, truncated, info["num_steps_taken"]) == (False, True, 2)
    finally:
        env.close()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"task": "stack"}, r"unknown task 'stack'; expected one of \['lift', 'push', 'place', 'multi'\]"),
    ({"image_size": 0}, r"bad image size: image_height must be an int in \[16, 512\], got 0"),
    ({"image_size": 1000}, r"bad image size: image_height must be an int in \[16, 512\], got 1000"),
    ({"image_size": (64, 8)}, r"bad image size: image_width must be an int in \[16, 512\], got 8"),
    ({"image_size": "64"}, r"bad image size: expected an int or \(height, width\), got '64'"),
    ({"max_steps": 0}, r"max_steps must be an int >= 1, got 0"),
    ({"render_mode": "human"}, r"unknown render_mode 'human'"),
])
def test_bad_config_names_the_problem(kwargs, message):
    with pytest.raises(EnvConfigError, match=message):
        make_env(**kwargs)


def test_unknown_task_through_gym_make_names_the_problem():
    with pytest.raises(EnvConfigError, match="unknown task 'fly'"):
        gym.make("VlaMbpo/Lift-v0", task="fly")


@pytest.mark.parametrize(("action", "message"), [
    (np.zeros(3), r"action must have shape \(4,\), got \(3,\)"),
    (np.zeros((1, 4)), r"action must have shape \(4,\), got \(1, 4\)"),
    (np.array([0.0, np.nan, 0.0, 0.0]), r"action contains NaN or inf: \[0.0, nan, 0.0, 0.0\]"),
    (np.array([np.inf, 0.0, 0.0, 0.0]), r"action contains NaN or inf: \[inf, 0.0, 0.0, 0.0\]"),
    (np.array(["a", "b", "c", "d"]), r"action must be real numbers, got dtype <U1"),
])
def test_bad_action_names_the_problem(lift_env, action, message):
    lift_env.reset(seed=0)
    with pytest.raises(ActionError, match=message):
        lift_env.step(action)
    assert isinstance(ActionError("x"), ValueError)


def test_bad_chunk_names_the_problem(lift_env):
    lift_env.reset(seed=0)
    with pytest.raises(ActionError, match=r"action must have shape \(k, 4\) with k >= 1, got \(8, 3\)"):
        lift_env.step_chunk(np.zeros((8, 3)))
    with pytest.raises(ActionError, match=r"action must have shape \(k, 4\) with k >= 1, got \(0, 4\)"):
        lift_env.step_chunk(np.zeros((0, 4)))
    chunk = np.zeros((8, 4))
    chunk[5, 3] = np.nan
    with pytest.raises(ActionError, match="action contains NaN or inf"):
        lift_env.step_chunk(chunk)


def test_step_before_reset_is_an_error():
    env = make_env("lift", image_size=16)
    try:
        with pytest.raises(EpisodeOverError, match="call reset"):
            env.step(np.zeros(4))
    finally:
        env.close()


def test_expert_rejects_bad_skill(lift_env):
    with pytest.raises(ExpertError, match="skill must be in \\[0, 1\\], got 1.5"):
        ScriptedExpert(lift_env, 1.5)


def test_render_mode_rgb_array_shows_both_views_side_by_side():
    env = make_env("lift", image_size=16, render_mode="rgb_array")
    try:
        obs, _ = env.reset(seed=0)
        frame = env.render()
    finally:
        env.close()
    np.testing.assert_array_equal(frame, np.concatenate([obs["head"], obs["wrist"]], axis=1))


def test_env_runs_on_after_success_when_asked():
    # Lift seed 2 with the full-skill expert first succeeds on step 20 (the default env terminates there).
    steps = 30
    env = make_env("lift", image_size=16, max_steps=steps, terminate_on_success=False)
    try:
        obs, _ = env.reset(seed=2)
        expert = ScriptedExpert(env, 1.0, seed=0)
        rewards, successes, terminated, truncated, sim_success = [], [], [], [], []
        for _ in range(steps):
            obs, reward, term, trunc, info = env.step(expert.act(obs))
            rewards.append(reward)
            successes.append(info["success"])
            terminated.append(term)
            truncated.append(trunc)
            sim_success.append(env.sim_state().success)
        with pytest.raises(EpisodeOverError, match="the episode is over"):
            env.step(np.zeros(4))
    finally:
        env.close()
    assert successes == [False] * 19 + [True] * 11  # latched from step 20 on
    assert sim_success == successes
    assert rewards == [0.0] * 19 + [1.0] + [0.0] * 10  # paid once, on the first successful step
    assert terminated == [False] * steps
    assert truncated == [False] * (steps - 1) + [True]


def test_running_on_changes_nothing_before_the_first_success():
    default = make_env("push", image_size=16)
    run_on = make_env("push", image_size=16, terminate_on_success=False)
    try:
        frames, actions, info = run_expert(default, seed=1)
        assert info["success"] is True
        obs, _ = run_on.reset(seed=1)
        expert = ScriptedExpert(run_on, 1.0, seed=1)
        for t, expected in enumerate(actions):
            action = expert.act(obs)
            np.testing.assert_array_equal(action, expected)
            obs, _, terminated, _, info = run_on.step(action)
            np.testing.assert_array_equal(obs["head"], frames[t + 1]["head"])
        assert info["success"] is True and terminated is False
    finally:
        default.close()
        run_on.close()


@pytest.mark.parametrize("family", ["lift", "push", "place"])
def test_expert_keeps_the_task_done_after_success(family):
    # The held pose keeps the simulator's own success condition true, not just the latched flag.
    env = make_env(family, image_size=16, max_steps=200, terminate_on_success=False)
    checked = 0
    try:
        for seed in range(6):
            obs, info = env.reset(seed=seed)
            expert = ScriptedExpert(env, 0.5, seed=seed)
            while not info["success"]:
                obs, _, _, truncated, info = env.step(expert.act(obs))
                if truncated:
                    break
            if not info["success"]:
                continue
            still_done = []
            for _ in range(16):
                obs, _, _, _, info = env.step(expert.act(obs))
                state = env.sim_state()
                still_done.append(tasks.is_success(state.goal, state.layout, state.object_pos))
            assert still_done == [True] * 16, (family, seed)
            checked += 1
    finally:
        env.close()
    assert checked == 3  # successful seeds among the six, each checked for 16 held steps


def test_terminate_on_success_must_be_a_bool():
    with pytest.raises(EnvConfigError, match="terminate_on_success must be a bool, got 'no'"):
        make_env("lift", terminate_on_success="no")


def test_a_restored_snapshot_continues_bit_for_bit_in_another_env():
    """The expert's episode, snapshotted mid-way, continues exactly in an env that was playing another scene."""
    source, other = make_env("push", image_size=16, max_steps=60), make_env("push", image_size=16, max_steps=60)
    try:
        frames, actions, _ = run_expert(source, seed=3, max_steps=12)
        source.reset(seed=3)
        source.step_chunk(actions[:6])
        snapshot = source.snapshot()
        tail = [source.step(a) for a in actions[6:12]]
        other.reset(seed=99)
        other.step_chunk(np.ones((5, 4), np.float32))
        other.restore(snapshot)
        assert other.instruction == source.instruction
        replayed = [other.step(a) for a in actions[6:12]]
        for (obs, reward, terminated, truncated, info), (obs2, *rest) in zip(tail, replayed, strict=True):
            assert np.array_equal(obs["head"], obs2["head"]) and np.array_equal(obs["wrist"], obs2["wrist"])
            assert [reward, terminated, truncated, info] == rest
        assert np.array_equal(replayed[-1][0]["wrist"], frames[12]["wrist"])
        other.restore(snapshot)  # the step counter comes back too: truncation at 60 steps, 54 steps later
        flags = [other.step(np.zeros(4))[3] for _ in range(54)]
        assert flags == [False] * 53 + [True]
    finally:
        source.close()
        other.close()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"task": "lift"}, "an env with task='push' cannot be restored into one with task='lift'"),
    ({"task": "push", "max_step_size": 0.03}, "max_step_size=0.02 cannot be restored into one with max_step_size=0.03"),
])
def test_a_snapshot_of_another_kind_of_env_is_refused(kwargs, message):
    source, target = make_env("push", image_size=16), make_env(image_size=16, **kwargs)
    try:
        source.reset(seed=0)
        with pytest.raises(EnvConfigError, match=message):
            target.restore(source.snapshot())
    finally:
        source.close()
        target.close()
