"""`vla-mbpo collect`: recording, reproducibility across worker counts, CLI errors, and interruption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from trainer import collect
from trainer.collect import CollectConfig, record_episode
from trainer.data import EpisodeDataset
from trainer.envs import make_env
from trainer.envs.expert import ScriptedExpert

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_record_episode_captures_every_frame_and_action():
    env = make_env("lift", image_size=16)
    try:
        episode = record_episode(env, ScriptedExpert(env, 1.0, seed=0), seed=4)
    finally:
        env.close()
    T = episode.num_steps
    assert 0 < T < 96
    assert episode.head.shape == episode.wrist.shape == (T + 1, 16, 16, 3)
    assert episode.actions.shape == (T, 4) and episode.actions.dtype == np.float32
    assert episode.success.tolist() == [False] * T + [True]  # terminates on the step that succeeds
    assert episode.task == "lift" and episode.seed == 4 and episode.instruction.startswith("lift the ")


def test_record_episode_films_on_for_exactly_the_post_success_steps():
    # Lift seed 4 with the full-skill expert succeeds on step 18 (see the test above).
    stop = make_env("lift", image_size=16)
    run_on = make_env("lift", image_size=16, max_steps=96 + 16, terminate_on_success=False)
    try:
        first = record_episode(stop, ScriptedExpert(stop, 1.0, seed=0), seed=4)
        longer = record_episode(run_on, ScriptedExpert(run_on, 1.0, seed=0), seed=4, max_steps=96,
                                post_success_steps=16)
    finally:
        stop.close()
        run_on.close()
    assert first.num_steps == 18 and longer.num_steps == 18 + 16
    assert longer.success.tolist() == [False] * 18 + [True] * 17
    np.testing.assert_array_equal(longer.actions[:18], first.actions)
    np.testing.assert_array_equal(longer.head[:19], first.head)
    np.testing.assert_array_equal(longer.wrist[:19], first.wrist)


def test_record_episode_without_success_stops_at_max_steps():
    env = make_env("place", image_size=16, max_steps=10 + 16, terminate_on_success=False)
    try:
        episode = record_episode(env, ScriptedExpert(env, 1.0, seed=0), seed=0, max_steps=10, post_success_steps=16)
    finally:
        env.close()
    assert episode.num_steps == 10 and episode.success.tolist() == [False] * 11


@pytest.mark.parametrize(("env_kwargs", "message"), [
    ({}, "post_success_steps > 0 needs an env built with terminate_on_success=False"),
    ({"terminate_on_success": False, "max_steps": 100},
     "the env truncates at max_steps=100, before max_steps=96 plus post_success_steps=16"),
])
def test_record_episode_rejects_an_env_that_cannot_film_on(env_kwargs, message):
    env = make_env("lift", image_size=16, **env_kwargs)
    try:
        with pytest.raises(ValueError, match=message):
            record_episode(env, ScriptedExpert(env, 1.0, seed=0), seed=0, max_steps=96, post_success_steps=16)
    finally:
        env.close()


def test_collect_post_success_steps_add_frames_to_successful_episodes_only(tmp_path):
    # Seeds 3 and 4 at skill 0.5: episode 3 (place) fails within 96 steps, episode 4 (place) succeeds on step 53.
    base = CollectConfig(task="multi", num_episodes=2, skill=0.5, seed=3, image_size=16, workers=1,
                         post_success_steps=0)
    collect.collect(base, tmp_path / "stop", progress=False)
    collect.collect(CollectConfig(**{**base.__dict__, "post_success_steps": 16}), tmp_path / "on", progress=False)
    stop, on = EpisodeDataset(tmp_path / "stop"), EpisodeDataset(tmp_path / "on")
    assert [(e["num_steps"], e["success"]) for e in stop.episodes] == [(96, False), (53, True)]
    assert [(e["num_steps"], e["success"]) for e in on.episodes] == [(96, False), (53 + 16, True)]
    np.testing.assert_array_equal(on.load(0).head, stop.load(0).head)
    assert on.load(1).success.tolist() == [False] * 53 + [True] * 17
    np.testing.assert_array_equal(on.load(1).head[:54], stop.load(1).head)


def test_collect_defaults_to_two_chunks_after_success():
    assert CollectConfig().post_success_steps == collect.DEFAULT_POST_SUCCESS_STEPS == 16
    assert collect.build_parser().parse_args(["--episodes", "1", "--out", "x"]).post_success_steps == 16


def test_collect_is_reproducible_whatever_the_number_of_workers(tmp_path):
    config = CollectConfig(task="multi", num_episodes=3, skill=0.5, seed=10, image_size=16, workers=1)
    one = collect.collect(config, tmp_path / "one", progress=False)
    two = collect.collect(CollectConfig(**{**config.__dict__, "workers": 2}), tmp_path / "two", progress=False)
    assert one == two and one["episodes"] == 3
    a, b = EpisodeDataset(tmp_path / "one"), EpisodeDataset(tmp_path / "two")
    assert [e["seed"] for e in a.episodes] == [10, 11, 12]
    for i in range(3):
        ea, eb = a.load(i), b.load(i)
        np.testing.assert_array_equal(ea.actions, eb.actions)
        np.testing.assert_array_equal(ea.head, eb.head)
        np.testing.assert_array_equal(ea.wrist, eb.wrist)
    # appending continues the seed sequence
    counts = collect.collect(CollectConfig(**{**config.__dict__, "num_episodes": 1}), tmp_path / "one", append=True,
                             progress=False)
    assert counts["episodes"] == 4
    assert EpisodeDataset(tmp_path / "one").episodes[3]["seed"] == 13


def test_cli_records_and_reports(tmp_path, capsys):
    out = tmp_path / "demos"
    rc = collect.main(["--task", "lift", "--episodes", "2", "--skill", "1.0", "--out", str(out), "--image-size", "16",
                       "--workers", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: 2 episodes" in printed and "2 successes (100.0%)" in printed
    assert json.loads((out / "manifest.json").read_text())["counts"]["per_task"]["lift"]["successes"] == 2
    rc = collect.main(["--episodes", "1", "--out", str(out)])
    assert rc == 2
    assert "already holds a recorded dataset; pass append=True (--append)" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["--image-size", "8"], "bad image size: image_height must be an int in [16, 512], got 8"),
    (["--skill", "2"], "skill must be in [0, 1], got 2.0"),
    (["--workers", "0"], "workers must be >= 1, got 0"),
    (["--episodes", "0"], "episodes must be >= 1, got 0"),
    (["--post-success-steps", "-1"], "post-success-steps must be >= 0, got -1"),
])
def test_cli_bad_arguments_name_the_problem(tmp_path, capsys, args, message):
    base = {"--episodes": "1", "--out": str(tmp_path / "x")}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    rc = collect.main([item for pair in base.items() for item in pair])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x" / "manifest.json").exists()


def test_cli_unknown_task_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        collect.main(["--task", "fly", "--episodes", "1", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "argument --task: invalid choice: 'fly'" in capsys.readouterr().err


def test_killed_recording_leaves_finished_episodes_readable(tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "MUJOCO_GL": "egl"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vla_mbpo.cli", "collect", "--task", "place", "--episodes", "200", "--workers", "1",
         "--image-size", "16", "--out", str(out)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            manifest = out / "manifest.json"
            if manifest.exists() and json.loads(manifest.read_text())["counts"]["episodes"] >= 3:
                break
            time.sleep(0.05)
        else:
            pytest.fail("collect wrote no 3 episodes within 60 s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its worker: the session this test started
        proc.wait()
    dataset = EpisodeDataset(out)
    assert 3 <= len(dataset) < 200
    assert dataset.manifest["counts"]["episodes"] == len(dataset)
    for i in range(len(dataset)):
        episode = dataset.load(i)
        assert episode.seed == i and episode.task == "place"
