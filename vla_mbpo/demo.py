"""`vla-mbpo demo`: the main job, end to end on the embedded default world model.

1. demos: a small scripted-expert recording (cached under ~/.cache/vla-mbpo/demo);
2. SFT: behaviour cloning on it -> the initial policy (cached, keyed by its settings);
3. real buffer: the SFT policy's own episodes in the real env (the only real interaction for RL);
4. `vla-mbpo serve` on a free localhost port with checkpoints/default, waiting for health SERVING;
5. real-env success of the SFT policy, a short VLA-MBPO run over gRPC, real-env success after it;
6. the before/after table, the learning-curve PNGs and summary.json in the run directory; the server
   is stopped with SIGTERM (it drains and releases every state) whatever happens.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = REPO_ROOT / "checkpoints" / "default"
ALL_FAMILIES = ("VlaMbpo/Lift-v0", "VlaMbpo/Push-v0", "VlaMbpo/Place-v0")


class DemoError(RuntimeError):
    """A demo step that cannot run (missing checkpoint, a server that does not start); says which."""


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of every stage; the defaults take about 10 minutes on a 2-core CPU machine (10.3 measured; limit 20)."""

    checkpoint: Path = DEFAULT_CHECKPOINT
    cache_dir: Path = Path("~/.cache/vla-mbpo/demo")
    run_dir: Path = Path("runs/demo")
    demo_episodes: int = 300
    sft_steps: int = 2000
    buffer_episodes: int = 30
    eval_episodes: int = 30  # per task family, before and after
    iterations: int = 3
    num_start_states: int = 64  # a CPU-served world model imagines ~15 chunk rollouts/s on 2 cores at W's scale
    horizon_chunks: int = 2
    updates_per_refill: int = 20
    critic_warmup_steps: int = 100
    minibatch_size: int = 256
    actor_lr: float = 1e-5
    workers: int = 2
    seed: int = 0
    server_args: tuple[str, ...] = field(default_factory=tuple)
    sft_policy: Path | None = None  # an existing SFT checkpoint: skips stages 1-2

    def __post_init__(self) -> None:
        for name in ("demo_episodes", "sft_steps", "buffer_episodes", "eval_episodes", "iterations",
                     "num_start_states", "horizon_chunks", "updates_per_refill", "minibatch_size", "workers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"DemoConfig.{name} must be >= 1, got {getattr(self, name)}")


def _stage(message: str) -> None:
    print(f"\n== {message}", flush=True)


def ensure_demos(config: DemoConfig) -> Path:
    """The scripted-expert recording, made once and cached."""
    from trainer.collect import CollectConfig, collect
    from trainer.data import MANIFEST_NAME

    out = config.cache_dir / f"demos-{config.demo_episodes}-seed{config.seed}"
    if (out / MANIFEST_NAME).is_file():
        print(f"cached demos: {out}")
        return out
    shutil.rmtree(out, ignore_errors=True)
    counts = collect(CollectConfig(task="multi", num_episodes=config.demo_episodes, seed=config.seed,
                                   workers=config.workers), out)
    print(f"recorded {counts['episodes']} demos, {counts['successes']} successful")
    return out


def ensure_sft(config: DemoConfig, demos: Path) -> Path:
    """The SFT policy, trained once per (demos, steps, seed) and cached."""
    from trainer.config import PolicyConfig, SFTConfig
    from trainer.policy import POLICY_WEIGHTS
    from trainer.sft import load_demos, train_sft

    sft_config = SFTConfig(steps=config.sft_steps, seed=config.seed)
    key = hashlib.sha1(json.dumps([str(demos), asdict(sft_config)], sort_keys=True).encode()).hexdigest()[:10]
    out = config.cache_dir / f"sft-{key}"
    if (out / POLICY_WEIGHTS).is_file():
        print(f"cached SFT policy: {out}")
        return out
    policy_config = PolicyConfig()
    train_sft(load_demos(demos, policy_config, sft_config.only_successful), out, sft_config, policy_config)
    return out


def ensure_buffer(config: DemoConfig, sft: Path) -> Path:
    """The SFT policy's own episodes (sampled actions), recorded once per policy: the real replay buffer."""
    from trainer.config import EvalConfig
    from trainer.data import MANIFEST_NAME
    from trainer.evaluate import evaluate_policy, record_to

    out = config.cache_dir / f"buffer-{sft.name}-{config.buffer_episodes}"
    if (out / MANIFEST_NAME).is_file():
        print(f"cached real buffer: {out}")
        return out
    shutil.rmtree(out, ignore_errors=True)
    eval_config = EvalConfig(env_ids=("VlaMbpo/MultiTask-v0",), episodes=config.buffer_episodes,
                             seed=2_000_000 + config.seed, num_workers=config.workers, greedy=False)
    counts = record_to(evaluate_policy(sft, eval_config, record=True), out, chunk_size=8)
    print(f"real buffer: {counts['episodes']} episodes, {counts['steps']} env steps, {counts['successes']} successes")
    return out


def run_demo(config: DemoConfig) -> dict:
    """Runs every stage; returns the summary written to run_dir/summary.json."""
    from trainer.config import EvalConfig, MBPOConfig, PPOConfig
    from trainer.evaluate import evaluate_policy, format_table
    from trainer.imagination import Imaginer
    from trainer.mbpo import MBPOTrainer, StartStateSampler
    from trainer.plots import plot_learning_curves
    from trainer.policy import load_policy
    from trainer.rollout_client import WorldModelClient
    from trainer.server_process import ServerProcess

    if not (config.checkpoint / "layout.json").is_file():
        raise DemoError(f"no world-model checkpoint at {config.checkpoint} (expected layout.json, world_model/, "
                        f"tokenizer/); build it with `vla-mbpo build-default` or pass --checkpoint")
    started = time.perf_counter()
    config.cache_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(config.run_dir, ignore_errors=True)
    config.run_dir.mkdir(parents=True)
    if config.sft_policy is None:
        _stage("1/6 scripted demos")
        demos = ensure_demos(config)
        _stage("2/6 SFT policy")
        sft = ensure_sft(config, demos)
    else:
        _stage(f"1-2/6 SFT policy given: {config.sft_policy}")
        sft = config.sft_policy
    _stage("3/6 real replay buffer from the SFT policy")
    buffer = ensure_buffer(config, sft)
    eval_config = EvalConfig(env_ids=ALL_FAMILIES, episodes=config.eval_episodes, num_workers=config.workers)
    _stage("4/6 real-env success of the SFT policy")
    before = evaluate_policy(sft, eval_config)
    print(format_table({"SFT": before}))
    _stage(f"5/6 VLA-MBPO: {config.iterations} iterations x {config.num_start_states} start states x "
           f"{config.horizon_chunks} chunks, world model served from {config.checkpoint}")
    server = ServerProcess(config.checkpoint, config.run_dir / "server.log", list(config.server_args))
    with server:
        print(f"server SERVING on {server.target}")
        with WorldModelClient(server.target) as client:
            policy, _ = load_policy(sft)
            mbpo = MBPOConfig(iterations=config.iterations, num_start_states=config.num_start_states,
                              horizon_chunks=config.horizon_chunks, seed=config.seed,
                              critic_warmup_steps=config.critic_warmup_steps,
                              states_per_wave=min(256, config.num_start_states))
            ppo = PPOConfig(updates_per_refill=config.updates_per_refill, minibatch_size=config.minibatch_size,
                            actor_lr=config.actor_lr)
            trainer = MBPOTrainer(policy, Imaginer(client), StartStateSampler(buffer), config.run_dir / "mbpo", mbpo,
                                  ppo)
            trainer.train()
            server_stats = client.stats()
    _stage("6/6 real-env success after VLA-MBPO")
    after = evaluate_policy(config.run_dir / "mbpo" / "policy", eval_config)
    table = format_table({"SFT": before, "SFT + VLA-MBPO": after})
    print(table)
    real_steps = StartStateSampler(buffer).real_env_steps
    curve = config.run_dir / "mbpo" / "real_success.jsonl"
    points = [{"iteration": 0, "real_env_steps": real_steps, "real/success_mean": before.mean_success},
              {"iteration": config.iterations, "real_env_steps": real_steps, "real/success_mean": after.mean_success}]
    curve.write_text("".join(json.dumps(p) + "\n" for p in points))
    plots = plot_learning_curves({"VLA-MBPO": [curve]}, config.run_dir, before.mean_success)
    summary = {"sft": before.to_json() | {"episodes": None}, "mbpo": after.to_json() | {"episodes": None},
               "real_env_steps": real_steps, "imagined_chunks": _imagined_chunks(config.run_dir / "mbpo"),
               "server_stats": asdict(server_stats), "seconds": time.perf_counter() - started,
               "config": {k: str(v) for k, v in asdict(config).items()}, "plots": [str(p) for p in plots]}
    (config.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (config.run_dir / "table.md").write_text(table + "\n")
    print(f"\nreal env steps used for RL: {real_steps} (the buffer); imagined chunks: {summary['imagined_chunks']}; "
          f"total {summary['seconds'] / 60:.1f} min; plots and summary in {config.run_dir}")
    return summary


def _imagined_chunks(run_dir: Path) -> int:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return int(sum(r.get("imagine/chunks", 0) for r in records))


def build_parser() -> argparse.ArgumentParser:
    d = DemoConfig()
    parser = argparse.ArgumentParser(prog="vla-mbpo demo", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=d.checkpoint, help="world-model checkpoint to serve")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: ~/.cache/vla-mbpo/demo")
    parser.add_argument("--run-dir", type=Path, default=d.run_dir, help="where the table, plots and runs go")
    for name in ("demo_episodes", "sft_steps", "buffer_episodes", "eval_episodes", "iterations", "num_start_states",
                 "horizon_chunks", "updates_per_refill", "critic_warmup_steps", "minibatch_size", "workers", "seed"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    parser.add_argument("--actor-lr", type=float, default=d.actor_lr)
    parser.add_argument("--server-arg", action="append", default=[], help="extra `vla-mbpo serve` argument")
    parser.add_argument("--sft-policy", type=Path, default=None,
                        help="use this SFT checkpoint instead of recording demos and cloning them")
    return parser


def main(argv: list[str]) -> int:
    os.environ.setdefault("MUJOCO_GL", "egl")  # the entry point picks the GL backend before MuJoCo loads
    args = build_parser().parse_args(argv)
    cache_dir = args.cache_dir or Path.home() / ".cache" / "vla-mbpo" / "demo"
    values = {k: v for k, v in vars(args).items() if k not in ("cache_dir", "server_arg")}
    config = DemoConfig(cache_dir=cache_dir, server_args=tuple(args.server_arg), **values)
    try:
        run_demo(config)
    except DemoError as exc:
        print(f"vla-mbpo demo: {exc}", file=sys.stderr)
        return 1
    return 0
