"""Real-env success of a policy: seeded episodes per task family, spread over worker processes.

`vla-mbpo evaluate --policy CKPT --episodes 100 --seed S` runs `episodes` episodes of every task family
(episode j uses env seed S + j, so two policies meet exactly the same scenes) and prints the success rate
per family and their mean. Each worker steps a group of envs in lockstep so the policy runs batched. Sampled
actions (`--sample`) draw from one stream per episode, seeded by (sample seed, env id, env seed): how the
episodes are split over workers and groups does not change a sampled result, and two policies evaluated with
the same seeds meet the same noise as well as the same scenes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer.config import ConfigError, EvalConfig
from trainer.data import DatasetMeta, Episode, EpisodeRecorder, EpisodeWriter
from trainer.machine import machine_fingerprint
from trainer.plots import EVAL_TEMPERATURE_KEY
from trainer.policy import VlaPolicy, load_policy, make_batch, save_policy


@dataclass(frozen=True)
class EpisodeOutcome:
    env_id: str
    seed: int
    success: bool
    env_steps: int  # steps until the outcome was decided: the first success, or truncation at max_steps
    episode: Episode | None = None  # every frame and action, when recorded (post-success frames included)


@dataclass(frozen=True)
class EvalResult:
    """Per-family success rates (fractions in [0, 1]), their mean, and every episode's outcome."""

    success_rate: dict[str, float]
    mean_success: float
    episodes: tuple[EpisodeOutcome, ...]
    seconds: float
    config: EvalConfig | None = None  # the rule it followed, written into its JSON
    machine: dict[str, str] | None = None  # trainer.machine.machine_fingerprint() of the machine it ran on

    def to_json(self) -> dict:
        out = {"success_rate": self.success_rate, "mean_success": self.mean_success, "seconds": self.seconds}
        if self.config is not None:
            c = self.config
            out.update({"action_rule": c.action_rule, "seed": c.seed, "episodes_per_family": c.episodes,
                        "sample_seed": None if c.greedy else c.sample_seed})
        if self.machine is not None:
            out["machine"] = self.machine
        out["episodes"] = [{"env_id": e.env_id, "seed": e.seed, "success": e.success, "env_steps": e.env_steps}
                           for e in self.episodes]
        return out


def family_name(env_id: str) -> str:
    """"VlaMbpo/Lift-v0" -> "lift"."""
    return env_id.split("/")[-1].split("-")[0].lower()


def episode_generator(sample_seed: int, env_id: str, env_seed: int) -> torch.Generator:
    """The sample stream of one episode, a function of the evaluation's sample seed, the env id and the env
    seed only (families share env seeds, so the id is part of it)."""
    entropy = [sample_seed, zlib.crc32(env_id.encode()), env_seed]
    return torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]))


