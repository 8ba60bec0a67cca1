"""Recorded episodes on disk: one compressed .npz per episode plus a JSON manifest with counts.

Format "vla-mbpo-episodes/1" (a directory):

    manifest.json         {"format", "views", "image_height", "image_width", "action_dim", "action_low",
                           "action_high", "chunk_size", "episodes": [{"file", "task", "instruction", "seed",
                           "num_steps", "success"}, ...], "counts": {"episodes", "steps", "successes",
                           "per_task": {task: {"episodes", "steps", "successes"}}}}
    episode_000000.npz    numpy .npz (np.savez_compressed): head uint8[T+1, H, W, 3], wrist uint8[T+1, H, W, 3],
                          actions float32[T, 4], success bool[T+1] (latched; success[0] is at reset),
                          instruction, task (0-d str arrays), seed (0-d int64)

Frame t is the observation before action t; frame T is the last observation. `done` is implicit: an
episode ends after its T-th action, successful if success[T] and truncated at the env's max_steps
otherwise. A successful episode either stops at its first successful frame (the env's own termination)
or, recorded with `collect --post-success-steps N`, goes on for N more steps with success latched.
Every file is written to a temporary name and then renamed (atomic on POSIX), episode first, manifest
after, so a recording that is interrupted leaves every finished episode readable.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "vla-mbpo-episodes/1"
MANIFEST_NAME = "manifest.json"
VIEWS: tuple[str, ...] = ("head", "wrist")
DEFAULT_CACHE_EPISODES = 16
EPISODE_ARRAYS = ("head", "wrist", "actions", "success", "instruction", "task", "seed")


class DataError(ValueError):
    """A malformed episode, manifest or episode file; the message names the file and the problem."""


@dataclass(frozen=True)
class Episode:
    """One recorded episode. Frames and success have one entry more than actions."""

    head: np.ndarray  # uint8[T+1, H, W, 3]
    wrist: np.ndarray  # uint8[T+1, H, W, 3]
    actions: np.ndarray  # float32[T, A]
    success: np.ndarray  # bool[T+1], latched
    instruction: str
    task: str
    seed: int

    def __post_init__(self) -> None:
        num_steps = self.actions.shape[0] if self.actions.ndim == 2 else -1
        problems = []
        if self.actions.ndim != 2 or self.actions.dtype != np.float32:
            problems.append(f"actions must be float32[T, A], got {self.actions.dtype}{list(self.actions.shape)}")
        for view in VIEWS:
            frames = getattr(self, view)
            if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3 or frames.shape[0] != num_steps + 1:
                problems.append(f"{view} must be uint8[T+1={num_steps + 1}, H, W, 3], got "
                                f"{frames.dtype}{list(frames.shape)}")
        if self.head.shape[1:] != self.wrist.shape[1:]:
            problems.append(f"head and wrist frames differ in size: {self.head.shape[1:]} vs {self.wrist.shape[1:]}")
        if self.success.dtype != np.bool_ or self.success.shape != (num_steps + 1,):
            problems.append(f"success must be bool[T+1={num_steps + 1}], got {self.success.dtype}"
                            f"{list(self.success.shape)}")
        elif np.any(self.success[:-1] & ~self.success[1:]):
            problems.append("success must be latched (never true then false)")
        if problems:
            raise DataError("invalid episode: " + "; ".join(problems))

    @property
    def num_steps(self) -> int:
        """T: the number of actions (the episode has T+1 observations)."""
        return int(self.actions.shape[0])

    @property
    def succeeded(self) -> bool:
        return bool(self.success[-1])

    def observation(self, t: int) -> dict[str, np.ndarray]:
        """The observation before action t (t in [0, num_steps]): {view: uint8[H, W, 3]}."""
        if not 0 <= t <= self.num_steps:
            raise IndexError(f"time step {t} outside [0, {self.num_steps}]")
        return {view: getattr(self, view)[t] for view in VIEWS}


@dataclass(frozen=True)
class DatasetMeta:
    """What every episode in one directory shares; written into the manifest."""

    image_height: int = 64
    image_width: int = 64
    action_dim: int = 4
    action_low: tuple[float, ...] = (-1.0, -1.0, -1.0, -1.0)
    action_high: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    chunk_size: int = 8

    def __post_init__(self) -> None:
        if min(self.image_height, self.image_width, self.action_dim, self.chunk_size) < 1:
            raise DataError(f"image size, action_dim and chunk_size must be >= 1: {self}")
        if len(self.action_low) != self.action_dim or len(self.action_high) != self.action_dim:
            raise DataError(f"action_low/high need action_dim={self.action_dim} entries: {self}")


def _atomic_write(path: Path, write) -> None:
    """Write via `write(tmp_path)` then rename over `path`, so readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def episode_file_name(index: int) -> str:
    return f"episode_{index:06d}.npz"


