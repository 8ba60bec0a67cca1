"""A sequence: one token stream the scheduler runs (a start state being prefilled, or a branch being
imagined). Plain data: the scheduler, KV cache manager and model runner read and update it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class SequenceStatus(Enum):
    WAITING = "waiting"  # needs blocks (new, or preempted and to be recomputed)
    RUNNING = "running"  # holds blocks, scheduled every step
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """`token_ids` is the whole stream; the KV of its first `num_computed_tokens` tokens is in the cache.

    A branch (gen_start >= 0) samples at every position from gen_start to gen_start + generated_len
    that the plan does not force; a state prefill (gen_start < 0) only computes its tokens.
    """

    seq_id: int
    token_ids: list[int]
    num_computed_tokens: int = 0
    gen_start: int = -1  # stream position of the chunk's first generated token; -1 for a state prefill
    seed: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_chunks: int = 0  # action chunks in the stream (after this one finishes, for a branch)
    status: SequenceStatus = SequenceStatus.WAITING
    request: object = None  # the engine request this sequence reports to
    index: int = 0  # position within that request
    success_prob: float = 0.0  # P(yes) at the reward position, filled when sampled
    num_preemptions: int = 0

    @property
    def is_branch(self) -> bool:
        return self.gen_start >= 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens
