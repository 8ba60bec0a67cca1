"""Structured decoding: the per-chunk plan of forced markers and sampled ranges, and a batched sampler
whose randomness is a counter-based hash of (seed, stream position).

Because the uniform draw of a row depends only on its seed and position, and every other operation is
row-wise, a branch's tokens do not depend on which other branches share its batch or on preemption.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .layout import TokenLayout

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class DecodingPlan:
    """layout.generation_plan() arranged for the scheduler: what to append after each sampled token."""

    leading_forced: tuple[int, ...]  # markers before the first sampled position (<obs> <view:first>)
    forced_after: tuple[tuple[int, ...], ...]  # [generated_len] markers that follow a sample at offset i
    low: np.ndarray  # int64 [generated_len] first allowed token id at offset i (sampled offsets only)
    high: np.ndarray  # int64 [generated_len] one past the last allowed id
    generated_len: int
    reward_offset: int  # the yes/no position

    @classmethod
    def from_layout(cls, layout: TokenLayout) -> DecodingPlan:
        forced, low, high = layout.generation_plan()
        length = len(forced)
        runs = []
        for i in range(length):
            run, j = [], i + 1
            while j < length and forced[j] >= 0:
                run.append(int(forced[j]))
                j += 1
            runs.append(tuple(run))
        first_sampled = int(np.argmax(forced < 0))
        return cls(tuple(int(t) for t in forced[:first_sampled]), tuple(runs), low, high, length,
                   reward_offset=int(np.flatnonzero(forced < 0)[-1]))


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 (wrapping arithmetic is the point)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniform_draws(seeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """float64 [n] in [0, 1): a pure function of each (seed, position) pair."""
    with np.errstate(over="ignore"):
        mixed = _mix64(seeds.astype(np.uint64) ^ _mix64(positions.astype(np.uint64) + _GOLDEN))
    return (mixed >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass
class SamplingBatch:
    """Per-row sampling inputs, numpy [num_rows] each."""

    low: np.ndarray  # int64
    high: np.ndarray  # int64
    temperature: np.ndarray  # float32; 0 = greedy
    top_k: np.ndarray  # int64; 0 = no limit
    top_p: np.ndarray  # float32
    seeds: np.ndarray  # uint64
    positions: np.ndarray  # int64 stream position of the token being sampled


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logits float32 [n, vocab] -> int64 [n] tokens, each within [low, high) of its row."""
    num_rows, vocab = logits.shape
    low = torch.from_numpy(batch.low)[:, None]
    high = torch.from_numpy(batch.high)[:, None]
    ids = torch.arange(vocab)[None, :]
    logits = logits.masked_fill((ids < low) | (ids >= high), float("-inf"))  # [n, vocab]
    tokens = logits.argmax(dim=-1)
    temperature = torch.from_numpy(batch.temperature)
    stochastic = temperature > 0
    if not bool(stochastic.any()):
        return tokens
    rows = stochastic.nonzero().squeeze(1)
    scaled = logits[rows] / temperature[rows, None]  # [m, vocab]
    uniforms = torch.from_numpy(uniform_draws(batch.seeds, batch.positions))[rows]  # float64 [m]
    top_k, top_p = torch.from_numpy(batch.top_k)[rows], torch.from_numpy(batch.top_p)[rows]
    if bool((top_k > 0).any() or (top_p < 1).any()):
        drawn = _sample_truncated(scaled, top_k, top_p, uniforms)
    else:
        drawn = _sample_inverse_cdf(torch.softmax(scaled, dim=-1), uniforms)
    tokens[rows] = torch.minimum(torch.maximum(drawn, low[rows, 0]), high[rows, 0] - 1)
    return tokens


def _sample_inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """probs [m, V] (rows sum to ~1), uniforms float64 [m] -> column index [m] of the draw."""
    cdf = probs.double().cumsum(dim=-1)  # [m, V]
    target = (uniforms * cdf[:, -1]).unsqueeze(1)
    # right=True skips zero-probability columns: the first column whose cdf exceeds the target.
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)


def _sample_truncated(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                      uniforms: torch.Tensor) -> torch.Tensor:
    """Top-k then top-p (nucleus) truncation in descending-probability order, then an inverse-CDF draw."""
    sorted_logits, order = scaled.sort(dim=-1, descending=True, stable=True)  # [m, V]
    ranks = torch.arange(scaled.shape[1])[None, :]
    limit_k = torch.where(top_k > 0, top_k, scaled.shape[1])[:, None]
    sorted_logits = sorted_logits.masked_fill(ranks >= limit_k, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of strictly more likely tokens
    keep = (mass_before < top_p[:, None]) | (ranks == 0)
    probs = probs.masked_fill(~keep, 0.0)
    picked = _sample_inverse_cdf(probs, uniforms)
    return order.gather(1, picked[:, None]).squeeze(1)


def yes_probability(logits: torch.Tensor, yes_id: int, no_id: int) -> torch.Tensor:
    """P(<yes>) renormalised over {<yes>, <no>} from raw (untempered) logits: float32 [n]."""
    return torch.sigmoid(logits[:, yes_id] - logits[:, no_id])
