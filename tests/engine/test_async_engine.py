"""AsyncEngine: results stream as branches finish, closing the stream aborts and frees, errors propagate."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest
from engine_helpers import branch, make_engine, start_state

from engine.engine import AsyncEngine
from engine.types import InvalidRequestError, SamplingParams, StartState, StateNotFoundError

SAMPLED = SamplingParams(temperature=1.0)


@pytest.fixture()
def async_engine(tiny_checkpoint):
    # One sequence per step: branches finish one after another, so streaming is observable.
    engine = AsyncEngine(make_engine(tiny_checkpoint, max_num_seqs=1))
    yield engine
    engine.close()


def test_results_stream_as_each_branch_finishes(async_engine, tiny_layout):
    async def scenario():
        (state,) = await async_engine.create_states([start_state(tiny_layout, 0)])
        completed_at_arrival, indices = [], []
        async with contextlib.aclosing(async_engine.imagine_stream(
                [branch(tiny_layout, state, seed=i) for i in range(12)], SAMPLED)) as stream:
            async for result in stream:
                indices.append(result.index)
                completed_at_arrival.append(await asyncio.to_thread(lambda: async_engine.stats().branches_completed))
        await async_engine.release([state])
        return indices, completed_at_arrival

    indices, completed = asyncio.run(scenario())
    assert sorted(indices) == list(range(12))
    assert completed[0] < 12  # the first result arrived while most branches were still running
    stats = async_engine.stats()
    assert (stats.kv_blocks_used, stats.live_states, stats.queue_depth) == (0, 0, 0)


def test_closing_the_stream_aborts_unfinished_branches_and_frees_their_blocks(async_engine, tiny_layout):
    async def scenario():
        (state,) = await async_engine.create_states([start_state(tiny_layout, 1)])
        async with contextlib.aclosing(async_engine.imagine_stream(
                [branch(tiny_layout, state, seed=i) for i in range(20)], SAMPLED)) as stream:
            first = await anext(stream)
        stats = await asyncio.to_thread(async_engine.stats)  # the abort was queued before this
        return state, first, stats

    state, first, stats = asyncio.run(scenario())
    assert first.state_id is None
    assert (stats.queue_depth, stats.live_states, stats.kv_blocks_used) == (0, 1, 9)  # only the state's blocks
    assert stats.branches_completed < 20


def test_cancelling_the_consumer_task_aborts_too(async_engine, tiny_layout):
    async def scenario():
        (state,) = await async_engine.create_states([start_state(tiny_layout, 2)])
        seen = []

        async def consume():
            async for result in async_engine.imagine_stream([branch(tiny_layout, state, seed=i) for i in range(20)],
                                                            SAMPLED):
                seen.append(result.index)

        task = asyncio.create_task(consume())
        while not seen:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await asyncio.to_thread(async_engine.stats)

    stats = asyncio.run(scenario())
    assert (stats.queue_depth, stats.kv_blocks_used) == (0, 9)


def test_cancelled_while_the_engine_adds_the_branches_they_are_aborted_once_added(async_engine, tiny_layout):
    """A deadline can land while the engine thread runs add_branches (a loaded machine): the request is then
    never handed back, so the stream must abort it itself once it exists, or its branches run unowned."""
    started, proceed = threading.Event(), threading.Event()
    add_branches = async_engine.engine.add_branches

    def slow_add_branches(*args, **kwargs):
        started.set()
        proceed.wait(10)
        return add_branches(*args, **kwargs)

    async_engine.engine.add_branches = slow_add_branches

    async def scenario():
        (state,) = await async_engine.create_states([start_state(tiny_layout, 4)])

        async def consume():
            async for _ in async_engine.imagine_stream([branch(tiny_layout, state, seed=i) for i in range(20)],
                                                       SAMPLED):
                pass

        task = asyncio.create_task(consume())
        await asyncio.to_thread(started.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task  # the engine thread is still inside add_branches
        proceed.set()
        for _ in range(500):
            stats = await asyncio.to_thread(async_engine.stats)
            if stats.queue_depth == 0:
                return stats
            await asyncio.sleep(0.01)
        return stats

    stats = asyncio.run(scenario())
    assert (stats.queue_depth, stats.kv_blocks_used) == (0, 9)  # only the state's blocks
    assert stats.branches_completed < 20


def test_errors_reach_the_caller_and_the_engine_keeps_serving(async_engine, tiny_layout):
    async def scenario():
        with pytest.raises(InvalidRequestError, match=r"states\[0\]: instruction is empty"):
            await async_engine.create_states([StartState("", start_state(tiny_layout, 0).images)])
        with pytest.raises(StateNotFoundError, match=r"branches\[0\]: state 424242 is unknown or already released"):
            async for _ in async_engine.imagine_stream([branch(tiny_layout, 424242, seed=0)], SAMPLED):
                pass
        with pytest.raises(StateNotFoundError, match="state 424242 is unknown"):
            await async_engine.release([424242])
        (state,) = await async_engine.create_states([start_state(tiny_layout, 3)])
        results = await async_engine.imagine([branch(tiny_layout, state, seed=i) for i in range(3)], SAMPLED)
        await async_engine.release([state])
        return results

    assert sorted(r.index for r in asyncio.run(scenario())) == [0, 1, 2]


def test_close_fails_new_calls(tiny_checkpoint, tiny_layout):
    engine = AsyncEngine(make_engine(tiny_checkpoint))
    engine.close()
    engine.close()  # idempotent
    with pytest.raises(RuntimeError, match="the engine is closed"):
        asyncio.run(engine.create_states([start_state(tiny_layout, 0)]))
