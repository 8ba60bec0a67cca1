"""The engine's Python API: create states, imagine branches, release states, stats.

`Engine` is synchronous and single-threaded: `create_states` / `imagine` submit work and run the step
loop until it is done. `AsyncEngine` runs the same step loop in one background thread and offers
awaitables plus a stream of branch results as they finish; every engine call goes through that thread.

A state is a token stream whose KV lives in the cache (a handle on blocks). Imagining a branch forks the
state (sharing every block), appends the action chunk and the leading markers, and decodes the next
observation and the reward per the layout's plan; a kept branch becomes a new state as it stands.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import numbers
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import Checkpoint, load_checkpoint
from .config import EngineConfig
from .kv_cache import KVCacheManager
from .layout import LayoutError, TokenLayout
from .model_runner import ModelRunner
from .sampler import DecodingPlan
from .scheduler import Scheduler
from .sequence import Sequence
from .types import (
    MAX_SEED,
    BranchRequest,
    BranchResult,
    CapacityError,
    EngineStats,
    InvalidRequestError,
    ModelInfo,
    SamplingParams,
    StartState,
    StateNotFoundError,
)

DEFAULT_CONFIG = EngineConfig()
DEFAULT_SAMPLING = SamplingParams()


@dataclass(eq=False)
class StatesRequest:
    """A create_states call in flight; `future` resolves to the new state ids (call order)."""

    seqs: list[Sequence]
    state_ids: list[int]
    remaining: int
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass(eq=False)
class ImagineRequest:
    """An imagine call in flight. `on_result` sees each BranchResult as it finishes (engine thread);
    `future` resolves to all results in index order once the last one is in."""

    seqs: list[Sequence]
    return_tokens: bool
    return_images: bool
    keep_state: list[bool]
    results: list[BranchResult | None]
    remaining: int
    on_result: Callable[[BranchResult], None] | None = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    @property
    def finished(self) -> bool:
        return self.future.done()


class Engine:
    """Branched world-model rollouts over a paged, prefix-cached, copy-on-write KV cache."""

    def __init__(self, checkpoint: Checkpoint, config: EngineConfig = DEFAULT_CONFIG) -> None:
        self.config = config
        self.checkpoint = checkpoint
        self._layout = checkpoint.layout
        model_config = checkpoint.model_config
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.plan = DecodingPlan.from_layout(self._layout)
        self.max_stream_len = min(model_config.max_position_embeddings, self._layout.max_stream_len)
        num_blocks = config.resolve_num_kv_blocks(model_config.num_hidden_layers, model_config.num_key_value_heads,
                                                  model_config.head_dim)
        max_blocks_per_seq = -(-self.max_stream_len // config.block_size)
        self.kv = KVCacheManager(num_blocks, config.block_size, max_blocks_per_seq, config.enable_prefix_caching,
                                 checkpoint.weights_version)
        self.scheduler = Scheduler(self.kv, self.plan, config.max_num_batched_tokens, config.max_num_seqs)
        self.runner = ModelRunner(model_config, checkpoint.weights, num_blocks=num_blocks, block_size=config.block_size,
                                  plan=self.plan, yes_id=self._layout.yes_id, no_id=self._layout.no_id,
                                  device=config.device, dtype=config.dtype,
                                  attention_backend=config.attention_backend,
                                  enable_cascade=config.enable_cascade_attention,
                                  retain_host_memory=config.retain_host_memory)
        self.tokenizer = checkpoint.tokenizer.to(config.device)
        self._states: dict[int, Sequence] = {}
        self._ids = itertools.count()
        self._tokens_generated = 0
        self._branches_completed = 0
        self._num_steps = 0
        checkpoint.weights = {}  # the runner holds its own copy

    @classmethod
    def from_checkpoint(cls, path: str | Path, config: EngineConfig = DEFAULT_CONFIG) -> Engine:
        return cls(load_checkpoint(path), config)

    @property
    def layout(self) -> TokenLayout:
        return self._layout

    @property
    def model_info(self) -> ModelInfo:
        layout = self._layout
        return ModelInfo(views=layout.views, image_height=layout.image_height, image_width=layout.image_width,
                         chunk_size=layout.chunk_size, action_dim=layout.action_dim, action_low=layout.action_low,
                         action_high=layout.action_high, tokens_per_view=layout.tokens_per_view,
                         max_chunks_per_branch=layout.max_chunks_per_branch, model_name=self.checkpoint.model_name,
                         model_version=self.checkpoint.weights_version)

    # ---- synchronous API ----------------------------------------------------------------------
    def create_states(self, states: list[StartState]) -> list[int]:
        """Tokenizes and prefills real start states (identical ones hit the prefix cache); their ids."""
        request = self.add_states(states)
        self.run_until(request.future)
        return request.future.result()

    def imagine(self, branches: list[BranchRequest], sampling: SamplingParams = DEFAULT_SAMPLING,
                return_tokens: bool = False, return_images: bool = False) -> list[BranchResult]:
        """Rolls every branch one action chunk forward; results in the order of `branches`."""
        request = self.add_branches(branches, sampling, return_tokens, return_images)
        self.run_until(request.future)
        return request.future.result()

    def release(self, state_ids: list[int]) -> None:
        """Frees states; all or nothing: an unknown id raises StateNotFoundError and releases none."""
        ids = list(state_ids)
        for state_id in ids:
            if not isinstance(state_id, numbers.Integral) or isinstance(state_id, bool) \
                    or int(state_id) not in self._states:
                raise StateNotFoundError(f"state {state_id!r} is unknown or already released")
        for state_id in dict.fromkeys(int(s) for s in ids):
            self.kv.free(self._states.pop(state_id).seq_id)

    def stats(self) -> EngineStats:
        kv, scheduler = self.kv, self.scheduler
        return EngineStats(
            kv_blocks_total=kv.pool.num_blocks, kv_blocks_used=kv.num_used_blocks,
            kv_blocks_cached=kv.pool.num_cached_blocks, live_states=len(self._states),
            queue_depth=scheduler.num_unfinished, tokens_generated=self._tokens_generated,
            prefix_cache_queries=kv.num_prefix_queries, prefix_cache_hits=kv.num_prefix_hits,
            branches_completed=self._branches_completed,
            extra={"num_preemptions": float(scheduler.num_preemptions),
                   "peak_kv_blocks_used": float(scheduler.peak_used_blocks),
                   "num_steps": float(self._num_steps),
                   "num_forward_tokens": float(self.runner.num_forward_tokens),
                   "num_logits_rows": float(self.runner.num_logits_rows),
                   "num_attended_pairs": float(self.runner.num_attended_pairs)})

    def stream_tokens(self, state_id: int) -> list[int]:
        """The whole token stream of a live state (start state, chunks, generated observations)."""
        if state_id not in self._states:
            raise StateNotFoundError(f"state {state_id!r} is unknown or already released")
        return list(self._states[state_id].token_ids)

    def run_until(self, future: concurrent.futures.Future) -> None:
        while not future.done():
            self.step()

    # ---- submission (validation first: a bad item rejects the call and changes nothing) ---------
    def add_states(self, states: list[StartState]) -> StatesRequest:
        streams = self._encode_states(states)
        seqs = [Sequence(next(self._ids), stream, index=i) for i, stream in enumerate(streams)]
        request = StatesRequest(seqs, [-1] * len(seqs), len(seqs))
        for seq in seqs:
            seq.request = request
            self.scheduler.add(seq)
        if not seqs:
            request.future.set_result([])
        return request

    def add_branches(self, branches: list[BranchRequest], sampling: SamplingParams, return_tokens: bool = False,
                     return_images: bool = False,
                     on_result: Callable[[BranchResult], None] | None = None) -> ImagineRequest:
        if not isinstance(sampling, SamplingParams):
            raise InvalidRequestError(f"sampling must be SamplingParams, got {type(sampling).__name__}")
        chunks = [self._encode_branch(i, branch) for i, branch in enumerate(branches)]
        request = ImagineRequest([], bool(return_tokens), bool(return_images), [b.keep_state for b in branches],
                                 [None] * len(branches), len(branches), on_result)
        layout = self._layout
        for index, (branch, actions) in enumerate(zip(branches, chunks, strict=True)):
            parent = self._states[int(branch.state_id)]
            seq = Sequence(next(self._ids), parent.token_ids + actions + list(self.plan.leading_forced),
                           num_computed_tokens=parent.num_computed_tokens,
                           gen_start=parent.num_tokens + layout.action_len, seed=int(branch.seed),
                           temperature=float(sampling.temperature), top_k=int(sampling.top_k),
                           top_p=float(sampling.top_p), num_chunks=parent.num_chunks + 1, request=request,
                           index=index)
            # Fork now: the branch holds the parent's blocks even if the parent is released meanwhile.
            self.kv.fork(parent.seq_id, seq.seq_id)
            request.seqs.append(seq)
            self.scheduler.add(seq)
        if not branches:
            request.future.set_result([])
        return request

    def abort(self, request: ImagineRequest | StatesRequest) -> None:
        """Stops a request's unfinished sequences and frees their blocks (finished results stay valid)."""
        self.scheduler.abort(request.seqs)
        if not request.future.done():
            request.future.cancel()

    def fail_all(self, error: BaseException) -> None:
        """Ends every in-flight request with `error` (the step loop hit a bug or was closed)."""
        seqs = list(self.scheduler.waiting) + list(self.scheduler.running)
        requests = {id(seq.request): seq.request for seq in seqs if seq.request is not None}
        self.scheduler.abort(seqs)
        for request in requests.values():
            if not request.future.done():
                request.future.set_exception(error)
        # Released after every caller has its error: a cache that the failed step left broken may raise here.
        for request in requests.values():
            self.release(self._unreachable_states(request))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def _encode_states(self, states: list[StartState]) -> list[list[int]]:
        layout = self._layout
        instructions = []
        for i, state in enumerate(states):
            if not isinstance(state, StartState):
                raise InvalidRequestError(f"states[{i}] must be a StartState, got {type(state).__name__}")
            if not isinstance(state.instruction, str):
                raise InvalidRequestError(f"states[{i}]: instruction must be a str")
            try:
                instructions.append(layout.encode_instruction(state.instruction).tolist())
            except LayoutError as exc:
                raise InvalidRequestError(f"states[{i}]: {exc}") from None
            images = state.images if isinstance(state.images, dict) else {}
            if set(images) != set(layout.views):
                raise InvalidRequestError(f"states[{i}]: images must have exactly the views {list(layout.views)}, "
                                          f"got {sorted(images) if isinstance(state.images, dict) else state.images}")
            shape = (layout.image_height, layout.image_width, 3)
            for view in layout.views:
                image = images[view]
                if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.shape != shape:
                    described = (f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray)
                                 else type(image).__name__)
                    raise InvalidRequestError(f"states[{i}]: image for view {view!r} must be uint8 {shape}, "
                                              f"got {described}")
        if not states:
            return []
        with torch.inference_mode():
            codes = [self.tokenizer.encode(np.stack([s.images[v] for s in states])).cpu().numpy()
                     for v in layout.views]  # per view: [num_states, tokens_per_view]
        return [instruction + layout.encode_observation(np.stack([c[i] for c in codes])).tolist()
                for i, instruction in enumerate(instructions)]

    def _encode_branch(self, i: int, branch: BranchRequest) -> list[int]:
        layout = self._layout
        if not isinstance(branch, BranchRequest):
            raise InvalidRequestError(f"branches[{i}] must be a BranchRequest, got {type(branch).__name__}")
        state_id = branch.state_id
        if not isinstance(state_id, numbers.Integral) or isinstance(state_id, bool) \
                or int(state_id) not in self._states:
            raise StateNotFoundError(f"branches[{i}]: state {state_id!r} is unknown or already released")
        seed = branch.seed
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= int(seed) <= MAX_SEED:
            raise InvalidRequestError(f"branches[{i}]: seed must be an integer in [0, 2**63-1], got {seed!r}")
        if not isinstance(branch.keep_state, bool | np.bool_):
            raise InvalidRequestError(f"branches[{i}]: keep_state must be a bool, got {branch.keep_state!r}")
        try:
            actions = np.asarray(branch.actions, dtype=np.float64)
        except (TypeError, ValueError):
            raise InvalidRequestError(f"branches[{i}]: actions are not numeric") from None
        expected = (layout.chunk_size, layout.action_dim)
        if actions.shape != expected:
            raise InvalidRequestError(f"branches[{i}]: actions have shape {actions.shape}, expected {expected} "
                                      f"(chunk_size, action_dim)")
        if not np.all(np.isfinite(actions)):
            raise InvalidRequestError(f"branches[{i}]: actions contain NaN or inf")
        parent = self._states[int(state_id)]
        if parent.num_chunks + 1 > layout.max_chunks_per_branch:
            raise CapacityError(f"branches[{i}]: state {state_id} already holds {parent.num_chunks} action chunks; "
                                f"max_chunks_per_branch={layout.max_chunks_per_branch}")
        stream_len = parent.num_tokens + layout.chunk_len
        if stream_len > self.max_stream_len:
            raise CapacityError(f"branches[{i}]: the stream would reach {stream_len} tokens, more than "
                                f"max_position_embeddings={self.checkpoint.model_config.max_position_embeddings}")
        return layout.encode_actions(actions).tolist()

    # ---- the step loop ------------------------------------------------------------------------
    def step(self) -> None:
        """Schedules one ragged batch, runs it, and delivers whatever finished."""
        out = self.scheduler.schedule()
        finished = list(out.finished_without_compute)
        if out.seqs:
            result = self.runner.execute(out)
            finished += self.scheduler.update(out, result.sampled, result.success_probs)
            self._num_steps += 1
        elif not finished and self.scheduler.has_work():
            self._fail_unschedulable()
        self._deliver(finished)

    def _fail_unschedulable(self) -> None:
        """Nothing runs and the head of the queue cannot get blocks: held states fill the cache."""
        seq = self.scheduler.waiting[0]
        error = CapacityError(f"KV cache exhausted: {self.kv.num_used_blocks} of {self.kv.pool.num_blocks} blocks "
                              f"are held by {len(self._states)} live states and a {seq.num_tokens}-token stream "
                              f"does not fit; release states or raise num_kv_blocks")
        self._fail_request(seq.request, error)

    def _fail_request(self, request: ImagineRequest | StatesRequest, error: BaseException) -> None:
        """Ends a request with `error`: aborts its unfinished sequences and releases what it already made."""
        self.scheduler.abort(request.seqs)
        if not request.future.done():
            request.future.set_exception(error)
        self.release(self._unreachable_states(request))

    def _unreachable_states(self, request: ImagineRequest | StatesRequest) -> list[int]:
        """The live states a failed request made whose ids can reach nobody. A failed future carries no ids: every
        state of a create_states, and the kept states of an imagine whose results only the future delivers (with
        `on_result` the consumer has been handed each finished result and owns its state)."""
        if isinstance(request, StatesRequest):
            made = request.state_ids
        else:
            made = [r.state_id for r in request.results if r is not None] if request.on_result is None else []
        return [state_id for state_id in made if state_id in self._states]

    def _deliver(self, finished: list[Sequence]) -> None:
        states = [seq for seq in finished if not seq.is_branch]
        for seq in states:
            self._states[seq.seq_id] = seq
            request = seq.request
            request.state_ids[seq.index] = seq.seq_id
            request.remaining -= 1
            seq.request = None
            if request.remaining == 0 and not request.future.done():
                request.future.set_result(request.state_ids)
        branches = [seq for seq in finished if seq.is_branch]
        if branches:
            self._deliver_branches(branches)

    def _deliver_branches(self, seqs: list[Sequence]) -> None:
        layout = self._layout
        codes = []
        for seq in seqs:
            view_codes, _ = layout.split_generated(np.asarray(seq.token_ids[seq.gen_start:]))
            codes.append(view_codes)  # [num_views, tokens_per_view]
        wants_images = [seq.request.return_images for seq in seqs]
        images = self._decode_images([c for c, wanted in zip(codes, wants_images, strict=True) if wanted])
        for seq, view_codes in zip(seqs, codes, strict=True):
            request: ImagineRequest = seq.request
            keep = request.keep_state[seq.index]
            result = BranchResult(index=seq.index, state_id=seq.seq_id if keep else None,
                                  success_prob=seq.success_prob, success=seq.token_ids[-1] == layout.yes_id,
                                  tokens=view_codes if request.return_tokens else None,
                                  images=images.pop(0) if request.return_images else None)
            seq.request = None
            if keep:
                self._states[seq.seq_id] = seq
            else:
                self.kv.free(seq.seq_id)
            self._tokens_generated += self.plan.generated_len
            self._branches_completed += 1
            request.results[seq.index] = result
            request.remaining -= 1
            if request.on_result is not None:
                request.on_result(result)
            if request.remaining == 0 and not request.future.done():
                request.future.set_result(request.results)

    def _decode_images(self, codes: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        if not codes:
            return []
        stacked = np.stack(codes)  # [num_branches, num_views, tokens_per_view]
        with torch.inference_mode():
            pixels = self.tokenizer.decode(torch.from_numpy(stacked.reshape(-1, stacked.shape[-1]))).cpu().numpy()
        pixels = pixels.reshape(stacked.shape[0], stacked.shape[1], *pixels.shape[1:])
        return [{view: pixels[b, v] for v, view in enumerate(self._layout.views)} for b in range(stacked.shape[0])]


class AsyncEngine:
    """asyncio front end: one background thread owns the Engine and runs its step loop; calls from any
    thread or event loop are queued to it. Thread-safe."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: list[tuple[Callable[[], object], concurrent.futures.Future]] = []
        self._wakeup = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="vla-mbpo-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._wakeup:
                while not self._commands and not self._closed and not self.engine.has_unfinished():
                    self._wakeup.wait()
                commands, self._commands = self._commands, []
                closed = self._closed
            for command, future in commands:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(command())
                    except BaseException as exc:  # delivered to the caller; the loop keeps serving
                        future.set_exception(exc)
            if closed:
                self.engine.fail_all(RuntimeError("the engine was closed"))
                return
            if self.engine.has_unfinished():
                try:
                    self.engine.step()
                except Exception as exc:  # a bug: fail what is in flight rather than hang every caller
                    self.engine.fail_all(exc)

    def _submit(self, command: Callable[[], object]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wakeup:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._commands.append((command, future))
            self._wakeup.notify()
        return future

    async def create_states(self, states: list[StartState]) -> list[int]:
        request = await asyncio.wrap_future(self._submit(lambda: self.engine.add_states(states)))
        return await asyncio.wrap_future(request.future)

    async def imagine(self, branches: list[BranchRequest], sampling: SamplingParams = DEFAULT_SAMPLING,
                      return_tokens: bool = False, return_images: bool = False) -> list[BranchResult]:
        return [r async for r in self.imagine_stream(branches, sampling, return_tokens, return_images)]

    async def imagine_stream(self, branches: list[BranchRequest], sampling: SamplingParams = DEFAULT_SAMPLING,
                             return_tokens: bool = False, return_images: bool = False,
                             ) -> AsyncIterator[BranchResult]:
        """Yields each branch's result as soon as it finishes. Closing or cancelling the iterator aborts
        the unfinished branches and frees their blocks."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[BranchResult] = asyncio.Queue()

        def on_result(result: BranchResult) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, result)

        added = self._submit(
            lambda: self.engine.add_branches(branches, sampling, return_tokens, return_images, on_result))
        try:
            request: ImagineRequest = await asyncio.wrap_future(added)
        except asyncio.CancelledError:
            # Cancelled while the engine thread ran add_branches (or before it handed the request back): nobody
            # will consume the request, so abort it as soon as it exists. A command cancelled before it ran
            # adds nothing.
            added.add_done_callback(self._abort_if_added)
            raise
        done = asyncio.wrap_future(request.future)
        delivered = 0
        delivered_indices: set[int] = set()
        getter: asyncio.Future | None = None
        try:
            while delivered < len(branches):
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    delivered += 1
                    delivered_indices.add(getter.result().index)
                    yield getter.result()
                    continue
                getter.cancel()
                if done.cancelled():
                    raise asyncio.CancelledError
                if done.exception() is not None:
                    raise done.exception()
        finally:
            if getter is not None:
                getter.cancel()  # a cancelled consumer leaves its queue.get() pending otherwise
            if delivered < len(branches) and not self._closed:
                self._submit(lambda: self._abort_undelivered(request, delivered_indices))

    def _abort_if_added(self, added: concurrent.futures.Future) -> None:
        """Done-callback of an add_branches command whose caller was cancelled: aborts what it added."""
        if not added.cancelled() and added.exception() is None:
            request = added.result()
            with contextlib.suppress(RuntimeError):  # closed meanwhile: closing fails every request anyway
                self._submit(lambda: self._abort_undelivered(request, set()))

    def _abort_undelivered(self, request: ImagineRequest, delivered_indices: set[int]) -> None:
        """Engine thread: aborts the unfinished branches and releases the kept states of finished results
        the consumer never received (still queued when it stopped): nobody else knows their ids."""
        self.engine.abort(request)
        orphans = [r.state_id for r in request.results
                   if r is not None and r.state_id is not None and r.index not in delivered_indices]
        if orphans:
            self.engine.release(orphans)

    async def release(self, state_ids: list[int]) -> None:
        await asyncio.wrap_future(self._submit(lambda: self.engine.release(state_ids)))

    def stats(self) -> EngineStats:
        """A consistent snapshot, taken between two steps."""
        return self._submit(self.engine.stats).result()

    @property
    def model_info(self) -> ModelInfo:
        return self.engine.model_info

    @property
    def layout(self) -> TokenLayout:
        return self.engine.layout

    def close(self) -> None:
        """Stops the loop; in-flight requests fail with RuntimeError. Idempotent."""
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()
