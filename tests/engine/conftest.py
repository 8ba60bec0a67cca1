"""Shared fixtures for the engine tests: a tiny random checkpoint (4 image tokens per view)."""

from __future__ import annotations

import pytest
from engine_helpers import TINY_MODEL, tiny_layout_with

from engine.checkpoint import write_random_checkpoint


@pytest.fixture(scope="session")
def tiny_layout():
    return tiny_layout_with(max_chunks_per_branch=3)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_layout):
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", tiny_layout, seed=0, **TINY_MODEL)
