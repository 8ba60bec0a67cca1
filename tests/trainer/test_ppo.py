"""Chunk-level GAE and the PPO losses on hand-computed cases (exact numbers)."""

import numpy as np
import pytest
import torch

from trainer.config import ConfigError, PolicyConfig, PPOConfig
from trainer.policy import PolicyBatch, VlaPolicy, chunk_log_prob, encode_instructions
from trainer.ppo import (
    PPOLearner,
    RolloutBatch,
    chunks_to_success,
    compute_gae,
    leave_one_out_advantages,
    monte_carlo_chunk_returns,
    next_values_from,
    normalize_advantages,
    ppo_actor_loss,
    ppo_critic_loss,
)


def t(rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype)


def test_gae_success_bootstrap_and_masking_by_hand():
    # gamma = lambda = 0.5. Row 0: success after chunk 1 (no bootstrap). Row 1: no success, bootstrap V = 6.
    # Row 2: success after chunk 0, chunk 1 never taken.
    rewards = t([[0, 1], [0, 0], [1, 0]])
    values = t([[1, 2], [1, 2], [0.5, 9]])
    next_values = next_values_from(values, t([4, 6, 9]))
    assert next_values.tolist() == [[2, 4], [2, 6], [9, 9]]
    terminated = t([[0, 1], [0, 0], [1, 0]], torch.bool)
    valid = t([[1, 1], [1, 1], [1, 0]], torch.bool)
    adv, ret = compute_gae(rewards, values, next_values, terminated, terminated, valid, gamma=0.5, gae_lambda=0.5)
    # row 0: d1 = 1 - 2 = -1; d0 = 0 + 0.5*2 - 1 = 0; A0 = 0 + 0.25*(-1)
    # row 1: d1 = 0.5*6 - 2 = 1; d0 = 0; A0 = 0.25
    # row 2: d0 = 1 - 0.5 = 0.5, no propagation past success; step 1 masked
    assert adv.tolist() == [[-0.25, -1.0], [0.25, 1.0], [0.5, 0.0]]
    assert ret.tolist() == [[0.75, 1.0], [1.25, 3.0], [1.0, 0.0]]


def test_gae_with_paper_discounts():
    values = t([[0.5, 0.6]], torch.float64)
    zeros = torch.zeros((1, 2), dtype=torch.bool)
    adv, ret = compute_gae(torch.zeros((1, 2), dtype=torch.float64), values,
                           next_values_from(values, t([0.7], torch.float64)), zeros, zeros,
                           torch.ones((1, 2), dtype=torch.bool), gamma=0.99, gae_lambda=0.95)
    # d1 = 0.99 * 0.7 - 0.6 = 0.093; d0 = 0.99 * 0.6 - 0.5 = 0.094; A0 = 0.094 + 0.9405 * 0.093
    assert adv[0].tolist() == pytest.approx([0.1814665, 0.093], abs=1e-12)
    assert ret[0].tolist() == pytest.approx([0.6814665, 0.693], abs=1e-12)


def test_gae_truncation_bootstraps_but_does_not_propagate():
    # Step 0 ends a truncated episode (bootstrap from its final observation, V = 4); step 1 starts a new one.
    episode_end = t([[1, 0]], torch.bool)
    adv, _ = compute_gae(torch.zeros((1, 2)), t([[1, 2]]), t([[4, 3]]), torch.zeros((1, 2), dtype=torch.bool),
                         episode_end, torch.ones((1, 2), dtype=torch.bool), gamma=0.5, gae_lambda=0.5)
    assert adv.tolist() == [[1.0, -0.5]]


def test_gae_rejects_mismatched_shapes():
    expected = r"GAE inputs must share one \[B, T\] shape, got rewards \[1, 2\], values \[1, 3\]"
    with pytest.raises(ValueError, match=expected):
        z = torch.zeros((1, 2))
        compute_gae(z, torch.zeros((1, 3)), z, z.bool(), z.bool(), z.bool(), 0.9, 0.9)


