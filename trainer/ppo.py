"""Chunk-level GAE and the clipped PPO losses (pure functions), plus the learner that applies them.

One "step" here is one action chunk: the reward of a step is the model's (or env's) binary success after
the chunk, `gamma` discounts per chunk (PAPER.md: 0.99 per chunk), and the critic bootstraps a branch
that ends without success. Shapes: B rows (branches or envs), T chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from trainer.config import PPOConfig
from trainer.policy import PolicyBatch, VlaPolicy, action_dim_log_probs, chunk_entropy, chunk_log_prob


def next_values_from(values: torch.Tensor, bootstrap: torch.Tensor) -> torch.Tensor:
    """V(s_{t+1}) for each step of a branch: values shifted left, the branch-end value last. [B, T], [B] -> [B, T]."""
    return torch.cat([values[:, 1:], bootstrap.unsqueeze(1)], dim=1)


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor, terminated: torch.Tensor,
                episode_end: torch.Tensor, valid: torch.Tensor, gamma: float,
                gae_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over chunks.

    rewards, values, next_values: [B, T] float; terminated (success latched: no bootstrap), episode_end
    (terminated or truncated: stop propagating), valid (the step was taken): [B, T] bool.
    delta_t = r_t + gamma * V(s_{t+1}) * (1 - terminated_t) - V(s_t);
    A_t = delta_t + gamma * lambda * (1 - episode_end_t) * A_{t+1}. Invalid steps get A = 0, return = 0.
    Returns (advantages [B, T], returns [B, T]).
    """
    if not rewards.shape == values.shape == next_values.shape == terminated.shape == episode_end.shape == valid.shape:
        raise ValueError(f"GAE inputs must share one [B, T] shape, got rewards {list(rewards.shape)}, values "
                         f"{list(values.shape)}, next_values {list(next_values.shape)}, terminated "
                         f"{list(terminated.shape)}, episode_end {list(episode_end.shape)}, valid {list(valid.shape)}")
    not_terminal = 1.0 - terminated.to(values.dtype)
    carries = 1.0 - episode_end.to(values.dtype)
    deltas = rewards + gamma * next_values * not_terminal - values
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        running = deltas[:, t] + gamma * gae_lambda * carries[:, t] * running
        advantages[:, t] = running
    mask = valid.to(values.dtype)
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def chunks_to_success(success: np.ndarray, chunk_size: int) -> np.ndarray:
    """For every observation of one recorded episode, how many chunks of its own behaviour led to the (latched)
    success: observation t < s (s = first success) is ceil((s - t) / chunk_size) chunks from it, t >= s is
    already successful (the next chunk pays: 1); inf without a success. success: bool[T+1] -> float64[T+1]"""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not success.any():
        return np.full(success.shape[0], np.inf)
    first = int(np.argmax(success))
    return np.maximum(1, -(-(first - np.arange(success.shape[0])) // chunk_size)).astype(np.float64)  # ceil, >= 1


def monte_carlo_chunk_returns(success: np.ndarray, chunk_size: int, gamma: float) -> np.ndarray:
    """Discounted chunk-level return of every observation of one recorded episode, under the behaviour that
    recorded it: reward 1 on the chunk that reaches the (latched) success, discounted per chunk, 0 without one:
    gamma**(chunks_to_success - 1). success: bool[T+1] -> float32[T+1]"""
    chunks = chunks_to_success(success, chunk_size)
    return np.where(np.isfinite(chunks), gamma ** (chunks - 1), 0.0).astype(np.float32)


def leave_one_out_advantages(returns: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each branch's return minus the mean return of the other branches of its start state (RLOO).

    The G branches of one start state are consecutive rows (B = num_states * G). The baseline never sees the
    branch's own outcome, so the advantage stays unbiased, and whatever the start state alone decides (a scene
    the reward judges done whatever the arm does) cancels within the group. returns: [B] -> [B]"""
    if group_size < 2:
        raise ValueError(f"a leave-one-out baseline needs group_size >= 2, got {group_size}")
    if returns.dim() != 1 or returns.shape[0] % group_size:
        raise ValueError(f"returns must be [num_states * {group_size}], got {list(returns.shape)}")
    groups = returns.reshape(-1, group_size)  # [num_states, G]
    others = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1)


def normalize_advantages(advantages: torch.Tensor, valid: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit (population) std over the valid entries; invalid entries become 0."""
    selected = advantages[valid]
    if selected.numel() == 0:
        return torch.zeros_like(advantages)
    mean = selected.mean()
    std = selected.std(unbiased=False)
    return torch.where(valid, (advantages - mean) / (std + eps), torch.zeros_like(advantages))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1.0)


@dataclass(frozen=True)
class ActorLoss:
    loss: torch.Tensor  # scalar, to minimise
    clip_fraction: torch.Tensor  # scalar: share of valid ratios (steps, or steps x dims) outside [1 - clip, 1 + clip]
    approx_kl: torch.Tensor  # scalar: mean over valid steps of (ratio - 1) - log ratio (k3), summed over dims


def ppo_actor_loss(new_log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                   valid: torch.Tensor, clip_ratio: float) -> ActorLoss:
    """Clipped surrogate, both sides: -mean(min(r A, clip(r, 1 - c, 1 + c) A)) over valid steps.

    Log-probs [N]: one ratio per step (chunk). Log-probs [N, D]: one ratio per action dim, each clipped on its
    own against the step's advantage, the step's surrogate the sum over its D dims (equal to the chunk form's
    gradient while no ratio is clipped). advantages, valid: [N]."""
    log_ratio = new_log_probs - old_log_probs
    ratio = log_ratio.exp()
    per_dim = ratio.dim() == 2
    step_advantages = advantages.unsqueeze(-1) if per_dim else advantages
    unclipped = ratio * step_advantages
    clipped = ratio.clamp(1.0 - clip_ratio, 1.0 + clip_ratio) * step_advantages
    surrogate = torch.minimum(unclipped, clipped)
    loss = -masked_mean(surrogate.sum(-1) if per_dim else surrogate, valid)
    with torch.no_grad():
        outside = ((ratio - 1.0).abs() > clip_ratio).to(ratio.dtype)
        kl = (ratio - 1.0) - log_ratio
        clip_fraction = masked_mean(outside.mean(-1) if per_dim else outside, valid)
        approx_kl = masked_mean(kl.sum(-1) if per_dim else kl, valid)
    return ActorLoss(loss=loss, clip_fraction=clip_fraction, approx_kl=approx_kl)


def ppo_critic_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, valid: torch.Tensor,
                    value_clip: float, huber_delta: float) -> torch.Tensor:
    """Huber loss with value clipping: mean over valid of max(H(V - R), H(V_old + clip(V - V_old) - R))."""
    clipped_values = old_values + (values - old_values).clamp(-value_clip, value_clip)
    loss_unclipped = F.huber_loss(values, returns, reduction="none", delta=huber_delta)
    loss_clipped = F.huber_loss(clipped_values, returns, reduction="none", delta=huber_delta)
    return masked_mean(torch.maximum(loss_unclipped, loss_clipped), valid)


