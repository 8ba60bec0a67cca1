"""Scheduler: one ragged batch mixing decode and prefill under a token budget, preemption order,
forced markers appended after samples. Sequences are built by hand; no model runs."""

from __future__ import annotations

import numpy as np
from engine_helpers import tiny_layout_with

from engine.kv_cache import KVCacheManager
from engine.sampler import DecodingPlan
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus

LAYOUT = tiny_layout_with()
PLAN = DecodingPlan.from_layout(LAYOUT)


def make(num_blocks: int, budget: int, max_seqs: int = 8) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size=4, max_blocks_per_seq=32)
    return Scheduler(kv, PLAN, max_num_batched_tokens=budget, max_num_seqs=max_seqs)


def state_seq(seq_id: int, length: int) -> Sequence:
    return Sequence(seq_id, list(range(1000, 1000 + length)))


def branch_of(scheduler: Scheduler, parent: Sequence, seq_id: int) -> Sequence:
    tokens = parent.token_ids + [LAYOUT.special("act")] * 3 + list(PLAN.leading_forced)
    seq = Sequence(seq_id, tokens, num_computed_tokens=parent.num_computed_tokens,
                   gen_start=len(tokens) - len(PLAN.leading_forced))
    scheduler.kv.fork(parent.seq_id, seq_id)
    scheduler.add(seq)
    return seq


def run_step(scheduler: Scheduler, token: int = 3):
    out = scheduler.schedule()
    sampled = np.full(len(out.sample_indices), token, dtype=np.int64)
    finished = scheduler.update(out, sampled, np.full(len(out.sample_indices), 0.25, dtype=np.float32))
    return out, finished


def test_chunked_prefill_then_state_finishes():
    scheduler = make(num_blocks=16, budget=6)
    seq = state_seq(0, 10)
    scheduler.add(seq)
    out, finished = run_step(scheduler)
    assert (out.num_scheduled_tokens, out.sample_indices, finished) == ([6], [], [])
    assert scheduler.kv.block_ids(0) == [0, 1]
    out, finished = run_step(scheduler)
    assert (out.num_scheduled_tokens, finished) == ([4], [seq])
    assert seq.status == SequenceStatus.FINISHED and scheduler.kv.block_ids(0) == [0, 1, 2]


def test_one_batch_mixes_decode_and_prefill_within_the_budget_and_copies_on_write():
    scheduler = make(num_blocks=32, budget=6)
    parent = state_seq(0, 10)
    scheduler.add(parent)
    run_step(scheduler)
    run_step(scheduler)  # parent prefilled in two chunks: blocks [0, 1, 2], tail block 2 holds 2 tokens
    first = branch_of(scheduler, parent, 1)
    out, _ = run_step(scheduler)
    # The branch's 5 new tokens (3 actions + <obs> <view:head>) run; block 2 is copied to 3 first.
    assert (out.num_scheduled_tokens, out.block_copies, out.sample_indices) == ([5], [(2, 3)], [0])
    assert first.token_ids[-1] == 3 and first.num_computed_tokens == 15
    second = branch_of(scheduler, parent, 2)
    out, _ = run_step(scheduler)
    assert [s.seq_id for s in out.seqs] == [1, 2]  # running decode first, then the new prefill
    assert out.num_scheduled_tokens == [1, 5] and out.block_copies == [(2, 5)]  # exactly the budget of 6
    assert second.num_computed_tokens == 15 and first.num_computed_tokens == 16


def test_forced_markers_follow_samples_and_the_branch_finishes_with_its_reward():
    scheduler = make(num_blocks=64, budget=64)
    parent = state_seq(0, 8)
    scheduler.add(parent)
    run_step(scheduler)
    seq = branch_of(scheduler, parent, 1)
    steps, finished = 0, []
    while not finished:
        out, finished = run_step(scheduler, token=5)
        steps += 1
    assert steps == 9  # one step per sampled position: 4 head codes, 4 wrist codes, the reward
    generated = seq.token_ids[seq.gen_start:]
    forced, _, _ = LAYOUT.generation_plan()
    assert generated == [t if t >= 0 else 5 for t in forced.tolist()]
    assert seq.success_prob == 0.25 and finished == [seq]


def test_out_of_blocks_preempts_the_newest_running_sequence():
    scheduler = make(num_blocks=9, budget=64)
    parent = state_seq(0, 8)  # two full blocks
    scheduler.add(parent)
    run_step(scheduler)
    old, new = branch_of(scheduler, parent, 1), branch_of(scheduler, parent, 2)
    run_step(scheduler)  # both take 14 slots: 2 shared blocks + 2 own blocks each; 3 blocks free
    assert scheduler.kv.num_free_blocks == 3
    preempted_at = None
    for step in range(12):
        run_step(scheduler)
        if preempted_at is None and new.status == SequenceStatus.WAITING:
            preempted_at = step
    assert preempted_at is not None and scheduler.num_preemptions >= 1
    assert old.num_preemptions == 0 and new.num_preemptions >= 1  # the older branch kept going
    while scheduler.has_work():
        run_step(scheduler)
    assert old.status == new.status == SequenceStatus.FINISHED
    assert old.token_ids[old.gen_start:] == new.token_ids[new.gen_start:]
