"""The WorldModel RPCs over the engine's asyncio API.

Each RPC validates and converts its request (runtime.convert), maps wire ids to engine ids through the
lease table (runtime.leases), calls the engine, and maps every failure to a status code (runtime.errors).
Engine work is never orphaned: a cancelled CreateStates releases the states it made, a cancelled Imagine
closes the engine stream (which aborts its unfinished branches and frees their blocks) and releases the
state of the result it was sending.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing, asynccontextmanager

import grpc
from grpc import aio

from engine.engine import AsyncEngine
from engine.types import EngineStats, ModelInfo
from protos.vla_mbpo.v1 import world_model_pb2 as pb
from protos.vla_mbpo.v1 import world_model_pb2_grpc
from runtime import convert
from runtime.convert import RequestLimits
from runtime.errors import RequestError, status_of
from runtime.leases import LeaseTable, client_identity
from runtime.metrics import ServerMetrics

logger = logging.getLogger("vla_mbpo.runtime")


class WorldModelServicer(world_model_pb2_grpc.WorldModelServicer):
    """Serves one engine. All methods run on the server's event loop, so the lease table needs no lock."""

    def __init__(self, engine: AsyncEngine, info: ModelInfo, limits: RequestLimits, leases: LeaseTable,
                 metrics: ServerMetrics) -> None:
        self._engine = engine
        self._info = info
        self._limits = limits
        self.leases = leases
        self._metrics = metrics
        self._background: set[asyncio.Task] = set()
        self.num_in_flight = 0

    # ---- RPCs -------------------------------------------------------------------------------------
    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: aio.ServicerContext) -> pb.ModelInfo:
        async with self._rpc("GetModelInfo", context):
            return convert.model_info_to_proto(self._info, self._limits)

    async def CreateStates(self, request: pb.CreateStatesRequest,
                           context: aio.ServicerContext) -> pb.CreateStatesResponse:
        async with self._rpc("CreateStates", context):
            client_id = client_identity(context.invocation_metadata() or (), context.peer())
            states = convert.start_states_from_proto(request, self._info, self._limits)
            reservation = self.leases.reserve(client_id, len(states))
            try:
                engine_ids = await self._finish_or_release(self._engine.create_states(states))
                wire_ids = [self.leases.add(engine_id, 0, reservation) for engine_id in engine_ids]
            finally:
                self.leases.unreserve(reservation)
            return pb.CreateStatesResponse(state_ids=wire_ids)

    async def Imagine(self, request: pb.ImagineRequest, context: aio.ServicerContext) -> None:
        async with self._rpc("Imagine", context):
            start = time.monotonic()
            client_id = client_identity(context.invocation_metadata() or (), context.peer())
            sampling = convert.sampling_from_proto(request.sampling)
            branches = convert.branches_from_proto(request, self._info, self._limits)
            parents = self.leases.lookup([b.state_id for b in branches], "branches[{}].state_id")
            max_chunks = self._info.max_chunks_per_branch
            for i, parent in enumerate(parents):
                if parent.depth >= max_chunks:
                    raise RequestError(grpc.StatusCode.OUT_OF_RANGE,
                                       f"branches[{i}].state_id={parent.wire_id!r} has been rolled {parent.depth} "
                                       f"chunks already, the model's max_chunks_per_branch={max_chunks}")
            self._metrics.branches_requested.inc(len(branches))
            reservation = self.leases.reserve(client_id, sum(b.keep_state for b in branches))
            self.leases.pin(parents)
            try:
                requests = [b.to_engine(parent.engine_id) for b, parent in zip(branches, parents, strict=True)]
                stream = self._engine.imagine_stream(requests, sampling, return_tokens=request.return_tokens,
                                                     return_images=request.return_images)
                async with aclosing(stream):
                    first = True
                    async for result in stream:
                        wire_id = ""
                        if result.state_id is not None:
                            wire_id = self.leases.add(result.state_id, parents[result.index].depth + 1, reservation)
                        if first:
                            self._metrics.first_result_latency.observe(time.monotonic() - start)
                            first = False
                        await self._send(context, convert.result_to_proto(result, wire_id, self._info), wire_id)
            finally:
                self.leases.unreserve(reservation)
                self._release_in_background(self.leases.unpin(parents))

    async def ReleaseStates(self, request: pb.ReleaseStatesRequest,
                            context: aio.ServicerContext) -> pb.ReleaseStatesResponse:
        async with self._rpc("ReleaseStates", context):
            wire_ids = convert.state_ids_from_proto(request.state_ids)
            engine_ids = self.leases.remove(wire_ids)
            if engine_ids:
                # Shielded: the leases are gone, so the engine release must happen even if the call is cancelled.
                await asyncio.shield(self._engine.release(engine_ids))
            return pb.ReleaseStatesResponse(num_released=len(wire_ids))

    async def GetStats(self, request: pb.GetStatsRequest, context: aio.ServicerContext) -> pb.Stats:
        async with self._rpc("GetStats", context):
            stats = await self.engine_stats()
            return convert.stats_to_proto(stats, self._metrics.tokens_per_second(stats))

    # ---- housekeeping (called by the server) ------------------------------------------------------
    async def engine_stats(self) -> EngineStats:
        """The engine's stats without blocking the event loop (the engine answers between two steps)."""
        return await asyncio.get_running_loop().run_in_executor(None, self._engine.stats)

    async def expire_leases(self) -> int:
        """Releases every state whose lease expired; returns how many."""
        engine_ids = self.leases.pop_expired()
        if engine_ids:
            await self._engine.release(engine_ids)
            self._metrics.states_expired.inc(len(engine_ids))
            logger.info("released %d states unused for %gs", len(engine_ids), self.leases.ttl)
        self._metrics.server_live_states.set(len(self.leases))
        return len(engine_ids)

    async def release_all(self) -> int:
        """Shutdown, after the gRPC server stopped: releases every live state; returns how many."""
        engine_ids = self.leases.drain()
        if engine_ids:
            await self._engine.release(engine_ids)
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        return len(engine_ids)

    # ---- helpers ----------------------------------------------------------------------------------
    @asynccontextmanager
    async def _rpc(self, method: str, context: aio.ServicerContext) -> AsyncIterator[None]:
        """Times the call and turns any failure into an aborted call with its status code and message."""
        with self._metrics.track(method) as outcome:
            self.num_in_flight += 1
            try:
                yield
            except aio.AbortError:
                raise
            except Exception as exc:
                status = status_of(exc)
                if status is None:  # a server bug: keep the traceback in the log, tell the client little
                    logger.exception("%s failed", method)
                    status = (grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}")
                outcome.code = status[0]
                await context.abort(*status)
            finally:
                self.num_in_flight -= 1

    async def _send(self, context: aio.ServicerContext, message: pb.ImagineResult, wire_id: str) -> None:
        try:
            await context.write(message)
        except BaseException:
            # The client may never see this state id (cancelled or gone): release the state now instead
            # of letting it wait for its lease to expire.
            if wire_id:
                self._release_in_background(self.leases.remove([wire_id]))
            raise

    async def _finish_or_release(self, creation: Awaitable[list[int]]) -> list[int]:
        """Awaits engine state creation; if the call is cancelled meanwhile, releases the states once made."""
        task = asyncio.ensure_future(creation)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._release_created)
            raise

    def _release_created(self, task: asyncio.Future) -> None:
        if not task.cancelled() and task.exception() is None:
            self._release_in_background(task.result())

    def _release_in_background(self, engine_ids: list[int]) -> None:
        if not engine_ids:
            return
        task = asyncio.get_running_loop().create_task(self._engine.release(engine_ids))
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("background release failed: %r", task.exception())
