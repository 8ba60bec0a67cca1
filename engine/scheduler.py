"""Continuous batching: every step one ragged batch of running sequences (decode and forced markers)
plus as much waiting prefill (new states, new branches' action chunks, recomputation) as the token
budget allows. When KV blocks run out, the newest running sequence is preempted and later recomputed,
so older sequences (closer to finishing, holding the most memory) always make progress.

The scheduler decides and bookkeeps; it never touches tensors. It hands the model runner a
SchedulerOutput and takes back the sampled tokens.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .kv_cache import KVCacheManager
from .sampler import DecodingPlan
from .sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """What the model runner computes this step."""

    seqs: list[Sequence]
    num_scheduled_tokens: list[int]  # per seq: tokens [num_computed, num_computed + n) run this step
    block_tables: list[np.ndarray]  # per seq: int32 block ids (the KV manager's arrays; read-only)
    block_copies: list[tuple[int, int]]  # (src, dst) block copies to make before the forward pass
    sample_indices: list[int]  # indices into seqs that sample a token after this step
    finished_without_compute: list[Sequence] = field(default_factory=list)  # fully prefix-cached states

    @property
    def num_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)


class Scheduler:
    def __init__(self, kv: KVCacheManager, plan: DecodingPlan, max_num_batched_tokens: int, max_num_seqs: int) -> None:
        self.kv = kv
        self.plan = plan
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.peak_used_blocks = 0

    # ---- queue management ---------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def abort(self, seqs: list[Sequence]) -> None:
        """Drops unfinished sequences wherever they are and frees their blocks."""
        doomed = {id(seq) for seq in seqs if seq.status != SequenceStatus.FINISHED}
        if not doomed:
            return
        self.waiting = deque(seq for seq in self.waiting if id(seq) not in doomed)
        self.running = [seq for seq in self.running if id(seq) not in doomed]
        for seq in seqs:
            if id(seq) in doomed:
                seq.status = SequenceStatus.FINISHED
                if self.kv.has(seq.seq_id):
                    self.kv.free(seq.seq_id)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step -----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput([], [], [], [], [])
        preemptions_before = self.num_preemptions
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if self.num_preemptions == preemptions_before:  # else the victims would be re-admitted at once
            self._schedule_waiting(out, budget)
        self.peak_used_blocks = max(self.peak_used_blocks, self.kv.num_used_blocks)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new = min(seq.num_uncomputed_tokens, budget)
            copies = self.kv.append_slots(seq.seq_id, seq.num_computed_tokens + num_new)
            while copies is None:  # out of blocks: preempt from the back (newest, least progress)
                victim = self.running.pop()
                self._preempt(victim)
                if victim is seq:
                    return budget
                copies = self.kv.append_slots(seq.seq_id, seq.num_computed_tokens + num_new)
            self._emit(out, seq, num_new, copies)
            budget -= num_new
            index += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            fresh = not self.kv.has(seq.seq_id)
            if fresh:  # a new state, or a preempted branch: look up the prefix cache
                # A branch must compute at least its last token: that is where its next sample comes from.
                limit = seq.num_tokens - 1 if seq.is_branch else seq.num_tokens
                cached = self.kv.allocate(seq.seq_id, seq.token_ids, 0, limit)
                if cached is None:
                    return
                seq.num_computed_tokens = cached
                if seq.num_uncomputed_tokens == 0:
                    self.waiting.popleft()
                    seq.status = SequenceStatus.FINISHED
                    out.finished_without_compute.append(seq)
                    continue
            num_new = min(seq.num_uncomputed_tokens, budget)
            copies = self.kv.append_slots(seq.seq_id, seq.num_computed_tokens + num_new)
            if copies is None:
                if fresh:  # give the cache hits back rather than hold blocks while waiting
                    self.kv.free(seq.seq_id)
                    seq.num_computed_tokens = 0
                return
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._emit(out, seq, num_new, copies)
            budget -= num_new

    def _emit(self, out: SchedulerOutput, seq: Sequence, num_new: int, copies: list[tuple[int, int]]) -> None:
        if seq.is_branch and seq.num_computed_tokens + num_new == seq.num_tokens:
            out.sample_indices.append(len(out.seqs))
        out.seqs.append(seq)
        out.num_scheduled_tokens.append(num_new)
        out.block_tables.append(self.kv.table(seq.seq_id).block_ids)
        out.block_copies.extend(copies)

    def _preempt(self, seq: Sequence) -> None:
        """Recompute later: drop the blocks, keep the tokens (sampling is keyed by position, so the
        recomputed branch continues exactly as it would have)."""
        self.kv.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # ---- after the forward pass ---------------------------------------------------------------
    def update(self, out: SchedulerOutput, sampled: np.ndarray, success_probs: np.ndarray) -> list[Sequence]:
        """Advances computed counts, appends sampled tokens and the markers that follow them, and returns
        the sequences that finished (removed from running; their blocks are still held)."""
        block_size = self.kv.block_size
        for seq, num_new in zip(out.seqs, out.num_scheduled_tokens, strict=True):
            before = seq.num_computed_tokens
            seq.num_computed_tokens = before + num_new
            if seq.num_computed_tokens // block_size > before // block_size:
                self.kv.commit(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
        finished = []
        plan = self.plan
        for row, index in enumerate(out.sample_indices):
            seq = out.seqs[index]
            offset = seq.num_tokens - seq.gen_start
            seq.token_ids.append(int(sampled[row]))
            if offset == plan.reward_offset:
                seq.success_prob = float(success_probs[row])
            seq.token_ids.extend(plan.forced_after[offset])
            if seq.num_tokens - seq.gen_start == plan.generated_len:
                seq.status = SequenceStatus.FINISHED
                finished.append(seq)
        for seq in out.seqs:
            if not seq.is_branch and seq.num_uncomputed_tokens == 0:
                seq.status = SequenceStatus.FINISHED
                finished.append(seq)
        if finished:
            self.running = [seq for seq in self.running if seq.status != SequenceStatus.FINISHED]
        return finished
