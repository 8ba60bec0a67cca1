"""`vla-mbpo serve`: the gRPC rollout server (WorldModel + health + reflection) over one engine.

Lifecycle: load the checkpoint, bind (localhost unless told otherwise), mark health SERVING, serve until
SIGTERM/SIGINT, then stop gracefully: health NOT_SERVING, refuse new calls, let in-flight calls finish
for `grace_period` seconds and cancel the rest (which frees their engine work), release every live
state, close the engine. One log line at start, one at stop.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from engine.config import EngineConfig
from engine.engine import AsyncEngine, Engine
from engine.types import EngineError
from protos.vla_mbpo.v1 import world_model_pb2_grpc
from runtime.auth import BearerTokenInterceptor
from runtime.config import (
    SERVICE_NAME,
    ConfigError,
    ServerConfig,
    add_config_arguments,
    config_from_arguments,
)
from runtime.convert import RequestLimits
from runtime.leases import LeaseTable
from runtime.metrics import ServerMetrics
from runtime.servicer import WorldModelServicer

logger = logging.getLogger("vla_mbpo.runtime")
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class RolloutServer:
    """One grpc.aio server over one engine. `start`/`stop` must run on the same event loop."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.config = config
        self.engine = engine
        self.async_engine = AsyncEngine(engine)
        self.info = engine.model_info
        self.limits = RequestLimits(max_states_per_request=config.max_states_per_request,
                                    max_branches_per_request=config.max_branches_per_request,
                                    max_instruction_bytes=engine.layout.max_instruction_bytes)
        self.metrics = ServerMetrics(self.async_engine.stats)
        self.leases = LeaseTable(config.state_ttl, config.max_states_per_client)
        self.servicer = WorldModelServicer(self.async_engine, self.info, self.limits, self.leases, self.metrics)
        self.health = HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: aio.Server | None = None
        self._housekeeping: asyncio.Task | None = None
        self._started_at = 0.0

    @property
    def address(self) -> str:
        host = self.config.host
        return f"[{host}]:{self.port}" if ":" in host and not host.startswith("[") else f"{host}:{self.port}"

    async def start(self) -> int:
        """Binds, starts serving and returns the bound gRPC port (useful with port 0)."""
        config = self.config
        interceptors = [BearerTokenInterceptor(config.token)] if config.token else []
        options = [("grpc.max_receive_message_length", config.max_message_bytes),
                   ("grpc.max_send_message_length", config.max_message_bytes),
                   ("grpc.so_reuseport", 0)]  # a second server on a busy port must fail, not share it
        server = aio.server(interceptors=interceptors, options=options)
        world_model_pb2_grpc.add_WorldModelServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server)
        self.port = config.port
        bind = self.address
        if config.tls:
            key, cert = config.read_tls_pair()
            self.port = server.add_secure_port(bind, grpc.ssl_server_credentials([(key, cert)]))
        else:
            self.port = server.add_insecure_port(bind)
        await server.start()
        self._server = server
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if config.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(config.host, config.metrics_port)
        self._housekeeping = asyncio.get_running_loop().create_task(self._housekeep())
        self._started_at = time.monotonic()
        info = self.info
        logger.info("serving %s on %s: model %s version %s, views %s, tls %s, auth %s, metrics %s, state ttl %gs",
                    SERVICE_NAME, self.address, info.model_name, info.model_version, ",".join(info.views),
                    "on" if config.tls else "off", "on" if config.token else "off",
                    f"port {self.metrics_port}" if self.metrics_port is not None else "off", config.state_ttl)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop; safe to call twice. `grace` defaults to the config's grace period."""
        if self._server is None:
            return
        server, self._server = self._server, None
        grace = self.config.grace_period if grace is None else grace
        # NOT_SERVING first (and for good: later sets are ignored), so probes drain traffic away.
        await self.health.enter_graceful_shutdown()
        in_flight = self.servicer.num_in_flight
        await server.stop(grace)  # refuses new calls, waits `grace`, then cancels what is left
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            await asyncio.gather(self._housekeeping, return_exceptions=True)
        released = await self.servicer.release_all()
        self.metrics.stop_http()
        # close() joins the engine thread, which may be finishing a step: keep the loop responsive.
        await asyncio.get_running_loop().run_in_executor(None, self.async_engine.close)
        logger.info("stopped %s on %s after %.1fs: calls in flight at stop %d, live states released %d",
                    SERVICE_NAME, self.address, time.monotonic() - self._started_at, in_flight, released)

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def _housekeep(self) -> None:
        while True:
            await asyncio.sleep(self.config.housekeeping_interval)
            try:
                await self.servicer.expire_leases()
                self.metrics.tokens_per_second(await self.servicer.engine_stats())
            except Exception:  # keep sweeping: one failed release must not stop lease expiry
                logger.exception("housekeeping failed")


async def serve_until_signalled(server: RolloutServer) -> None:
    """Starts the server and stops it gracefully on the first SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await server.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vla-mbpo serve",
        description="Serve a world-model checkpoint over gRPC (vla_mbpo.v1.WorldModel, health, reflection).")
    add_config_arguments(parser, ServerConfig, title="server")
    add_config_arguments(parser, EngineConfig, prefix="engine", title="engine")
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_arguments(ServerConfig, args)
        engine_config = config_from_arguments(EngineConfig, args, prefix="engine")
    except (ConfigError, EngineError) as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        engine = Engine.from_checkpoint(config.checkpoint, engine_config)
        server = RolloutServer(engine, config)
        asyncio.run(serve_until_signalled(server))
    except (ConfigError, EngineError, RuntimeError) as exc:  # unreadable checkpoint/TLS files, busy port
        print(f"vla-mbpo serve: {exc}", file=sys.stderr)
        return 1
    return 0