def test_leave_one_out_advantages_by_hand():
    # two start states of three branches: each branch against the mean of its two siblings
    got = leave_one_out_advantages(t([1.5, 0.0, 1.5, 0.0, 0.0, 0.5]), 3)
    assert got.tolist() == [0.75, -1.5, 0.75, -0.25, -0.25, 0.5]
    # what the start state alone decides cancels: the same outcome for every branch gives zero advantage
    assert leave_one_out_advantages(t([1.0, 1.0, 0.0, 0.0]), 2).tolist() == [0.0, 0.0, 0.0, 0.0]


def test_leave_one_out_advantages_rejects_bad_groups():
    with pytest.raises(ValueError, match="group_size >= 2"):
        leave_one_out_advantages(t([1.0, 0.0]), 1)
    with pytest.raises(ValueError, match=r"returns must be \[num_states \* 2\], got \[3\]"):
        leave_one_out_advantages(t([1.0, 0.0, 0.5]), 2)


def test_normalize_advantages_over_valid_steps_only():
    out = normalize_advantages(t([1, 2, 3, 100]), t([1, 1, 1, 0], torch.bool))
    std = (2 / 3) ** 0.5
    assert out.tolist() == pytest.approx([-1 / std, 0.0, 1 / std, 0.0], abs=1e-6)
    assert normalize_advantages(t([5.0]), t([0], torch.bool)).tolist() == [0.0]


def test_actor_loss_clips_both_sides():
    new = torch.log(t([1.2, 0.8, 1.05, 50.0]))
    old = torch.zeros(4)
    adv = t([1.0, 1.0, -2.0, 1000.0])
    valid = t([1, 1, 1, 0], torch.bool)
    out = ppo_actor_loss(new, old, adv, valid, clip_ratio=0.1)
    # terms: min(1.2, 1.1) = 1.1; min(0.8, 0.9) = 0.8; min(-2.1, -2.1) = -2.1; the 4th is masked
    assert float(out.loss) == pytest.approx(0.2 / 3, abs=1e-6)
    assert float(out.clip_fraction) == pytest.approx(2 / 3, abs=1e-6)
    expected_kl = ((0.2 - torch.log(t(1.2))) + (-0.2 - torch.log(t(0.8))) + (0.05 - torch.log(t(1.05)))) / 3
    assert float(out.approx_kl) == pytest.approx(float(expected_kl), abs=1e-6)


def test_per_dim_actor_loss_clips_each_dim_against_the_step_advantage():
    old = torch.log(t([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]))
    new = torch.log(t([[0.6, 0.4], [0.6, 0.4], [0.9, 0.9]]))
    adv = t([1.0, -1.0, 7.0])
    valid = t([1, 1, 0], torch.bool)
    out = ppo_actor_loss(new, old, adv, valid, clip_ratio=0.1)
    # ratios 1.2 and 0.8 per dim. A = 1: min(1.2, 1.1) + min(0.8, 0.9) = 1.9; A = -1: min(-1.2, -1.1) +
    # min(-0.8, -0.9) = -2.1; the third step is masked. (One chunk ratio 0.96 would clip neither: loss 0.)
    assert float(out.loss) == pytest.approx(-(1.9 - 2.1) / 2, abs=1e-6)
    assert float(out.clip_fraction) == 1.0
    kl_per_step = float((0.2 - torch.log(t(1.2))) + (-0.2 - torch.log(t(0.8))))
    assert float(out.approx_kl) == pytest.approx(kl_per_step, abs=1e-6)
    chunk = ppo_actor_loss(new.sum(-1), old.sum(-1), adv, valid, clip_ratio=0.1)
    assert float(chunk.loss) == pytest.approx(-(0.96 - 0.96) / 2, abs=1e-6) and float(chunk.clip_fraction) == 0.0


