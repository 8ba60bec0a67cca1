"""Command-line options shared by the RL entry points (`vla-mbpo train`, `vla-mbpo train-online-ppo`).

Entry points only: library code takes the typed configs these build, never an argparse namespace.
"""

from __future__ import annotations

import argparse

from trainer.config import RATIO_PER, EvalConfig, PPOConfig


def add_ppo_arguments(parser: argparse.ArgumentParser) -> None:
    """The PPO learner's options, defaulting to PPOConfig()."""
    p = PPOConfig()
    parser.add_argument("--updates-per-refill", type=int, default=p.updates_per_refill)
    parser.add_argument("--minibatch-size", type=int, default=p.minibatch_size)
    parser.add_argument("--actor-lr", type=float, default=p.actor_lr)
    parser.add_argument("--critic-lr", type=float, default=p.critic_lr)
    parser.add_argument("--clip-ratio", type=float, default=p.clip_ratio)
    parser.add_argument("--ratio-per", choices=RATIO_PER, default=p.ratio_per,
                        help="clip one PPO ratio per chunk (the joint of its action dims) or one per action dim")


def ppo_config_from_args(args: argparse.Namespace) -> PPOConfig:
    return PPOConfig(updates_per_refill=args.updates_per_refill, minibatch_size=args.minibatch_size,
                     actor_lr=args.actor_lr, critic_lr=args.critic_lr, clip_ratio=args.clip_ratio,
                     ratio_per=args.ratio_per)


def add_eval_arguments(parser: argparse.ArgumentParser, eval_every: int, eval_episodes: int) -> None:
    """Periodic real-env evaluation during training (defaults from the trainer's own config)."""
    e = EvalConfig()
    parser.add_argument("--eval-every", type=int, default=eval_every)
    parser.add_argument("--eval-episodes", type=int, default=eval_episodes,
                        help="real episodes per task family at each evaluation (0: no evaluation)")
    parser.add_argument("--eval-seed", type=int, default=e.seed)
    parser.add_argument("--eval-workers", type=int, default=e.num_workers)
    parser.add_argument("--eval-temperature", type=float, default=None, metavar="T",
                        help="evaluate with actions sampled from softmax(logits / T) (default: the mode)")


def eval_config_from_args(args: argparse.Namespace) -> EvalConfig | None:
    """None when evaluation is off (--eval-episodes 0)."""
    if args.eval_episodes <= 0:
        return None
    sampled = args.eval_temperature is not None
    return EvalConfig(episodes=args.eval_episodes, seed=args.eval_seed, num_workers=args.eval_workers,
                      greedy=not sampled, temperature=args.eval_temperature if sampled else EvalConfig.temperature)
