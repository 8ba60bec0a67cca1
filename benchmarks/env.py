"""Env benchmark: how fast the real environment runs on one core, and how good the scripted expert is.

Reported:
- env steps/s with both cameras rendered every step (`step`), random actions, resets included, on one
  CPU core (the process is pinned), plus the split into physics and rendering ms per step;
- env steps/s with chunked stepping (`step_chunk`, k = 8, one render per chunk);
- scripted-expert success rate over N seeded episodes (seeds 0..N-1) per task family, at full skill and
  at the default demo skill, with the mean episode length.
Warm-up is excluded; seeds are fixed. Usage:

    python -m benchmarks.env --json env.json            # everything (about two minutes on one core)
    python -m benchmarks.env --episodes 0               # throughput only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("MUJOCO_GL", "egl")  # must precede the first mujoco import (via trainer.envs)

import numpy as np  # noqa: E402

from benchmarks.common import format_table, machine_info  # noqa: E402
from trainer.envs import DEFAULT_CHUNK_SIZE, TASK_FAMILIES, make_env  # noqa: E402
from trainer.envs.expert import DEFAULT_DEMO_SKILL, ScriptedExpert  # noqa: E402

THROUGHPUT_TARGET = 300.0  # steps/s with both cameras on one core (issue 3)


def pin_to_one_core() -> int | None:
    """Pin this process (and the GL driver's threads it starts later) to one CPU; returns it."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return core


def step_throughput(task: str, image_size: int, num_steps: int, warmup: int = 200) -> dict:
    """Env steps/s of `step` (renders both views every step), random actions, resets included."""
    env = make_env(task, image_size=image_size)
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, size=(warmup + num_steps, 4)).astype(np.float32)  # [steps, 4]
    env.reset(seed=0)
    episodes = 0

    def run(rows: np.ndarray) -> None:
        nonlocal episodes
        for action in rows:
            _, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                env.reset(seed=int(rng.integers(1 << 31)))
                episodes += 1

    run(actions[:warmup])
    start = time.perf_counter()
    run(actions[warmup:])
    seconds = time.perf_counter() - start
    render_ms = _render_ms(env)
    env.close()
    steps_per_second = num_steps / seconds
    return {"steps": num_steps, "seconds": seconds, "steps_per_second": steps_per_second,
            "ms_per_step": 1e3 / steps_per_second, "render_both_views_ms": render_ms,
            "physics_and_overhead_ms": 1e3 / steps_per_second - render_ms}


def _render_ms(env, repeats: int = 300) -> float:
    observe = env._observe  # the exact rendering path of step(), timed alone
    observe()
    start = time.perf_counter()
    for _ in range(repeats):
        observe()
    return (time.perf_counter() - start) / repeats * 1e3


def chunk_throughput(task: str, image_size: int, num_chunks: int, warmup: int = 20) -> dict:
    """Env steps/s of `step_chunk` with k = DEFAULT_CHUNK_SIZE: physics every step, one render per chunk."""
    env = make_env(task, image_size=image_size)
    rng = np.random.default_rng(1)
    chunks = rng.uniform(-1, 1, size=(warmup + num_chunks, DEFAULT_CHUNK_SIZE, 4)).astype(np.float32)  # [n, k, 4]
    env.reset(seed=0)
    steps = 0

    def run(rows: np.ndarray) -> None:
        nonlocal steps
        for chunk in rows:
            _, _, terminated, truncated, info = env.step_chunk(chunk)
            steps += info["num_steps_taken"]
            if terminated or truncated:
                env.reset(seed=int(rng.integers(1 << 31)))

    run(chunks[:warmup])
    steps = 0
    start = time.perf_counter()
    run(chunks[warmup:])
    seconds = time.perf_counter() - start
    env.close()
    return {"chunks": num_chunks, "steps": steps, "seconds": seconds, "steps_per_second": steps / seconds}


def expert_success(family: str, skill: float, num_episodes: int, image_size: int) -> dict:
    """Success rate of the scripted expert over episodes with env seeds 0..num_episodes-1."""
    env = make_env(family, image_size=image_size)
    successes, lengths = 0, []
    for seed in range(num_episodes):
        obs, info = env.reset(seed=seed)
        expert = ScriptedExpert(env, skill, seed=seed)
        done, steps = False, 0
        while not done:
            obs, _, terminated, truncated, info = env.step(expert.act(obs))
            done, steps = terminated or truncated, steps + 1
        successes += bool(info["success"])
        lengths.append(steps)
    env.close()
    return {"family": family, "skill": skill, "episodes": num_episodes, "successes": successes,
            "success_rate": successes / max(num_episodes, 1), "mean_steps": float(np.mean(lengths)) if lengths else 0.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vla-mbpo bench env", description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3000, help="timed env steps for the step throughput")
    parser.add_argument("--chunks", type=int, default=500, help="timed chunks for the step_chunk throughput")
    parser.add_argument("--episodes", type=int, default=100, help="expert episodes per family and skill (0: skip)")
    parser.add_argument("--demo-skill", type=float, default=DEFAULT_DEMO_SKILL)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    core = pin_to_one_core()
    result = {"benchmark": "env", "machine": machine_info(), "pinned_core": core, "image_size": args.image_size}
    result["step"] = step_throughput("multi", args.image_size, args.steps)
    result["step_chunk"] = chunk_throughput("multi", args.image_size, args.chunks)
    result["expert"] = [expert_success(family, skill, args.episodes, args.image_size)
                        for skill in (1.0, args.demo_skill) for family in TASK_FAMILIES] if args.episodes else []

    step = result["step"]
    rows = [
        ("step, both cameras", f"{step['steps_per_second']:.0f} steps/s ({step['ms_per_step']:.2f} ms: "
                               f"render {step['render_both_views_ms']:.2f} + physics/other "
                               f"{step['physics_and_overhead_ms']:.2f}); target >= {THROUGHPUT_TARGET:.0f}"),
        (f"step_chunk, k={DEFAULT_CHUNK_SIZE}", f"{result['step_chunk']['steps_per_second']:.0f} steps/s"),
    ]
    rows += [(f"expert {e['family']} skill {e['skill']:.2f}",
              f"{e['success_rate']:.0%} of {e['episodes']} ({e['mean_steps']:.1f} steps mean)")
             for e in result["expert"]]
    print(format_table(rows, f"env benchmark, {args.image_size}x{args.image_size}, pinned to CPU {core}: "
                             f"{result['machine']['processor']}"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
