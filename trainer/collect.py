"""`vla-mbpo collect`: record episodes of the scripted expert in the MuJoCo env, on all cores.

Each worker process owns one env and one expert; episode i uses env seed `seed + i`, so a recording is
reproducible whatever the number of workers. Episodes are written in index order as they finish.

A successful episode is filmed on for `post_success_steps` control steps after its first success, the
expert holding the completed task (success stays latched in every later frame). The env's own episode
ends at the first success, which leaves one `<yes>` frame per successful episode for the world model's
reward head, next to near-identical `<no>` frames just before it: a label that no model generalises on
(checkpoints/default_build/reward_diagnosis.json). With the default of two chunks (16 steps at k = 8)
"done" is a visible state: the last chunk of every window that reaches it is a `<yes>`, and windows
starting after success have only `<yes>` chunks. Everything before the first success, and whether an
episode succeeds within `max_steps`, is identical to a recording with `post_success_steps=0`.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.data import MANIFEST_NAME, DatasetMeta, Episode, EpisodeRecorder, EpisodeWriter, read_manifest

# The expert's random stream is derived from the episode seed but kept apart from the env's.
EXPERT_SEED_STREAM = 1
# Two chunks of the default chunk size: every world-model window that reaches success ends on `<yes>` chunks.
DEFAULT_POST_SUCCESS_STEPS = 16


@dataclass(frozen=True)
class CollectConfig:
    """One recording job."""

    task: str = "multi"
    num_episodes: int = 10
    skill: float = 0.5
    seed: int = 0
    image_size: int = 64
    max_steps: int = 96
    workers: int = 2
    post_success_steps: int = DEFAULT_POST_SUCCESS_STEPS

    def __post_init__(self) -> None:
        if self.num_episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {self.num_episodes}")
        if not 0.0 <= self.skill <= 1.0:
            raise ValueError(f"skill must be in [0, 1], got {self.skill}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.post_success_steps < 0:
            raise ValueError(f"post-success-steps must be >= 0, got {self.post_success_steps}")


def record_episode(env, expert, seed: int, max_steps: int | None = None, post_success_steps: int = 0) -> Episode:
    """Run the expert for one episode from `env.reset(seed=seed)` and return every frame and action.

    The recording ends `post_success_steps` steps after the first success, or after `max_steps` steps
    (default: the env's) without success. With post_success_steps > 0 the env must run on after success
    (terminate_on_success=False) and allow max_steps + post_success_steps steps.
    """
    limit = env.config.max_steps if max_steps is None else max_steps
    if post_success_steps < 0:
        raise ValueError(f"post_success_steps must be >= 0, got {post_success_steps}")
    if post_success_steps > 0 and env.config.terminate_on_success:
        raise ValueError("post_success_steps > 0 needs an env built with terminate_on_success=False")
    if limit + post_success_steps > env.config.max_steps:
        raise ValueError(f"the env truncates at max_steps={env.config.max_steps}, before max_steps={limit} plus "
                         f"post_success_steps={post_success_steps}")
    obs, info = env.reset(seed=seed)
    recorder = EpisodeRecorder(obs, info["instruction"], info["task"], seed, limit, post_success_steps,
                               success_at_reset=bool(info["success"]))
    while not recorder.done:
        obs, _ = recorder.step_chunk(env, expert.act(obs)[None])  # one action at a time: the expert is closed-loop
    return recorder.finish()


# ---- worker processes: one env + expert each, built once --------------------------------------------
_worker_env = None
_worker_config: CollectConfig | None = None


def _init_worker(config: CollectConfig) -> None:
    global _worker_env, _worker_config
    from trainer.envs import make_env  # imports mujoco: MUJOCO_GL is already in this process's environment

    # The env runs on after success only when post-success frames are wanted; it never truncates them.
    _worker_env = make_env(config.task, image_size=config.image_size,
                           max_steps=config.max_steps + config.post_success_steps,
                           terminate_on_success=config.post_success_steps == 0)
    _worker_config = config


def _record_in_worker(seed: int) -> Episode:
    from trainer.envs.expert import ScriptedExpert

    expert = ScriptedExpert(_worker_env, _worker_config.skill, seed=np.random.SeedSequence([seed, EXPERT_SEED_STREAM]))
    return record_episode(_worker_env, expert, seed, _worker_config.max_steps, _worker_config.post_success_steps)


def collect(config: CollectConfig, out_dir: str | os.PathLike, append: bool = False, progress: bool = True) -> dict:
    """Record `config.num_episodes` episodes into `out_dir`; returns the manifest's counts."""
    from tqdm import tqdm

    from trainer.envs import ACTION_DIM, DEFAULT_CHUNK_SIZE

    out_dir = Path(out_dir)
    if (out_dir / MANIFEST_NAME).exists() and not append:
        raise FileExistsError(f"{out_dir} already holds a recorded dataset; pass append=True (--append) to add to it")
    meta = DatasetMeta(config.image_size, config.image_size, ACTION_DIM, (-1.0,) * ACTION_DIM, (1.0,) * ACTION_DIM,
                       DEFAULT_CHUNK_SIZE)
    writer = EpisodeWriter(out_dir, meta)
    first = config.seed + writer.num_episodes  # appending continues the seed sequence
    seeds = range(first, first + config.num_episodes)
    bar = tqdm(total=config.num_episodes, desc=f"collect {config.task}", unit="ep", disable=not progress)
    successes = done = 0
    # spawn, not fork: a forked child would inherit the parent's GL state if it had one.
    with mp.get_context("spawn").Pool(config.workers, initializer=_init_worker, initargs=(config,)) as pool:
        for episode in pool.imap(_record_in_worker, seeds):
            writer.add(episode)
            successes += episode.succeeded
            done += 1
            bar.update(1)
            bar.set_postfix(success=f"{successes / done:.2f}")
    bar.close()
    return read_manifest(out_dir)["counts"]


def build_parser() -> argparse.ArgumentParser:
    from trainer.envs.expert import DEFAULT_DEMO_SKILL

    parser = argparse.ArgumentParser(prog="vla-mbpo collect", description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["lift", "push", "place", "multi"], default="multi",
                        help="task family, or multi for a random family per episode")
    parser.add_argument("--episodes", type=int, required=True, help="number of episodes to record")
    parser.add_argument("--skill", type=float, default=DEFAULT_DEMO_SKILL,
                        help="expert skill in [0, 1]: 1 is near perfect, the default gives imperfect demos")
    parser.add_argument("--out", required=True, help="output directory (manifest.json + episode_*.npz)")
    parser.add_argument("--seed", type=int, default=0, help="env seed of the first episode (episode i: seed + i)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes, one env each")
    parser.add_argument("--image-size", type=int, default=64, help="camera image height and width in pixels")
    parser.add_argument("--max-steps", type=int, default=96, help="control steps before an episode is truncated")
    parser.add_argument("--post-success-steps", type=int, default=DEFAULT_POST_SUCCESS_STEPS,
                        help="control steps recorded after the first success, the expert holding the completed "
                             "task (0: stop at the first success, as the env does); default: two chunks")
    parser.add_argument("--append", action="store_true", help="add episodes to an existing dataset in --out")
    return parser


def main(argv: list[str]) -> int:
    # MuJoCo picks its GL backend at import; headless offscreen rendering needs EGL unless told otherwise.
    os.environ.setdefault("MUJOCO_GL", "egl")
    args = build_parser().parse_args(argv)
    from trainer.envs import EnvConfig

    try:
        EnvConfig(args.task, args.image_size, args.image_size, args.max_steps)  # fail before starting workers
        config = CollectConfig(args.task, args.episodes, args.skill, args.seed, args.image_size, args.max_steps,
                               args.workers, args.post_success_steps)
        counts = collect(config, args.out, append=args.append)
    except (ValueError, FileExistsError) as e:
        print(f"vla-mbpo collect: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {counts['episodes']} episodes, {counts['steps']} steps, "
          f"{counts['successes']} successes ({counts['successes'] / counts['episodes']:.1%})")
    for task, c in counts["per_task"].items():
        print(f"  {task}: {c['episodes']} episodes, success {c['successes'] / c['episodes']:.1%}")
    return 0