def run_episodes(policy: VlaPolicy, env_id: str, seeds: list[int], greedy: bool, group_size: int, max_steps: int,
                 sample_seed: int = 0, record: bool = False,
                 post_success_steps: int = 0, temperature: float = 1.0) -> list[EpisodeOutcome]:
    """Runs one episode per seed, `group_size` envs at a time in lockstep with batched policy calls.

    With `record`, every control step's frames are kept and each outcome carries its Episode (the replay
    buffer format), filmed on for `post_success_steps` steps after a success with the policy still acting;
    otherwise only the observation after each chunk is rendered. Success and `env_steps` are decided at
    the first success (or at max_steps) either way, so recording never changes an evaluation. Sampled
    actions (not `greedy`) come from softmax(logits / temperature), as PPO trains them at that temperature,
    each episode drawing from its own `episode_generator` stream.
    """
    import gymnasium as gym

    import trainer.envs  # noqa: F401  (registers the gymnasium ids)

    if post_success_steps < 0:
        raise ValueError(f"post_success_steps must be >= 0, got {post_success_steps}")
    run_on = record and post_success_steps > 0  # the env must not end the episode at its first success
    envs = [gym.make(env_id, max_steps=max_steps + (post_success_steps if run_on else 0),
                     terminate_on_success=not run_on).unwrapped for _ in range(min(group_size, len(seeds)))]
    chunk = policy.config.chunk_size
    outcomes: list[EpisodeOutcome] = []
    try:
        for start in range(0, len(seeds), len(envs)):
            group = seeds[start: start + len(envs)]
            observations = [env.reset(seed=seed)[0] for env, seed in zip(envs, group, strict=False)]
            generators = [episode_generator(sample_seed, env_id, seed) for seed in group]
            steps = [0] * len(group)
            success = [False] * len(group)
            recorders = [EpisodeRecorder(obs, env.instruction, env.task_family, seed, max_steps,
                                         post_success_steps if run_on else 0)
                         for obs, env, seed in zip(observations, envs, group, strict=False)] if record else None
            active = list(range(len(group)))
            while active:
                batch = make_batch(np.stack([observations[i]["head"] for i in active]),
                                   np.stack([observations[i]["wrist"] for i in active]),
                                   [envs[i].instruction for i in active], policy.config)
                actions, _, _, _ = policy.act(batch, generator=[generators[i] for i in active], greedy=greedy,
                                              temperature=temperature)
                still_active = []
                for row, i in enumerate(active):
                    chunk_actions = actions[row, :chunk].numpy()  # [k, 4]
                    if record:
                        obs, info = recorders[i].step_chunk(envs[i], chunk_actions)
                        steps[i], success[i] = recorders[i].outcome_steps, recorders[i].success_step is not None
                        over = recorders[i].done
                    else:
                        obs, _, terminated, truncated, info = envs[i].step_chunk(chunk_actions)
                        steps[i] += int(info["num_steps_taken"])
                        success[i] = bool(info["success"])
                        over = terminated or truncated
                    observations[i] = obs
                    if not over:
                        still_active.append(i)
                active = still_active
            outcomes += [EpisodeOutcome(env_id, seed, success[i], steps[i], recorders[i].finish() if record else None)
                         for i, seed in enumerate(group)]
    finally:
        for env in envs:
            env.close()
    return outcomes


@dataclass(frozen=True)
class _EvalJob:
    """One worker's share: some seeds of one env."""

    policy_dir: str
    env_id: str
    seeds: list[int]
    config: EvalConfig
    record: bool
    post_success_steps: int


def _worker(job: _EvalJob) -> list[EpisodeOutcome]:
    torch.set_num_threads(1)  # the workers already use every core
    policy, _ = load_policy(Path(job.policy_dir))
    c = job.config
    return run_episodes(policy, job.env_id, job.seeds, c.greedy, c.envs_per_worker, c.max_steps, c.sample_seed,
                        job.record, job.post_success_steps, c.temperature)


