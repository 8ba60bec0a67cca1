"""Helpers shared by the engine tests (imported by name: tests/ is not a package)."""

from __future__ import annotations

import numpy as np

from engine.checkpoint import layout_for_tokenizer
from engine.config import EngineConfig
from engine.engine import Engine
from engine.image_tokenizer import ImageTokenizerConfig
from engine.types import BranchRequest, StartState

TINY_TOKENIZER = ImageTokenizerConfig(image_size=8, fsq_levels=(4, 4), stage_channels=(32, 32))
TINY_MODEL = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)


def tiny_layout_with(**fields):
    return layout_for_tokenizer(TINY_TOKENIZER, **fields)


def make_engine(checkpoint, **config) -> Engine:
    config.setdefault("block_size", 4)
    config.setdefault("num_kv_blocks", 1024)
    config.setdefault("num_threads", 1)  # a shared 2-core machine: a second OpenMP thread only waits
    return Engine.from_checkpoint(checkpoint, EngineConfig(**config))


def start_state(layout, seed: int, instruction: str = "pick up the red cube") -> StartState:
    rng = np.random.default_rng(seed)
    shape = (layout.image_height, layout.image_width, 3)
    return StartState(instruction, {view: rng.integers(0, 256, shape, dtype=np.uint8) for view in layout.views})


def actions(layout, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (layout.chunk_size, layout.action_dim))


def branch(layout, state_id: int, seed: int, keep_state: bool = False) -> BranchRequest:
    return BranchRequest(state_id, actions(layout, seed), seed=seed, keep_state=keep_state)


def write_tiny_checkpoint(path, layout, **model):
    from engine.checkpoint import write_random_checkpoint

    return write_random_checkpoint(path, layout, seed=0, **(model or TINY_MODEL))
