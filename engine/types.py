"""The engine's public boundary objects: what callers pass in and get back, and the typed errors.

Everything here is plain data (numpy arrays, ints, floats): the server's proto conversion and the
engine's internals both depend on this file, and on nothing of each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

MAX_SEED = 2**63 - 1


class EngineError(Exception):
    """Base of every error the engine raises on bad input or exhausted resources."""


class InvalidRequestError(EngineError, ValueError):
    """The request is malformed: wrong shapes, NaN/inf, out-of-range values. Names the problem."""


class StateNotFoundError(EngineError, KeyError):
    """A state id that was never created, or was already released."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "state not found"


class CapacityError(EngineError):
    """The request can never fit (e.g. a stream longer than the model's context)."""


@dataclass(frozen=True)
class SamplingParams:
    """How sampled positions (image codes, yes/no) are drawn. temperature 0 = greedy."""

    temperature: float = 1.0
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0  # (0, 1]

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequestError(f"temperature must be finite and >= 0, got {self.temperature}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise InvalidRequestError(f"top_k must be an integer >= 0, got {self.top_k}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must lie in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class StartState:
    """A real start state: the instruction and one uint8 [H, W, 3] image per view (layout order)."""

    instruction: str
    images: dict[str, np.ndarray]


@dataclass(frozen=True)
class BranchRequest:
    """Roll `state_id` forward by one action chunk [chunk_size, action_dim] with a seeded sampler."""

    state_id: int
    actions: np.ndarray
    seed: int = 0
    keep_state: bool = False


@dataclass
class BranchResult:
    """The outcome of one branch. `index` is its position in the imagine() call."""

    index: int
    state_id: int | None  # the new state when keep_state was set
    success_prob: float  # P(<yes>) renormalised over {<yes>, <no>}
    success: bool  # the sampled reward token
    tokens: np.ndarray | None = None  # [num_views, tokens_per_view] image codes when asked
    images: dict[str, np.ndarray] | None = None  # view -> uint8 [H, W, 3] when asked


@dataclass(frozen=True)
class ModelInfo:
    """What the loaded world model expects and produces (mirrors the layout)."""

    views: tuple[str, ...]
    image_height: int
    image_width: int
    chunk_size: int
    action_dim: int
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]
    tokens_per_view: int
    max_chunks_per_branch: int
    model_name: str
    model_version: str


@dataclass
class EngineStats:
    """Counters for GetStats and metrics. Block counts are exact at the time of the call."""

    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    kv_blocks_cached: int = 0
    live_states: int = 0
    queue_depth: int = 0
    tokens_generated: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    branches_completed: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
