"""Episode files and manifest: round trip, counts, start-state sampling, corrupt-data errors, interruption."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trainer import data
from trainer.data import DataError, DatasetMeta, Episode, EpisodeDataset, EpisodeWriter

SIZE = 16


def make_episode(num_steps: int, task: str = "lift", succeed_at: int | None = None, seed: int = 0) -> Episode:
    """A synthetic episode whose pixel values encode (seed, t) so reads can be checked exactly."""
    frames = np.zeros((num_steps + 1, SIZE, SIZE, 3), dtype=np.uint8)
    for t in range(num_steps + 1):
        frames[t] = (seed * 10 + t) % 256
    success = np.zeros(num_steps + 1, dtype=bool)
    if succeed_at is not None:
        success[succeed_at:] = True
    actions = np.arange(num_steps * 4, dtype=np.float32).reshape(num_steps, 4) / 100.0
    return Episode(head=frames, wrist=255 - frames, actions=actions, success=success,
                   instruction=f"{task} the red cube", task=task, seed=seed)


def write_dataset(path, episodes) -> None:
    writer = EpisodeWriter(path, DatasetMeta(image_height=SIZE, image_width=SIZE))
    for episode in episodes:
        writer.add(episode)


def test_round_trip_and_manifest(tmp_path):
    episodes = [make_episode(3, "lift", 2, seed=0), make_episode(5, "place", None, seed=1),
                make_episode(1, "lift", 1, seed=2)]
    write_dataset(tmp_path, episodes)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["format"] == "vla-mbpo-episodes/1"
    assert manifest["views"] == ["head", "wrist"]
    assert (manifest["image_height"], manifest["image_width"], manifest["action_dim"], manifest["chunk_size"]) == \
        (SIZE, SIZE, 4, 8)
    assert manifest["action_low"] == [-1.0] * 4 and manifest["action_high"] == [1.0] * 4
    assert manifest["episodes"][1] == {"file": "episode_000001.npz", "task": "place",
                                       "instruction": "place the red cube", "seed": 1, "num_steps": 5,
                                       "success": False}
    assert manifest["counts"] == {"episodes": 3, "steps": 9, "successes": 2, "per_task": {
        "lift": {"episodes": 2, "steps": 4, "successes": 2}, "place": {"episodes": 1, "steps": 5, "successes": 0}}}

    dataset = EpisodeDataset(tmp_path)
    assert len(dataset) == 3 and dataset.num_start_states == 4 + 6 + 2
    for i, original in enumerate(episodes):
        loaded = dataset.load(i)
        for name in ("head", "wrist", "actions", "success"):
            np.testing.assert_array_equal(getattr(loaded, name), getattr(original, name))
            assert getattr(loaded, name).dtype == getattr(original, name).dtype
        assert (loaded.instruction, loaded.task, loaded.seed) == (original.instruction, original.task, original.seed)
    obs = dataset.observation(1, 4)
    assert sorted(obs) == ["head", "wrist"]
    assert np.all(obs["head"] == 14) and np.all(obs["wrist"] == 241)
    with pytest.raises(IndexError, match=r"time step 6 outside \[0, 5\]"):
        dataset.observation(1, 6)
    with pytest.raises(IndexError, match=r"episode 3 outside \[0, 3\)"):
        dataset.load(3)


def test_episode_file_holds_the_documented_arrays(tmp_path):
    write_dataset(tmp_path, [make_episode(2, seed=7)])
    with np.load(tmp_path / "episode_000000.npz") as z:
        assert sorted(z.files) == ["actions", "head", "instruction", "seed", "success", "task", "wrist"]
        assert z["head"].shape == (3, SIZE, SIZE, 3) and z["actions"].shape == (2, 4)
        assert z["instruction"].shape == () and str(z["instruction"]) == "lift the red cube"
        assert int(z["seed"]) == 7
    assert not list(tmp_path.glob(".*.tmp"))  # temp files are renamed away


def test_start_states_are_uniform_over_all_observations(tmp_path):
    write_dataset(tmp_path, [make_episode(1, seed=0), make_episode(3, seed=1)])  # 2 + 4 start states
    dataset = EpisodeDataset(tmp_path)
    samples = dataset.sample_start_states(60_000, np.random.default_rng(0))
    states, counts = np.unique(np.array(samples), axis=0, return_counts=True)
    assert [tuple(s) for s in states] == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (1, 3)]
    np.testing.assert_allclose(counts / 60_000, 1 / 6, atol=0.01)
    again = dataset.sample_start_states(5, np.random.default_rng(1))
    assert again == dataset.sample_start_states(5, np.random.default_rng(1))
    assert all(isinstance(e, int) and isinstance(t, int) for e, t in again)


def test_start_states_can_be_limited_to_a_prefix_of_each_episode(tmp_path):
    write_dataset(tmp_path, [make_episode(1, seed=0), make_episode(3, seed=1)])
    dataset = EpisodeDataset(tmp_path)
    samples = dataset.sample_start_states(20_000, np.random.default_rng(0), states_per_episode=np.array([0, 3]))
    states, counts = np.unique(np.array(samples), axis=0, return_counts=True)
    assert [tuple(s) for s in states] == [(1, 0), (1, 1), (1, 2)]
    np.testing.assert_allclose(counts / 20_000, 1 / 3, atol=0.015)
    with pytest.raises(ValueError, match=r"states_per_episode must hold one count in \[0, num_steps \+ 1\]"):
        dataset.sample_start_states(1, np.random.default_rng(0), states_per_episode=np.array([3, 3]))
    with pytest.raises(DataError, match="no episodes to sample start states from"):
        dataset.sample_start_states(1, np.random.default_rng(0), states_per_episode=np.array([0, 0]))


def test_load_cache_is_bounded(tmp_path):
    write_dataset(tmp_path, [make_episode(1, seed=s) for s in range(4)])
    dataset = EpisodeDataset(tmp_path, cache_episodes=2)
    first = dataset.load(0)
    assert dataset.load(0) is first
    dataset.load(1)
    dataset.load(2)  # evicts episode 0, the least recently used
    assert dataset.load(0) is not first


def test_missing_and_corrupt_manifest_name_the_file(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}/manifest.json: manifest not found"):
        EpisodeDataset(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=f"{tmp_path}/manifest.json: manifest is not valid JSON"):
        EpisodeDataset(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something/9"}))
    with pytest.raises(DataError, match="unsupported format 'something/9', expected 'vla-mbpo-episodes/1'"):
        EpisodeDataset(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": data.FORMAT, "views": ["head", "wrist"]}))
    with pytest.raises(DataError, match=r"manifest lacks \['image_height', 'image_width'"):
        EpisodeDataset(tmp_path)


def test_missing_and_corrupt_episode_files_name_the_file(tmp_path):
    write_dataset(tmp_path, [make_episode(2, seed=0), make_episode(2, seed=1), make_episode(2, seed=2)])
    (tmp_path / "episode_000000.npz").unlink()
    raw = (tmp_path / "episode_000001.npz").read_bytes()
    (tmp_path / "episode_000001.npz").write_bytes(raw[: len(raw) // 2])
    with np.load(tmp_path / "episode_000002.npz") as z:
        arrays = {k: z[k] for k in z.files if k != "actions"}
    np.savez_compressed(tmp_path / "episode_000002.npz", **arrays)
    dataset = EpisodeDataset(tmp_path)
    with pytest.raises(DataError, match="episode_000000.npz: episode file not found"):
        dataset.load(0)
    with pytest.raises(DataError, match="episode_000001.npz: corrupt episode file"):
        dataset.load(1)
    with pytest.raises(DataError, match=r"episode_000002.npz: episode file lacks arrays \['actions'\]"):
        dataset.load(2)


def test_episode_that_disagrees_with_the_manifest_is_an_error(tmp_path):
    write_dataset(tmp_path, [make_episode(2)])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["episodes"][0]["num_steps"] = 3
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"episode_000000.npz: has 2 steps .* the manifest says 3"):
        EpisodeDataset(tmp_path).load(0)


def test_invalid_episodes_are_rejected():
    good = make_episode(2)
    with pytest.raises(DataError, match=r"success must be bool\[T\+1=3\], got bool\[2\]"):
        Episode(good.head, good.wrist, good.actions, good.success[:2], "x", "lift", 0)
    with pytest.raises(DataError, match=r"wrist must be uint8\[T\+1=3, H, W, 3\], got uint8\[2, 16, 16, 3\]"):
        Episode(good.head, good.wrist[:2], good.actions, good.success, "x", "lift", 0)
    with pytest.raises(DataError, match=r"actions must be float32\[T, A\], got float64\[2, 4\]"):
        Episode(good.head, good.wrist, good.actions.astype(np.float64), good.success, "x", "lift", 0)
    with pytest.raises(DataError, match="success must be latched"):
        Episode(good.head, good.wrist, good.actions, np.array([False, True, False]), "x", "lift", 0)


def test_writer_rejects_episodes_that_do_not_fit_the_dataset(tmp_path):
    writer = EpisodeWriter(tmp_path, DatasetMeta(image_height=32, image_width=32))
    with pytest.raises(DataError, match="episode has images 16x16 and action_dim 4; this dataset expects 32x32"):
        writer.add(make_episode(2))


def test_appending_resumes_and_keeps_earlier_episodes(tmp_path):
    write_dataset(tmp_path, [make_episode(2, seed=0)])
    writer = EpisodeWriter(tmp_path, DatasetMeta(image_height=SIZE, image_width=SIZE))
    assert writer.num_episodes == 1
    assert writer.add(make_episode(3, seed=1)) == "episode_000001.npz"
    assert EpisodeDataset(tmp_path).manifest["counts"]["steps"] == 5
    with pytest.raises(DataError, match="existing data has"):
        EpisodeWriter(tmp_path, DatasetMeta(image_height=32, image_width=32))


def test_failure_while_writing_an_episode_leaves_finished_episodes_readable(tmp_path, monkeypatch):
    writer = EpisodeWriter(tmp_path, DatasetMeta(image_height=SIZE, image_width=SIZE))
    writer.add(make_episode(2, seed=0))
    writer.add(make_episode(4, seed=1))
    real_savez = np.savez_compressed

    def crash_halfway(file, **arrays):  # writes some bytes, then dies like a killed process would
        real_savez(file, head=arrays["head"])
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez_compressed", crash_halfway)
    with pytest.raises(KeyboardInterrupt):
        writer.add(make_episode(3, seed=2))
    monkeypatch.undo()
    assert not (tmp_path / "episode_000002.npz").exists()
    dataset = EpisodeDataset(tmp_path)
    assert len(dataset) == 2 and dataset.manifest["counts"]["steps"] == 6
    assert dataset.load(1).seed == 1 and dataset.load(0).num_steps == 2