class EpisodeWriter:
    """Appends episodes to a directory (new, or one this writer format already started) and keeps the
    manifest current after every episode."""

    def __init__(self, out_dir: str | os.PathLike, meta: DatasetMeta | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.meta = meta or DatasetMeta()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._entries: list[dict] = []
        manifest_path = self.out_dir / MANIFEST_NAME
        if manifest_path.exists():  # resume: keep what is there if it was written with the same meta
            manifest = read_manifest(self.out_dir)
            existing = _meta_from_manifest(manifest, manifest_path)
            if existing != self.meta:
                raise DataError(f"{manifest_path}: existing data has {existing}, not {self.meta}")
            self._entries = list(manifest["episodes"])

    @property
    def num_episodes(self) -> int:
        return len(self._entries)

    def add(self, episode: Episode) -> str:
        """Write one episode and the updated manifest; returns the episode's file name."""
        h, w = episode.head.shape[1:3]
        expected_size = (self.meta.image_height, self.meta.image_width)
        if (h, w) != expected_size or episode.actions.shape[1] != self.meta.action_dim:
            raise DataError(f"episode has images {h}x{w} and action_dim {episode.actions.shape[1]}; this dataset "
                            f"expects {self.meta.image_height}x{self.meta.image_width} and {self.meta.action_dim}")
        name = episode_file_name(len(self._entries))

        def write_npz(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object keeps numpy from appending ".npz" to the temp name
                np.savez_compressed(f, head=episode.head, wrist=episode.wrist, actions=episode.actions,
                                    success=episode.success, instruction=np.array(episode.instruction),
                                    task=np.array(episode.task), seed=np.array(episode.seed, dtype=np.int64))

        _atomic_write(self.out_dir / name, write_npz)
        self._entries.append({"file": name, "task": episode.task, "instruction": episode.instruction,
                              "seed": int(episode.seed), "num_steps": episode.num_steps,
                              "success": episode.succeeded})
        self._write_manifest()
        return name

    def _write_manifest(self) -> None:
        manifest = {
            "format": FORMAT,
            "views": list(VIEWS),
            "image_height": self.meta.image_height,
            "image_width": self.meta.image_width,
            "action_dim": self.meta.action_dim,
            "action_low": list(self.meta.action_low),
            "action_high": list(self.meta.action_high),
            "chunk_size": self.meta.chunk_size,
            "episodes": self._entries,
            "counts": count_episodes(self._entries),
        }
        _atomic_write(self.out_dir / MANIFEST_NAME, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))


def count_episodes(entries: list[dict]) -> dict:
    """Episode, step and success counts, in total and per task."""
    per_task: dict[str, dict[str, int]] = {}
    for e in entries:
        c = per_task.setdefault(e["task"], {"episodes": 0, "steps": 0, "successes": 0})
        c["episodes"] += 1
        c["steps"] += e["num_steps"]
        c["successes"] += int(e["success"])
    return {"episodes": len(entries), "steps": sum(e["num_steps"] for e in entries),
            "successes": sum(int(e["success"]) for e in entries), "per_task": dict(sorted(per_task.items()))}


def read_manifest(data_dir: str | os.PathLike) -> dict:
    """The parsed, checked manifest of a dataset directory."""
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{path}: manifest not found (is {data_dir} a recorded dataset?)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: manifest is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{path}: unsupported format {found!r}, expected {FORMAT!r}")
    required = ("views", "image_height", "image_width", "action_dim", "action_low", "action_high",
                "chunk_size", "episodes")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise DataError(f"{path}: manifest lacks {missing}")
    for i, entry in enumerate(manifest["episodes"]):
        lacking = [k for k in ("file", "task", "instruction", "seed", "num_steps", "success") if k not in entry]
        if lacking:
            raise DataError(f"{path}: episode entry {i} lacks {lacking}")
    return manifest


def _meta_from_manifest(manifest: dict, path: Path) -> DatasetMeta:
    try:
        return DatasetMeta(int(manifest["image_height"]), int(manifest["image_width"]), int(manifest["action_dim"]),
                           tuple(float(x) for x in manifest["action_low"]),
                           tuple(float(x) for x in manifest["action_high"]), int(manifest["chunk_size"]))
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: bad dataset fields: {e}") from e


def load_episode(path: str | os.PathLike) -> Episode:
    """Read one episode file; a missing, truncated or malformed file raises DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: episode file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in EPISODE_ARRAYS if k not in z.files]
            if missing:
                raise DataError(f"{path}: episode file lacks arrays {missing}")
            arrays = {k: z[k] for k in EPISODE_ARRAYS}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path}: corrupt episode file: {e}") from e
    try:
        return Episode(head=arrays["head"], wrist=arrays["wrist"], actions=arrays["actions"],
                       success=arrays["success"], instruction=str(arrays["instruction"]), task=str(arrays["task"]),
                       seed=int(arrays["seed"]))
    except DataError as e:
        raise DataError(f"{path}: {e}") from e


class EpisodeDataset:
    """Read access to a recorded directory: metadata from the manifest, episodes loaded lazily with a small
    LRU cache, and uniform sampling of (episode, time step) start states."""

    def __init__(self, data_dir: str | os.PathLike, cache_episodes: int = DEFAULT_CACHE_EPISODES) -> None:
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(self.data_dir)
        self.meta = _meta_from_manifest(self.manifest, self.data_dir / MANIFEST_NAME)
        self.episodes: list[dict] = self.manifest["episodes"]
        self._cache: OrderedDict[int, Episode] = OrderedDict()
        self._cache_size = max(1, cache_episodes)
        # Start states are (episode, t) with t in [0, num_steps]: num_steps + 1 per episode.
        self._num_states = np.array([e["num_steps"] + 1 for e in self.episodes], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.episodes)

    @property
    def num_start_states(self) -> int:
        return int(self._num_states.sum())

    def load(self, i: int) -> Episode:
        """Episode i, checked against its manifest entry."""
        if not 0 <= i < len(self.episodes):
            raise IndexError(f"episode {i} outside [0, {len(self.episodes)})")
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        entry = self.episodes[i]
        path = self.data_dir / entry["file"]
        episode = load_episode(path)
        if episode.num_steps != entry["num_steps"] or episode.head.shape[1:3] != (self.meta.image_height,
                                                                                  self.meta.image_width):
            raise DataError(f"{path}: has {episode.num_steps} steps of {episode.head.shape[1:3]} images; the "
                            f"manifest says {entry['num_steps']} of {(self.meta.image_height, self.meta.image_width)}")
        self._cache[i] = episode
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return episode

    def observation(self, i: int, t: int) -> dict[str, np.ndarray]:
        """The observation of episode i before action t: {view: uint8[H, W, 3]}."""
        return self.load(i).observation(t)

    def sample_start_states(self, n: int, rng: np.random.Generator,
                            states_per_episode: np.ndarray | None = None) -> list[tuple[int, int]]:
        """n (episode, t) pairs drawn uniformly, with replacement, over every recorded observation, or over the
        first states_per_episode[e] observations of each episode e when given (int[num_episodes])."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        counts = self._num_states if states_per_episode is None else np.asarray(states_per_episode, dtype=np.int64)
        if counts.shape != self._num_states.shape or np.any(counts < 0) or np.any(counts > self._num_states):
            raise ValueError(f"states_per_episode must hold one count in [0, num_steps + 1] per episode, got "
                             f"{counts.tolist()[:8]} for {self._num_states.tolist()[:8]}")
        offsets = np.concatenate([[0], np.cumsum(counts)])
        if offsets[-1] == 0:
            raise DataError(f"{self.data_dir}: no episodes to sample start states from")
        flat = rng.integers(0, offsets[-1], size=n)
        episode_ids = np.searchsorted(offsets, flat, side="right") - 1
        return [(int(e), int(f - offsets[e])) for e, f in zip(episode_ids, flat, strict=True)]


class EpisodeRecorder:
    """Steps a chunk one action at a time and keeps every frame, for the replay buffer.

    The recording ends `post_success_steps` steps after the first success (the env must then run on after
    success: terminate_on_success=False), or after `max_steps` steps without success.
    """

    def __init__(self, obs: dict[str, np.ndarray], instruction: str, task: str, seed: int, max_steps: int,
                 post_success_steps: int = 0, success_at_reset: bool = False) -> None:
        if post_success_steps < 0:
            raise ValueError(f"post_success_steps must be >= 0, got {post_success_steps}")
        self.frames = {view: [obs[view]] for view in VIEWS}
        self.actions: list[np.ndarray] = []
        self.success = [success_at_reset]
        self.instruction, self.task, self.seed = instruction, task, seed
        self.max_steps, self.post_success_steps = max_steps, post_success_steps
        self.success_step: int | None = 0 if success_at_reset else None  # actions taken when success first latched
        self._env_over = False

    @property
    def done(self) -> bool:
        if self._env_over:
            return True
        if self.success_step is not None:
            return len(self.actions) - self.success_step >= self.post_success_steps
        return len(self.actions) >= self.max_steps

    @property
    def outcome_steps(self) -> int:
        """Steps until the episode's outcome was decided (post-success steps excluded)."""
        return len(self.actions) if self.success_step is None else self.success_step

    def step_chunk(self, env, actions: np.ndarray) -> tuple[dict, dict]:
        """Steps the rows of `actions` [k, 4] until the chunk or the recording ends; returns (obs, info)."""
        obs, info = None, {}
        for action in actions:
            if self.done:
                break
            obs, _, terminated, truncated, info = env.step(action)
            for view in VIEWS:
                self.frames[view].append(obs[view])
            self.actions.append(np.asarray(action, dtype=np.float32))
            self.success.append(bool(info["success"]))
            if self.success_step is None and info["success"]:
                self.success_step = len(self.actions)
            self._env_over = terminated or truncated
        return obs, info

    def finish(self) -> Episode:
        return Episode(head=np.stack(self.frames["head"]), wrist=np.stack(self.frames["wrist"]),
                       actions=np.stack(self.actions), success=np.asarray(self.success, dtype=bool),
                       instruction=self.instruction, task=self.task, seed=self.seed)
