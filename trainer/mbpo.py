"""`vla-mbpo train`: VLA-MBPO, PPO on branched chunk rollouts imagined by the served world model.

First the critic is regressed on the real buffer's Monte-Carlo chunk returns (`--critic-warmup-steps`). Each
iteration: sample M start states uniformly over (episode, time step) of the real buffer; roll G
branches per state n chunks through the server; chunk-level GAE with critic bootstrap at the branch end;
`updates_per_refill` PPO minibatch steps. The only real interaction is the buffer itself (its step count
is logged as `real_env_steps`); with `--simulator` the branches are stepped in the real env instead
(trainer.sim_imagination: the upper bound of a perfect world model), and their steps are counted too.
Checkpoints (policy + optimiser + RNG) are written every iteration into OUT/latest, so `--resume` continues
a stopped run; metrics go to OUT/metrics.jsonl, one JSON per line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from trainer.cli_args import add_eval_arguments, add_ppo_arguments, eval_config_from_args, ppo_config_from_args
from trainer.config import ConfigError, EvalConfig, MBPOConfig, PolicyConfig, PPOConfig
from trainer.data import EpisodeDataset
from trainer.imagination import ImaginedRollouts, Imaginer, RecordedOrigin, StartState
from trainer.policy import PolicyBatch, VlaPolicy, load_policy, make_batch, save_policy
from trainer.ppo import (
    PPOLearner,
    RolloutBatch,
    chunks_to_success,
    compute_gae,
    leave_one_out_advantages,
    monte_carlo_chunk_returns,
    next_values_from,
)
from trainer.rollout_client import WorldModelClient

TRAINER_STATE = "trainer_state.pt"


class StartStateSampler:
    """Uniform (episode, t) start states from a recorded buffer, every episode kept in memory.

    Only observations where the task is not done yet are start states: a successful episode's success frame
    and the frames filmed after it (`--post-success-steps`, for the world model's reward labels) would start
    branches that are already finished. Every recorded step still counts as real interaction.
    """

    def __init__(self, data_dir: Path) -> None:
        probe = EpisodeDataset(data_dir)
        self.dataset = EpisodeDataset(data_dir, cache_episodes=max(1, len(probe)))
        self.real_env_steps = int(self.dataset.manifest["counts"]["steps"])
        self.unfinished_states = np.array([_unfinished_observations(self.dataset.load(i).success)
                                           for i in range(len(self.dataset))], dtype=np.int64)

    def sample(self, n: int, rng: np.random.Generator) -> list[StartState]:
        return [self._state(e, t) for e, t in self._draw(n, rng)]

    def sample_with_returns(self, n: int, rng: np.random.Generator, chunk_size: int,
                            gamma: float) -> tuple[list[StartState], np.ndarray]:
        """n uniform start states and the discounted chunk return the buffer's own behaviour got from each
        (trainer.ppo.monte_carlo_chunk_returns). -> (states, float32[n])"""
        drawn = self._draw(n, rng)
        returns = [monte_carlo_chunk_returns(self.dataset.load(e).success, chunk_size, gamma)[t] for e, t in drawn]
        return [self._state(e, t) for e, t in drawn], np.asarray(returns, dtype=np.float32).reshape(n)

    def real_success_within(self, chunk_size: int, horizon_chunks: int) -> float:
        """The fraction of the start states from which the buffer's own behaviour reached success within
        horizon_chunks chunks: the real counterpart of imagine/success_rate, with the recorded behaviour in
        place of the current policy (an episode that ended first counts as no success)."""
        chunks = [chunks_to_success(self.dataset.load(e).success, chunk_size)[:unfinished]
                  for e, unfinished in enumerate(self.unfinished_states)]
        hits = sum(int((c <= horizon_chunks).sum()) for c in chunks)
        return hits / int(self.unfinished_states.sum())

    def _draw(self, n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
        return self.dataset.sample_start_states(n, rng, self.unfinished_states)

    def _state(self, episode_index: int, t: int) -> StartState:
        episode = self.dataset.load(episode_index)
        return StartState(episode.instruction, episode.head[t], episode.wrist[t],
                          RecordedOrigin(episode.task, episode.seed, episode.actions[:t]))


def _unfinished_observations(success: np.ndarray) -> int:
    """How many leading observations of an episode come before its first success (all, without one)."""
    return int(np.argmax(success)) if success.any() else int(success.shape[0])


def rollouts_to_batch(rollouts: ImaginedRollouts, config: PPOConfig, policy_config: PolicyConfig,
                      group_size: int = 1, group_baseline: bool = False) -> tuple[RolloutBatch, dict[str, float]]:
    """Chunk-level GAE over each branch, then the valid steps flattened for PPO.

    `group_size`: the G consecutive branches of each start state. With `group_baseline` the first chunk's
    advantage is its lambda-return minus the mean lambda-return of the other G - 1 branches from the same real
    state, in place of the critic's V(s_0); later chunks, whose imagined states differ, keep the critic's GAE."""
    advantages, returns = compute_gae(rollouts.rewards, rollouts.values,
                                      next_values_from(rollouts.values, rollouts.bootstrap_values),
                                      rollouts.terminated, rollouts.terminated, rollouts.valid, config.gamma,
                                      config.gae_lambda)
    if group_baseline:
        advantages[:, 0] = leave_one_out_advantages(returns[:, 0], group_size)
    valid = rollouts.valid
    flat = valid.reshape(-1).numpy()
    b, t = valid.shape
    head = rollouts.head.reshape(b * t, *rollouts.head.shape[2:])[flat]
    wrist = rollouts.wrist.reshape(b * t, *rollouts.wrist.shape[2:])[flat]
    instructions = [rollouts.instructions[i // t] for i in np.flatnonzero(flat)]
    observations = make_batch(head, wrist, instructions, policy_config)
    batch = RolloutBatch(observations, rollouts.bins[valid], rollouts.log_probs[valid], rollouts.values[valid],
                         advantages[valid], returns[valid])
    succeeded = rollouts.terminated.any(1)  # [B] the model judged the branch a success
    stats = {"imagine/success_rate": float(succeeded.float().mean()),
             "imagine/success_prob_mean": float(rollouts.success_prob[valid].mean()),
             "imagine/valid_steps": int(valid.sum()),
             "ppo/advantage_mean": float(advantages[valid].mean()),
             "ppo/advantage_std": float(advantages[valid].std(unbiased=False)),
             "ppo/value_mean": float(rollouts.values[valid].mean()), "ppo/return_mean": float(returns[valid].mean())}
    if group_size > 1:  # only a group whose branches disagree can tell a good chunk from the start state's luck
        groups = succeeded.reshape(-1, group_size)  # [num_states, G]
        stats["imagine/mixed_groups"] = float((groups.any(1) & ~groups.all(1)).float().mean())
    return batch, stats


class MBPOTrainer:
    """One VLA-MBPO run: holds the policy, the PPO learner, the RNGs and the metrics file."""

    def __init__(self, policy: VlaPolicy, imaginer: Imaginer, sampler: StartStateSampler, out_dir: Path,
                 config: MBPOConfig, ppo: PPOConfig, eval_config: EvalConfig | None = None) -> None:
        """`imaginer`: `Imaginer(client)` over the rollout server, or the real env's `SimulatorImaginer`."""
        self.policy, self.imaginer, self.sampler, self.out_dir = policy, imaginer, sampler, out_dir
        self.config, self.ppo, self.eval_config = config, ppo, eval_config
        self.learner = PPOLearner(policy, ppo, seed=config.seed, temperature=config.policy_temperature)
        self.rng = np.random.default_rng(config.seed)
        self.generator = torch.Generator().manual_seed(config.seed + 1)
        self.iteration = 0
        out_dir.mkdir(parents=True, exist_ok=True)

    # ---- checkpoints --------------------------------------------------------------------------------
    def save(self) -> None:
        latest = self.out_dir / "latest"
        save_policy(self.policy, latest, {"stage": "mbpo", "iteration": self.iteration})
        torch.save({"iteration": self.iteration, "optimizer": self.learner.optimizer.state_dict(),
                    "learner_generator": self.learner.generator.get_state(), "generator": self.generator.get_state(),
                    "rng": self.rng.bit_generator.state, "config": asdict(self.config),
                    "imaginer": type(self.imaginer).__name__, "imaginer_real_env_steps": self.imaginer.real_env_steps,
                    "ppo_ratio_per": self.ppo.ratio_per},
                   latest / TRAINER_STATE)

    def resume(self) -> bool:
        """Loads OUT/latest if it exists; returns whether it did. A ConfigError when the run was stepped by the other
        kind of world model (served vs simulator) or clipped its PPO ratios the other way (per chunk vs per dim): its
        curve would mix two models or two objectives (states saved before ratio_per existed are not checked)."""
        latest = self.out_dir / "latest"
        if not (latest / TRAINER_STATE).is_file():
            return False
        state = torch.load(latest / TRAINER_STATE, weights_only=False)
        kind = type(self.imaginer).__name__
        if state.get("imaginer", kind) != kind:
            raise ConfigError(f"{latest} was trained with {state['imaginer']}, not {kind}: resume it the same way "
                              "(--server or --simulator) or pick a new --out")
        ratio_per = state.get("ppo_ratio_per", self.ppo.ratio_per)
        if ratio_per != self.ppo.ratio_per:
            raise ConfigError(f"{latest} was trained with PPO ratios per {ratio_per}, not per {self.ppo.ratio_per}: "
                              f"pass --ratio-per {ratio_per} to continue it or pick a new --out")
        policy, _ = load_policy(latest)
        self.policy.load_state_dict(policy.state_dict())
        self.learner.optimizer.load_state_dict(state["optimizer"])
        self.learner.generator.set_state(state["learner_generator"])
        self.generator.set_state(state["generator"])
        self.rng.bit_generator.state = state["rng"]
        self.iteration = int(state["iteration"])
        self.imaginer.real_env_steps = int(state.get("imaginer_real_env_steps", 0))
        return True

    # ---- the loop -----------------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def evaluate(self) -> dict[str, float]:
        """Real-env success of the current policy (the eval config's seeded episodes)."""
        from trainer.evaluate import evaluate_in_training

        return evaluate_in_training(self.policy, self.out_dir, self.eval_config, "mbpo", self.iteration)

    def warm_up_critic(self) -> dict[str, float]:
        """Regresses the critic on the real buffer's Monte-Carlo chunk returns before any imagined update.

        A fresh critic (SFT never trains it) makes every advantage noise, and with a sparse success reward
        that noise drowns the few imagined successes; the buffer's own outcomes are the honest first estimate.
        """
        config, chunk = self.config, self.policy.config.chunk_size
        losses = []
        for _ in range(config.critic_warmup_steps):
            starts, returns = self.sampler.sample_with_returns(self.ppo.minibatch_size, self.rng, chunk, self.ppo.gamma)
            batch = make_batch(np.stack([s.head for s in starts]), np.stack([s.wrist for s in starts]),
                               [s.instruction for s in starts], self.policy.config)
            losses.append(self.learner.fit_critic(batch, torch.from_numpy(returns)))
        if not losses:
            return {}
        tail = losses[-max(1, len(losses) // 10):]
        return {"critic_warmup/steps": len(losses), "critic_warmup/first_loss": losses[0],
                "critic_warmup/final_loss": float(np.mean(tail))}

    def should_evaluate(self) -> bool:
        return self.eval_config is not None and (self.iteration % self.config.eval_every == 0
                                                 or self.iteration == self.config.iterations)

    def run_iteration(self) -> dict[str, float]:
        config = self.config
        started, retries_before = time.perf_counter(), self.imaginer.num_capacity_retries
        rollout_parts = []
        for s in range(0, config.num_start_states, config.states_per_wave):
            starts = self.sampler.sample(min(config.states_per_wave, config.num_start_states - s), self.rng)
            seed_base = int(self.rng.integers(0, 2**62))
            rollout_parts.append(self.imaginer.rollout(
                self.policy, starts, config.branches_per_state, config.horizon_chunks, self.generator, seed_base,
                config.world_model_temperature, config.reward_threshold, config.policy_temperature))
        imagine_seconds = time.perf_counter() - started
        batches = [rollouts_to_batch(part, self.ppo, self.policy.config, config.branches_per_state,
                                     config.group_baseline) for part in rollout_parts]
        batch = _concat_batches([b for b, _ in batches])
        chunks = sum(int(part.valid.sum()) for part in rollout_parts)
        stats = pool_wave_stats([s for _, s in batches], [part.num_branches for part in rollout_parts],
                                config.branches_per_state)
        update_started = time.perf_counter()
        stats.update({f"ppo/{k}": v for k, v in self.learner.update(batch).items()})
        stats.update({"imagine/branches": sum(p.num_branches for p in rollout_parts), "imagine/chunks": chunks,
                      "imagine/seconds": imagine_seconds, "imagine/chunks_per_second": chunks / imagine_seconds,
                      "imagine/capacity_retries": self.imaginer.num_capacity_retries - retries_before,
                      "update/seconds": time.perf_counter() - update_started})
        return stats

    def train(self, progress: bool = True) -> VlaPolicy:
        from tqdm import tqdm

        if self.iteration == 0:
            record = {"buffer/real_success_within_horizon": self.sampler.real_success_within(
                self.policy.config.chunk_size, self.config.horizon_chunks), **self.warm_up_critic()}
            if self.eval_config is not None:
                record.update(self.evaluate())
            self.log({"iteration": 0, "real_env_steps": self.sampler.real_env_steps, **record})
        bar = tqdm(total=self.config.iterations, initial=self.iteration, desc="vla-mbpo", disable=not progress)
        while self.iteration < self.config.iterations:
            stats = self.run_iteration()
            self.iteration += 1
            record = {"iteration": self.iteration, **stats,
                      "real_env_steps": self.sampler.real_env_steps + self.imaginer.real_env_steps}
            if self.should_evaluate():
                record.update(self.evaluate())
            self.log(record)
            self.save()
            bar.update(1)
            shown = {"imag_succ": f"{stats['imagine/success_rate']:.2f}"}
            if "real/success_mean" in record:
                shown["real"] = f"{record['real/success_mean']:.2f}"
            bar.set_postfix(shown)
        bar.close()
        save_policy(self.policy, self.out_dir / "policy", {"stage": "mbpo", "iteration": self.iteration,
                                                            "mbpo_config": asdict(self.config),
                                                            "ppo_config": asdict(self.ppo)})
        return self.policy


def _concat_batches(batches: list[RolloutBatch]) -> RolloutBatch:
    obs = PolicyBatch(torch.cat([b.observations.head for b in batches]),
                      torch.cat([b.observations.wrist for b in batches]),
                      torch.cat([b.observations.instruction for b in batches]))
    return RolloutBatch(obs, torch.cat([b.bins for b in batches]), torch.cat([b.old_log_probs for b in batches]),
                        torch.cat([b.old_values for b in batches]), torch.cat([b.advantages for b in batches]),
                        torch.cat([b.returns for b in batches]))


_PER_BRANCH_STATS = ("imagine/success_rate",)
_PER_START_STATE_STATS = ("imagine/mixed_groups",)


def pool_wave_stats(stats: list[dict[str, float]], num_branches: list[int], group_size: int) -> dict[str, float]:
    """One iteration's statistics from its waves' `rollouts_to_batch` stats, as if the waves were one batch.

    Each statistic is pooled in its own unit: a rate over branches by branches, over start states by start states
    (`num_branches / group_size` each), a mean over valid steps by valid steps, and the advantage's standard
    deviation over all valid steps of the iteration (not a mean of the waves' deviations)."""
    steps = [s["imagine/valid_steps"] for s in stats]
    states = [n // group_size for n in num_branches]
    out = {}
    for key in stats[0]:
        weights = num_branches if key in _PER_BRANCH_STATS else states if key in _PER_START_STATE_STATS else steps
        out[key] = statistics.fmean([s[key] for s in stats], weights)  # every wave has >= 1 branch and step
    mean_of_squares = statistics.fmean([s["ppo/advantage_std"] ** 2 + s["ppo/advantage_mean"] ** 2 for s in stats],
                                       steps)
    out["ppo/advantage_std"] = math.sqrt(max(0.0, mean_of_squares - out["ppo/advantage_mean"] ** 2))
    out["imagine/valid_steps"] = float(sum(steps))
    return out


def build_parser() -> argparse.ArgumentParser:
    m = MBPOConfig()
    parser = argparse.ArgumentParser(prog="vla-mbpo train", description=__doc__.splitlines()[0])
    world = parser.add_mutually_exclusive_group(required=True)
    world.add_argument("--server", help="rollout server HOST:PORT")
    world.add_argument("--simulator", action="store_true",
                       help="step the branches in the real MuJoCo env in place of a world model (the upper bound a "
                            "perfect model gives this loop; spends real interaction, counted in real_env_steps)")
    parser.add_argument("--token", default=None, help="bearer token, if the server requires one")
    parser.add_argument("--data", type=Path, required=True, help="real replay buffer (recorded episodes)")
    parser.add_argument("--policy", type=Path, required=True, help="initial (SFT) policy checkpoint")
    parser.add_argument("--out", type=Path, required=True, help="run directory: metrics, checkpoints, final policy")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/latest")
    parser.add_argument("--iterations", type=int, default=m.iterations)
    parser.add_argument("--num-start-states", "-M", type=int, default=m.num_start_states)
    parser.add_argument("--branches-per-state", "-G", type=int, default=m.branches_per_state)
    parser.add_argument("--horizon-chunks", "-n", type=int, default=m.horizon_chunks)
    parser.add_argument("--group-baseline", action="store_true",
                        help="first-chunk advantage against the other G - 1 branches of the same start state (G >= 2)")
    parser.add_argument("--states-per-wave", type=int, default=m.states_per_wave,
                        help="start states alive on the server (or in the simulator) at once")
    parser.add_argument("--wm-temperature", type=float, default=m.world_model_temperature)
    parser.add_argument("--reward-threshold", type=float, default=m.reward_threshold)
    parser.add_argument("--policy-temperature", type=float, default=m.policy_temperature,
                        help="the trained policy is softmax(logits / T); T < 1 explores nearer the SFT mode")
    parser.add_argument("--critic-warmup-steps", type=int, default=m.critic_warmup_steps,
                        help="critic regression steps on the buffer's Monte-Carlo returns before the first update")
    add_ppo_arguments(parser)
    add_eval_arguments(parser, eval_every=m.eval_every, eval_episodes=m.eval_episodes)
    parser.add_argument("--seed", type=int, default=m.seed)
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str]) -> int:
    os.environ.setdefault("MUJOCO_GL", "egl")  # the entry point picks the GL backend before MuJoCo loads
    args = build_parser().parse_args(argv)
    try:
        config = MBPOConfig(iterations=args.iterations, num_start_states=args.num_start_states,
                            branches_per_state=args.branches_per_state, horizon_chunks=args.horizon_chunks,
                            group_baseline=args.group_baseline,
                            world_model_temperature=args.wm_temperature, reward_threshold=args.reward_threshold,
                            policy_temperature=args.policy_temperature, critic_warmup_steps=args.critic_warmup_steps,
                            states_per_wave=args.states_per_wave, eval_every=args.eval_every,
                            eval_episodes=args.eval_episodes, seed=args.seed)
        ppo, eval_config = ppo_config_from_args(args), eval_config_from_args(args)
        if args.simulator and args.token is not None:
            raise ConfigError("--token is for a rollout server; --simulator steps the real env in this process")
    except ConfigError as exc:
        print(f"vla-mbpo train: error: {exc}", file=sys.stderr)
        return 2
    policy, _ = load_policy(args.policy)
    sampler = StartStateSampler(args.data)
    with contextlib.ExitStack() as stack:
        if args.simulator:
            from trainer.sim_imagination import SimulatorImaginer  # imports MuJoCo: only after MUJOCO_GL is set

            meta = sampler.dataset.manifest
            imaginer = SimulatorImaginer(policy.config.chunk_size, meta["image_height"], meta["image_width"])
            stack.callback(imaginer.close)
        else:
            client = stack.enter_context(WorldModelClient(args.server, token=args.token))
            client.wait_ready(timeout=60.0)
            imaginer = Imaginer(client)
        trainer = MBPOTrainer(policy, imaginer, sampler, args.out, config, ppo, eval_config)
        try:
            resumed = args.resume and trainer.resume()
        except ConfigError as exc:
            print(f"vla-mbpo train: error: {exc}", file=sys.stderr)
            return 2
        if resumed:
            print(f"resumed {args.out} at iteration {trainer.iteration}", file=sys.stderr)
        elif (args.out / "metrics.jsonl").exists():
            print(f"vla-mbpo train: error: {args.out} already holds a run; pass --resume or pick a new --out",
                  file=sys.stderr)
            return 2
        trainer.train(progress=not args.no_progress)
    print(f"wrote {args.out / 'policy'}")
    return 0
