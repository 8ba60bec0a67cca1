"""Sampler: the decoding plan, the counter-based RNG and the restricted, truncated draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_helpers import tiny_layout_with

from engine.sampler import DecodingPlan, SamplingBatch, sample, uniform_draws, yes_probability


def batch(n: int, low=0, high=10, temperature=1.0, top_k=0, top_p=1.0, seeds=None, positions=None) -> SamplingBatch:
    return SamplingBatch(
        low=np.full(n, low, np.int64), high=np.full(n, high, np.int64),
        temperature=np.full(n, temperature, np.float32), top_k=np.full(n, top_k, np.int64),
        top_p=np.full(n, top_p, np.float32),
        seeds=np.arange(n, dtype=np.uint64) if seeds is None else np.asarray(seeds, np.uint64),
        positions=np.full(n, 7, np.int64) if positions is None else np.asarray(positions, np.int64))


def test_plan_from_the_tiny_layout():
    layout = tiny_layout_with()
    plan = DecodingPlan.from_layout(layout)
    obs, head, wrist, rew = (layout.special(n) for n in ("obs", "view:head", "view:wrist", "rew"))
    assert plan.leading_forced == (obs, head)
    assert plan.generated_len == 13 and plan.reward_offset == 12
    # After the last head code comes the wrist marker; after the last wrist code, <rew>; else nothing.
    assert [i for i, run in enumerate(plan.forced_after) if run] == [0, 5, 10]
    assert (plan.forced_after[5], plan.forced_after[10]) == ((wrist,), (rew,))
    assert plan.forced_after[0] == (head,)  # (offset 0 is itself forced; only sampled offsets use theirs)
    assert (plan.low[2], plan.high[2], plan.low[12], plan.high[12]) == (0, 16, layout.yes_id, layout.no_id + 1)


def test_uniform_draws_depend_only_on_seed_and_position():
    seeds = np.array([0, 1, 2**63 - 1, 5], dtype=np.uint64)
    positions = np.array([10, 10, 10, 11])
    draws = uniform_draws(seeds, positions)
    assert np.all((draws >= 0) & (draws < 1)) and len(set(draws.tolist())) == 4
    assert uniform_draws(seeds[2:3], positions[2:3])[0] == draws[2]  # same pair alone: bit-identical
    many = uniform_draws(np.arange(20000, dtype=np.uint64), np.zeros(20000, np.int64))
    assert abs(many.mean() - 0.5) < 0.01 and abs(many.var() - 1 / 12) < 0.003


def test_greedy_argmax_stays_inside_the_range():
    logits = torch.tensor([[9.0, 1.0, 2.0, 3.0, 0.0], [0.0, 5.0, 1.0, 1.0, 8.0]])
    tokens = sample(logits, batch(2, low=1, high=4, temperature=0.0))
    assert tokens.tolist() == [3, 1]


def test_truncation_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(64, 30, generator=torch.Generator().manual_seed(0))
    greedy = sample(logits, batch(64, high=30, temperature=0.0))
    assert torch.equal(sample(logits, batch(64, high=30, top_k=1)), greedy)
    assert torch.equal(sample(logits, batch(64, high=30, top_p=1e-6)), greedy)


def test_draws_follow_the_distribution_and_respect_top_k():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(40000, 1)
    seeds = np.arange(40000, dtype=np.uint64)
    counts = np.bincount(sample(logits, batch(40000, high=4, seeds=seeds)).numpy(), minlength=4) / 40000
    assert counts == pytest.approx([0.5, 0.3, 0.15, 0.05], abs=0.01)
    top2 = np.bincount(sample(logits, batch(40000, high=4, top_k=2, seeds=seeds)).numpy(), minlength=4) / 40000
    assert top2 == pytest.approx([0.625, 0.375, 0, 0], abs=0.01)
    nucleus = np.bincount(sample(logits, batch(40000, high=4, top_p=0.7, seeds=seeds)).numpy(), minlength=4) / 40000
    assert nucleus == pytest.approx([0.625, 0.375, 0, 0], abs=0.01)  # 0.5 < 0.7, 0.8 >= 0.7: two tokens


def test_a_row_samples_the_same_token_in_any_batch():
    logits = torch.randn(300, 50, generator=torch.Generator().manual_seed(1))
    full = sample(logits, batch(300, high=50, temperature=0.8, top_k=20, top_p=0.9))
    alone = sample(logits[123:124], batch(1, high=50, temperature=0.8, top_k=20, top_p=0.9, seeds=[123]))
    assert int(alone[0]) == int(full[123])


def test_yes_probability_is_the_two_way_softmax():
    logits = torch.tensor([[0.0, 2.0, 1.0]])
    assert float(yes_probability(logits, 1, 2)[0]) == pytest.approx(np.exp(2) / (np.exp(2) + np.exp(1)))