def evaluate_policy(policy_dir: Path, config: EvalConfig, record: bool = False,
                    post_success_steps: int = 0) -> EvalResult:
    """Success per family over `config.episodes` seeded episodes each, on `config.num_workers` processes.
    With `record`, each outcome carries its full Episode (see `record_to`), filmed on for
    `post_success_steps` steps after a success; the success rates do not depend on it."""
    started = time.perf_counter()
    jobs = []
    for env_id in config.env_ids:
        seeds = [config.seed + j for j in range(config.episodes)]
        per_job = max(1, -(-len(seeds) // config.num_workers))
        for k in range(0, len(seeds), per_job):
            jobs.append(_EvalJob(str(policy_dir), env_id, seeds[k: k + per_job], config, record, post_success_steps))
    if config.num_workers == 1:
        results = [_worker(job) for job in jobs]
    else:
        # spawn, not fork: forking a process that holds torch threads and a GL context is unsafe
        with multiprocessing.get_context("spawn").Pool(config.num_workers) as pool:
            results = pool.map(_worker, jobs)
    outcomes = tuple(o for chunk in results for o in chunk)
    rates = {}
    for env_id in config.env_ids:
        mine = [o.success for o in outcomes if o.env_id == env_id]
        rates[family_name(env_id)] = float(np.mean(mine))
    return EvalResult(rates, float(np.mean(list(rates.values()))), outcomes, time.perf_counter() - started, config,
                      machine_fingerprint())


def evaluate_in_training(policy: VlaPolicy, out_dir: Path, config: EvalConfig, stage: str,
                         iteration: int) -> dict[str, float]:
    """Real-env success of a policy being trained, as metric records (`real/success_*`; a sampled evaluation
    adds `real/eval_temperature`).

    The policy is saved to OUT/eval_snapshot first so that worker processes can load it."""
    snapshot = out_dir / "eval_snapshot"
    save_policy(policy, snapshot, {"stage": stage, "iteration": iteration})
    result = evaluate_policy(snapshot, config)
    out = {"real/success_mean": result.mean_success}
    out.update({f"real/success_{family}": rate for family, rate in result.success_rate.items()})
    if not config.greedy:  # a sampled evaluation says so in the record: the mode is the default rule
        out[EVAL_TEMPERATURE_KEY] = config.temperature
    return out


def record_to(result: EvalResult, out_dir: Path, chunk_size: int) -> dict:
    """Appends every recorded episode of `result` to a replay buffer directory; returns its counts."""
    size = result.episodes[0].episode.head.shape[1]
    writer = EpisodeWriter(out_dir, DatasetMeta(size, size, 4, (-1.0,) * 4, (1.0,) * 4, chunk_size))
    for outcome in result.episodes:
        writer.add(outcome.episode)
    return json.loads((out_dir / "manifest.json").read_text())["counts"]


def format_table(rows: dict[str, EvalResult]) -> str:
    """A markdown table: one row per method, success % per family and the mean."""
    families = list(next(iter(rows.values())).success_rate)
    lines = ["| method | " + " | ".join(families) + " | mean |", "|---" * (len(families) + 2) + "|"]
    for name, result in rows.items():
        cells = [f"{100 * result.success_rate[f]:.1f}" for f in families]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * result.mean_success:.1f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    defaults = EvalConfig()
    parser = argparse.ArgumentParser(prog="vla-mbpo evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--policy", type=Path, required=True, help="policy checkpoint directory")
    parser.add_argument("--episodes", type=int, default=defaults.episodes, help="episodes per task family")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="episode j uses env seed SEED + j")
    parser.add_argument("--tasks", default=",".join(defaults.env_ids), help="comma-separated gymnasium env ids")
    parser.add_argument("--workers", type=int, default=defaults.num_workers, help="worker processes")
    parser.add_argument("--envs-per-worker", type=int, default=defaults.envs_per_worker)
    parser.add_argument("--sample", action="store_true", help="sample actions instead of taking the mode")
    parser.add_argument("--temperature", type=float, default=None,
                        help=f"with --sample: sample from softmax(logits / T) (default {defaults.temperature})")
    parser.add_argument("--sample-seed", type=int, default=None,
                        help="with --sample: other action samples over the same scenes "
                             f"(default {defaults.sample_seed})")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    parser.add_argument("--record-to", type=Path, default=None,
                        help="also append every episode (all frames) to this replay-buffer directory")
    parser.add_argument("--post-success-steps", type=int, default=0,
                        help="with --record-to: control steps recorded after a success, the policy still acting "
                             "(the success rates are decided at the first success either way)")
    return parser


def main(argv: list[str]) -> int:
    os.environ.setdefault("MUJOCO_GL", "egl")  # the entry point picks the GL backend before MuJoCo loads
    args = build_parser().parse_args(argv)
    for flag, value in (("--temperature", args.temperature), ("--sample-seed", args.sample_seed)):
        if value is not None and not args.sample:
            print(f"vla-mbpo evaluate: error: {flag} needs --sample (the mode does not depend on it)", file=sys.stderr)
            return 2
    temperature = EvalConfig.temperature if args.temperature is None else args.temperature
    sample_seed = EvalConfig.sample_seed if args.sample_seed is None else args.sample_seed
    try:
        config = EvalConfig(env_ids=tuple(args.tasks.split(",")), episodes=args.episodes, seed=args.seed,
                            num_workers=args.workers, envs_per_worker=args.envs_per_worker, greedy=not args.sample,
                            temperature=temperature, sample_seed=sample_seed)
    except ConfigError as exc:
        print(f"vla-mbpo evaluate: error: {exc}", file=sys.stderr)
        return 2
    if args.post_success_steps < 0:
        print(f"vla-mbpo evaluate: error: --post-success-steps must be >= 0, got {args.post_success_steps}",
              file=sys.stderr)
        return 2
    result = evaluate_policy(args.policy, config, record=args.record_to is not None,
                             post_success_steps=args.post_success_steps)
    print(format_table({str(args.policy): result}))
    if args.record_to is not None:
        counts = record_to(result, args.record_to, load_policy(args.policy)[0].config.chunk_size)
        print(f"recorded into {args.record_to}: {counts['episodes']} episodes, {counts['steps']} steps, "
              f"{counts['successes']} successes", file=sys.stderr)
    print(f"{len(result.episodes)} episodes in {result.seconds:.1f} s", file=sys.stderr)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result.to_json(), indent=2))
    return 0
