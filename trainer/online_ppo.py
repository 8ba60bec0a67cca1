"""`vla-mbpo train-online-ppo`: the online-RL baseline, PPO on chunks collected directly in the real env.

Same policy, same losses and chunk-level GAE as VLA-MBPO, but every transition costs real env steps: the
run stops at the first refill that reaches `--total-env-steps` control steps (give it the step count of the
buffer VLA-MBPO learned from; the overshoot is below num_envs * chunk_size, and the real count is logged).
A truncated episode bootstraps from the critic's value of its last observation; a successful one ends with
reward 1 and no bootstrap.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from trainer.cli_args import add_eval_arguments, add_ppo_arguments, eval_config_from_args, ppo_config_from_args
from trainer.config import EvalConfig, OnlinePPOConfig, PPOConfig
from trainer.imagination import policy_values
from trainer.policy import VlaPolicy, load_policy, make_batch, save_policy
from trainer.ppo import PPOLearner, RolloutBatch, compute_gae

TRAIN_SEED_OFFSET = 5_000_000  # training episodes never reuse an evaluation seed (those start at 1e6)


class OnlinePPOTrainer:
    """Steps `num_envs` real envs in lockstep, one chunk per policy call, and updates after each rollout."""

    def __init__(self, policy: VlaPolicy, out_dir: Path, config: OnlinePPOConfig, ppo: PPOConfig,
                 eval_config: EvalConfig | None = None, max_steps: int = 96) -> None:
        import gymnasium as gym

        import trainer.envs  # noqa: F401  (registers the gymnasium ids)

        self.policy, self.out_dir, self.config, self.ppo, self.eval_config = policy, out_dir, config, ppo, eval_config
        self.learner = PPOLearner(policy, ppo, seed=config.seed, temperature=config.policy_temperature)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.envs = [gym.make(config.env_id, max_steps=max_steps).unwrapped for _ in range(config.num_envs)]
        self.next_seed = TRAIN_SEED_OFFSET + config.seed * 100_000
        self.observations = [self._reset(env) for env in self.envs]
        self.env_steps = 0
        self.iteration = 0
        self.finished: list[bool] = []  # success of every finished training episode
        out_dir.mkdir(parents=True, exist_ok=True)

    def _reset(self, env) -> dict[str, np.ndarray]:
        self.next_seed += 1
        return env.reset(seed=self.next_seed)[0]

    def _batch(self, observations: list[dict[str, np.ndarray]]):
        return make_batch(np.stack([o["head"] for o in observations]), np.stack([o["wrist"] for o in observations]),
                          [env.instruction for env in self.envs], self.policy.config)

    def collect(self, num_chunks: int) -> RolloutBatch:
        """num_chunks chunks from every env -> GAE -> the flattened PPO batch ([T * N] steps)."""
        n, k = len(self.envs), self.policy.config.chunk_size
        heads, wrists, instructions, bins, log_probs, values = [], [], [], [], [], []
        rewards = torch.zeros((num_chunks, n))
        next_values = torch.zeros((num_chunks, n))
        terminated = torch.zeros((num_chunks, n), dtype=torch.bool)
        episode_end = torch.zeros((num_chunks, n), dtype=torch.bool)
        for t in range(num_chunks):
            batch = self._batch(self.observations)
            instructions.append([env.instruction for env in self.envs])
            actions, chunk_bins, chunk_logp, chunk_values = self.policy.act(
                batch, generator=self.generator, temperature=self.config.policy_temperature)
            heads.append(batch.head)
            wrists.append(batch.wrist)
            bins.append(chunk_bins)
            log_probs.append(chunk_logp)
            values.append(chunk_values)
            for i, env in enumerate(self.envs):
                obs, reward, term, trunc, info = env.step_chunk(actions[i, :k].numpy())
                self.env_steps += int(info["num_steps_taken"])
                rewards[t, i], terminated[t, i], episode_end[t, i] = reward, term, term or trunc
                if trunc and not term:  # the value of where the episode was cut off
                    next_values[t, i] = policy_values(self.policy, obs["head"][None], obs["wrist"][None],
                                                      [env.instruction])[0]
                if term or trunc:
                    self.finished.append(bool(info["success"]))
                    obs = self._reset(env)
                self.observations[i] = obs
        last = policy_values(self.policy, *self._stacked(self.observations), [env.instruction for env in self.envs])
        values_t = torch.stack(values)  # [T, N]
        following = torch.cat([values_t[1:], last[None]])  # V(s_{t+1}) when the episode goes on
        next_values = torch.where(episode_end, next_values, following)
        advantages, returns = compute_gae(rewards.T, values_t.T, next_values.T, terminated.T, episode_end.T,
                                          torch.ones((n, num_chunks), dtype=torch.bool), self.ppo.gamma,
                                          self.ppo.gae_lambda)
        flat_instr = [s for step in instructions for s in step]
        observations = make_batch(torch.cat(heads).numpy(), torch.cat(wrists).numpy(), flat_instr, self.policy.config)
        return RolloutBatch(observations, torch.cat(bins), torch.cat(log_probs), values_t.reshape(-1),
                            advantages.T.reshape(-1), returns.T.reshape(-1))

    @staticmethod
    def _stacked(observations: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        return np.stack([o["head"] for o in observations]), np.stack([o["wrist"] for o in observations])

    def evaluate(self) -> dict[str, float]:
        from trainer.evaluate import evaluate_in_training

        return evaluate_in_training(self.policy, self.out_dir, self.eval_config, "online_ppo", self.iteration)

    def log(self, record: dict) -> None:
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def train(self, progress: bool = True) -> VlaPolicy:
        from tqdm import tqdm

        if self.eval_config is not None:
            self.log({"iteration": 0, "real_env_steps": 0, **self.evaluate()})
        chunk_steps = len(self.envs) * self.policy.config.chunk_size
        bar = tqdm(total=self.config.total_env_steps, desc="online-ppo", unit="step", disable=not progress)
        final = False
        while self.env_steps < self.config.total_env_steps and not final:
            chunks_left = -(-(self.config.total_env_steps - self.env_steps) // chunk_steps)
            # What is left goes into one rollout when it would leave less than half a rollout: a runt rollout
            # gets as many PPO epochs as a full one on a few samples (measured: approx KL 0.12 on a last rollout
            # of 58 steps against ~0.015 on full ones). A final rollout may fall a few steps short of the budget
            # when episodes end inside its chunks.
            final = 2 * chunks_left < 3 * self.config.chunks_per_rollout
            num_chunks = chunks_left if final else self.config.chunks_per_rollout
            before, started = self.env_steps, time.perf_counter()
            batch = self.collect(num_chunks)
            collect_seconds = time.perf_counter() - started
            stats = {f"ppo/{k}": v for k, v in self.learner.update(batch).items()}
            self.iteration += 1
            recent = self.finished[-50:]
            record = {"iteration": self.iteration, "real_env_steps": self.env_steps, **stats,
                      "train/episodes": len(self.finished),
                      "train/recent_success": float(np.mean(recent)) if recent else 0.0,
                      "collect/seconds": collect_seconds}
            done = final or self.env_steps >= self.config.total_env_steps
            if self.eval_config is not None and (self.iteration % self.config.eval_every == 0 or done):
                record.update(self.evaluate())
            self.log(record)
            bar.update(self.env_steps - before)
            bar.set_postfix(recent_success=f"{record['train/recent_success']:.2f}")
        bar.close()
        save_policy(self.policy, self.out_dir / "policy", {"stage": "online_ppo", "iteration": self.iteration,
                                                            "real_env_steps": self.env_steps,
                                                            "config": asdict(self.config)})
        for env in self.envs:
            env.close()
        return self.policy


def build_parser() -> argparse.ArgumentParser:
    o = OnlinePPOConfig()
    parser = argparse.ArgumentParser(prog="vla-mbpo train-online-ppo", description=__doc__.splitlines()[0])
    parser.add_argument("--policy", type=Path, required=True, help="initial (SFT) policy checkpoint")
    parser.add_argument("--out", type=Path, required=True, help="run directory: metrics.jsonl and policy/")
    parser.add_argument("--total-env-steps", type=int, default=o.total_env_steps,
                        help="real control steps to spend (match the VLA-MBPO buffer's step count)")
    parser.add_argument("--env-id", default=o.env_id)
    parser.add_argument("--num-envs", type=int, default=o.num_envs)
    parser.add_argument("--chunks-per-rollout", type=int, default=o.chunks_per_rollout)
    add_ppo_arguments(parser)
    parser.add_argument("--policy-temperature", type=float, default=o.policy_temperature)
    add_eval_arguments(parser, eval_every=o.eval_every, eval_episodes=o.eval_episodes)
    parser.add_argument("--seed", type=int, default=o.seed)
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str]) -> int:
    import os

    os.environ.setdefault("MUJOCO_GL", "egl")  # the entry point picks the GL backend before MuJoCo loads
    args = build_parser().parse_args(argv)
    config = OnlinePPOConfig(env_id=args.env_id, total_env_steps=args.total_env_steps, num_envs=args.num_envs,
                             chunks_per_rollout=args.chunks_per_rollout, eval_every=args.eval_every,
                             eval_episodes=args.eval_episodes, seed=args.seed,
                             policy_temperature=args.policy_temperature)
    ppo, eval_config = ppo_config_from_args(args), eval_config_from_args(args)
    policy, _ = load_policy(args.policy)
    OnlinePPOTrainer(policy, args.out, config, ppo, eval_config).train(progress=not args.no_progress)
    print(f"wrote {args.out / 'policy'}")
    return 0
