"""Fixtures for the rollout-server tests: a tiny random checkpoint and real servers on 127.0.0.1.

Each server runs `runtime.server.RolloutServer` on its own event loop in a background thread, so tests
drive it with the blocking client and raw stubs exactly as a trainer would. On teardown every server is
checked to hold zero live states and zero used KV blocks: each test must leave nothing behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from engine.checkpoint import layout_for_tokenizer, write_random_checkpoint
from engine.config import EngineConfig
from engine.engine import Engine
from engine.image_tokenizer import ImageTokenizerConfig
from protos.vla_mbpo.v1 import world_model_pb2_grpc
from runtime.config import ServerConfig
from runtime.server import RolloutServer

# 8x8 images, 2x2 token grid: tokens_per_view 4, codebook 16.
TINY_TOKENIZER = ImageTokenizerConfig(image_size=8, fsq_levels=(4, 4), stage_channels=(32, 32))
VIEWS = ("head", "wrist")
CHUNK_SIZE, ACTION_DIM = 2, 2
TINY_ENGINE = EngineConfig(block_size=8, num_kv_blocks=2048)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    layout = layout_for_tokenizer(TINY_TOKENIZER, views=VIEWS, chunk_size=CHUNK_SIZE, action_dim=ACTION_DIM,
                                  action_low=(-1.0, -1.0), action_high=(1.0, 1.0), max_chunks_per_branch=3,
                                  max_instruction_bytes=32)
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", layout, hidden_size=32, num_layers=2,
                                   num_heads=2, num_kv_heads=1, intermediate_size=64, seed=0)


class ServerThread:
    """A RolloutServer on its own event loop thread; `target` is its host:port."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self.thread.start()
        self.server = RolloutServer(engine, config)
        self.port = self.run(self.server.start())
        self.target = f"127.0.0.1:{self.port}"
        self.stopped = False

    def run(self, coroutine, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def engine_stats(self):
        return self.server.async_engine.stats()

    def stop(self, grace: float = 1.0) -> None:
        if not self.stopped:
            self.stopped = True
            self.run(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()


@pytest.fixture
def start_server(tiny_checkpoint: Path) -> Iterator[Callable[..., ServerThread]]:
    """start_server(engine_config=TINY_ENGINE, **ServerConfig overrides) -> a running ServerThread."""
    servers: list[ServerThread] = []

    def start(engine_config: EngineConfig = TINY_ENGINE, **overrides) -> ServerThread:
        config = ServerConfig(checkpoint=str(tiny_checkpoint), port=0, **overrides)
        server = ServerThread(Engine.from_checkpoint(tiny_checkpoint, engine_config), config)
        servers.append(server)
        return server

    yield start
    leftovers = []
    for server in servers:
        if not server.stopped:
            stats = server.engine_stats()
            if stats.live_states or stats.kv_blocks_used or len(server.server.leases):
                leftovers.append(dataclasses.replace(stats, extra={}))
        server.stop()
    assert leftovers == [], "a test left live states or used KV blocks behind"


@pytest.fixture
def server(start_server) -> ServerThread:
    return start_server()


def stub(target: str) -> tuple[grpc.Channel, world_model_pb2_grpc.WorldModelStub]:
    channel = grpc.insecure_channel(target)
    return channel, world_model_pb2_grpc.WorldModelStub(channel)


def observations(num: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{view: rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for view in VIEWS} for _ in range(num)]


def action_chunks(num: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (num, CHUNK_SIZE, ACTION_DIM)).astype(np.float32)