def test_per_dim_and_chunk_surrogates_start_with_the_same_gradient():
    old = torch.log(t([[0.5, 0.25], [0.5, 0.5]]))
    adv, valid = t([1.0, -2.0]), t([1, 1], torch.bool)
    per_dim, chunk = old.clone().requires_grad_(True), old.clone().requires_grad_(True)
    ppo_actor_loss(per_dim, old, adv, valid, 0.1).loss.backward()
    ppo_actor_loss(chunk.sum(-1), old.sum(-1), adv, valid, 0.1).loss.backward()
    # at r = 1, d/dlogp_d of -mean(A r) is -A / N for every dim, whether r is per dim or the chunk's joint
    assert per_dim.grad.tolist() == chunk.grad.tolist() == [[-0.5, -0.5], [1.0, 1.0]]
    # a step later they part: per dim each dim's own ratio scales its gradient, per chunk the joint's does
    new = torch.log(t([[0.52, 0.26], [0.49, 0.5]]))
    per_dim, chunk = new.clone().requires_grad_(True), new.clone().requires_grad_(True)
    ppo_actor_loss(per_dim, old, adv, valid, 0.1).loss.backward()
    ppo_actor_loss(chunk.sum(-1), old.sum(-1), adv, valid, 0.1).loss.backward()
    assert per_dim.grad.flatten().tolist() == pytest.approx([-0.52, -0.52, 0.98, 1.0], abs=1e-6)
    assert chunk.grad.flatten().tolist() == pytest.approx([-0.5408, -0.5408, 0.98, 0.98], abs=1e-6)


def test_actor_loss_gradient_is_zero_when_clipped_in_the_favourable_direction():
    new = torch.log(t([1.2, 0.8])).requires_grad_(True)
    ppo_actor_loss(new, torch.zeros(2), t([1.0, -1.0]), t([1, 1], torch.bool), 0.1).loss.backward()
    assert new.grad.tolist() == [0.0, 0.0]


def test_critic_loss_huber_with_value_clipping():
    values, old = t([1.0, 3.0, 7.0]), t([0.0, 2.9, 0.0])
    returns = t([2.0, 30.0, 7.0])
    valid = t([1, 1, 0], torch.bool)
    loss = ppo_critic_loss(values, old, returns, valid, value_clip=0.5, huber_delta=10.0)
    # el 0: clipped value 0.5 -> H(-1.5) = 1.125 > H(-1) = 0.5; el 1: |err| 27 > delta -> 10 * (27 - 5) = 220
    assert float(loss) == pytest.approx((1.125 + 220.0) / 2, abs=1e-3)


TINY_LEARNER_POLICY = PolicyConfig(conv_channels=(4, 8), image_size=16, hidden_dim=32, image_feature_dim=16,
                                   text_feature_dim=8, text_embed_dim=8, critic_hidden_dim=8, chunk_size=2, num_bins=5)


def acted_batch() -> tuple[VlaPolicy, RolloutBatch]:
    """A tiny policy (eval mode) and a 4-row batch it drew at temperature 0.5, with fixed advantages."""
    torch.manual_seed(0)
    policy = VlaPolicy(TINY_LEARNER_POLICY).eval()
    obs = PolicyBatch(torch.zeros((4, 16, 16, 3), dtype=torch.uint8), torch.zeros((4, 16, 16, 3), dtype=torch.uint8),
                      encode_instructions(["push"] * 4, TINY_LEARNER_POLICY.max_instruction_bytes))
    _, bins, log_probs, values = policy.act(obs, torch.Generator().manual_seed(0), temperature=0.5)
    return policy, RolloutBatch(obs, bins, log_probs, values, t([1.0, -1.0, 0.5, -0.5]), values)