@dataclass(frozen=True)
class RolloutBatch:
    """Valid chunk steps of a refill, flattened: what one PPO refill trains on (N steps)."""

    observations: PolicyBatch  # N observations
    bins: torch.Tensor  # [N, D] int64: the chosen action bins
    old_log_probs: torch.Tensor  # [N]
    old_values: torch.Tensor  # [N]
    advantages: torch.Tensor  # [N], not yet normalised
    returns: torch.Tensor  # [N]

    def __len__(self) -> int:
        return int(self.bins.shape[0])


class PPOLearner:
    """AdamW with separate actor/critic learning rates; `updates_per_refill` minibatch steps per refill."""

    def __init__(self, policy: VlaPolicy, config: PPOConfig, seed: int = 0, temperature: float = 1.0) -> None:
        """`temperature`: the behaviour policy is softmax(logits / temperature), as sampled by `act`."""
        self.policy = policy
        self.config = config
        self.temperature = temperature
        self.actor_params = policy.actor_parameters()
        self.critic_params = policy.critic_parameters()
        self.optimizer = torch.optim.AdamW(
            [{"params": self.actor_params, "lr": config.actor_lr},
             {"params": self.critic_params, "lr": config.critic_lr}],
            weight_decay=config.weight_decay)
        self.generator = torch.Generator().manual_seed(seed)

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """Runs the refill's gradient steps; returns the mean of each loss statistic over them."""
        if len(batch) == 0:
            raise ValueError("PPO refill has no valid steps")
        everything = torch.ones(len(batch), dtype=torch.bool)
        advantages = normalize_advantages(batch.advantages, everything)
        old_log_probs = self._behaviour_dim_log_probs(batch) if self.config.ratio_per == "dim" else batch.old_log_probs
        self.policy.train()
        totals: dict[str, float] = {}
        for _ in range(self.config.updates_per_refill):
            size = min(self.config.minibatch_size, len(batch))
            idx = torch.randperm(len(batch), generator=self.generator)[:size]
            stats = self._step(batch, idx, advantages[idx], old_log_probs[idx])
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value
        self.policy.eval()
        return {key: value / self.config.updates_per_refill for key, value in totals.items()}

    def fit_critic(self, observations: PolicyBatch, returns: torch.Tensor) -> float:
        """One critic-only regression step (Huber, as in PPO, no value clipping) towards `returns` [N]; the
        actor is untouched (its parameters get no gradients). Returns the loss."""
        self.policy.train()
        with torch.no_grad():  # the critic sees the trunk's features behind a stop-gradient: no backbone graph
            features = self.policy.features(observations)
        loss = F.huber_loss(self.policy.critic_values(features), returns, delta=self.config.huber_delta)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.critic_params, self.config.max_grad_norm)
        self.optimizer.step()
        self.policy.eval()
        return float(loss.detach())

    @torch.no_grad()
    def _behaviour_dim_log_probs(self, batch: RolloutBatch, rows_per_pass: int = 512) -> torch.Tensor:
        """Per-dim log-probs [N, D] of the batch's bins under the policy as it acted (before this refill's first
        step, eval mode, the behaviour temperature); their sums must give the recorded chunk log-probs, or the
        batch was not drawn from this policy and a per-dim ratio would be against the wrong behaviour."""
        parts = []
        for start in range(0, len(batch), rows_per_pass):
            idx = torch.arange(start, min(start + rows_per_pass, len(batch)))
            logits = self.policy(batch.observations.index(idx)).logits / self.temperature
            parts.append(action_dim_log_probs(logits, batch.bins[idx]))
        per_dim = torch.cat(parts)  # [N, D]
        gap = float((per_dim.sum(-1) - batch.old_log_probs).abs().max())
        if gap > 1e-3:
            raise ValueError(f"the refill's recorded chunk log-probs differ from the policy's own by up to {gap:.3g}: "
                             "per-dim PPO ratios need the batch drawn by this policy at temperature "
                             f"{self.temperature}")
        return per_dim

    def _step(self, batch: RolloutBatch, idx: torch.Tensor, advantages: torch.Tensor,
              old_log_probs: torch.Tensor) -> dict[str, float]:
        """One minibatch step; `old_log_probs` [n] per chunk or [n, D] per dim (config.ratio_per)."""
        out = self.policy(batch.observations.index(idx))
        logits = out.logits / self.temperature  # [n, D, nb]
        valid = torch.ones(idx.shape[0], dtype=torch.bool)
        new_log_probs = (action_dim_log_probs(logits, batch.bins[idx]) if old_log_probs.dim() == 2
                         else chunk_log_prob(logits, batch.bins[idx]))
        actor = ppo_actor_loss(new_log_probs, old_log_probs, advantages, valid, self.config.clip_ratio)
        critic = ppo_critic_loss(out.values, batch.old_values[idx], batch.returns[idx], valid,
                                 self.config.value_clip, self.config.huber_delta)
        entropy = chunk_entropy(logits).mean()
        loss = actor.loss + critic - self.config.entropy_coef * entropy
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Clip each head on its own: the critic's large early Huber gradients must not shrink the actor's step.
        actor_norm = torch.nn.utils.clip_grad_norm_(self.actor_params, self.config.max_grad_norm)
        critic_norm = torch.nn.utils.clip_grad_norm_(self.critic_params, self.config.max_grad_norm)
        self.optimizer.step()
        return {"actor_loss": float(actor.loss.detach()), "critic_loss": float(critic.detach()),
                "clip_fraction": float(actor.clip_fraction), "approx_kl": float(actor.approx_kl),
                "entropy": float(entropy.detach()), "actor_grad_norm": float(actor_norm),
                "critic_grad_norm": float(critic_norm)}