@pytest.mark.parametrize("ratio_per", ["chunk", "dim"])
def test_learner_moves_log_prob_towards_positive_advantage(ratio_per):
    torch.manual_seed(0)
    config = TINY_LEARNER_POLICY
    policy = VlaPolicy(config)
    n = 8
    obs = PolicyBatch(torch.randint(0, 256, (n, 16, 16, 3), dtype=torch.uint8),
                      torch.randint(0, 256, (n, 16, 16, 3), dtype=torch.uint8),
                      encode_instructions(["lift the cube"] * n, config.max_instruction_bytes))
    bins = torch.randint(0, 5, (n, config.num_action_tokens))
    with torch.no_grad():
        out = policy(obs)
        old = chunk_log_prob(out.logits, bins)
    adv = t([1.0, -1.0] * 4)
    batch = RolloutBatch(obs, bins, old, out.values, adv, torch.ones(n))
    learner = PPOLearner(policy, PPOConfig(actor_lr=1e-3, updates_per_refill=5, minibatch_size=8,
                                           ratio_per=ratio_per))
    stats = learner.update(batch)
    assert set(stats) == {"actor_loss", "critic_loss", "clip_fraction", "approx_kl", "entropy", "actor_grad_norm",
                          "critic_grad_norm"}
    with torch.no_grad():
        new = chunk_log_prob(policy(obs).logits, bins)
    # First-order guarantee of a small step: the surrogate mean(ratio * A) rises from its starting value 0.
    assert float(((new - old).exp() * adv).mean()) > 0.01


def test_ppo_config_validation_names_the_field():
    with pytest.raises(ConfigError, match=r"invalid PPOConfig: clip_ratio must lie in \(0, 1\), got 1.5"):
        PPOConfig(clip_ratio=1.5)
    with pytest.raises(ConfigError, match=r"gamma must lie in \(0, 1\], got 0"):
        PPOConfig(gamma=0)
    with pytest.raises(ConfigError, match=r"ratio_per must be one of \('chunk', 'dim'\), got 'token'"):
        PPOConfig(ratio_per="token")


@pytest.mark.parametrize("ratio_per", ["chunk", "dim"])
def test_learner_first_step_has_unit_ratio_under_the_same_temperature(ratio_per):
    policy, batch = acted_batch()
    learner = PPOLearner(policy, PPOConfig(updates_per_refill=1, minibatch_size=4, ratio_per=ratio_per),
                         temperature=0.5)
    stats = learner.update(batch)
    assert stats["approx_kl"] == pytest.approx(0.0, abs=1e-6) and stats["clip_fraction"] == 0.0


def test_per_dim_learner_refuses_a_batch_another_policy_drew():
    policy, batch = acted_batch()  # drawn at temperature 0.5, offered to a learner at 1.0
    learner = PPOLearner(policy, PPOConfig(updates_per_refill=1, minibatch_size=4, ratio_per="dim"), temperature=1.0)
    with pytest.raises(ValueError, match="per-dim PPO ratios need the batch drawn by this policy at temperature 1.0"):
        learner.update(batch)


def test_monte_carlo_chunk_returns_by_hand():
    success = np.array([False] * 5 + [True, True])  # first success at observation 5
    # chunks to the success from t = 0..6 with k = 2: 3, 2, 2, 1, 1, then already successful (1 chunk pays)
    assert chunks_to_success(success, chunk_size=2).tolist() == [3, 2, 2, 1, 1, 1, 1]
    assert np.isinf(chunks_to_success(np.zeros(4, dtype=bool), chunk_size=2)).all()
    assert monte_carlo_chunk_returns(success, chunk_size=2, gamma=0.5).tolist() == [0.25, 0.5, 0.5, 1, 1, 1, 1]
    assert monte_carlo_chunk_returns(np.zeros(4, dtype=bool), chunk_size=2, gamma=0.5).tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        monte_carlo_chunk_returns(success, chunk_size=0, gamma=0.5)


def test_fit_critic_regresses_values_and_leaves_the_actor_alone():
    torch.manual_seed(0)
    config = TINY_LEARNER_POLICY
    policy = VlaPolicy(config)
    obs = PolicyBatch(torch.randint(0, 256, (8, 16, 16, 3), dtype=torch.uint8),
                      torch.randint(0, 256, (8, 16, 16, 3), dtype=torch.uint8),
                      encode_instructions(["lift the cube"] * 8, config.max_instruction_bytes))
    returns = t([1.0, 0.0] * 4)
    actor_before = [p.detach().clone() for p in policy.actor_parameters()]
    learner = PPOLearner(policy, PPOConfig(critic_lr=1e-2))
    losses = [learner.fit_critic(obs, returns) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.equal(a, b) for a, b in zip(actor_before, policy.actor_parameters(), strict=True))
