"""The served engine's thread reuses retained host memory like the in-process engine (runtime.host_memory)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import EngineConfig
from runtime.host_memory import share_main_heap
from tests.runtime.conftest import TINY_ENGINE

REPO_ROOT = Path(__file__).resolve().parents[2]
# In a fresh process (no thread has allocated yet): optionally share the main heap, let a new thread
# allocate, then count the malloc arenas in glibc's own report (one <heap nr=...> per arena).
COUNT_ARENAS = """
import ctypes, sys, threading
from runtime.host_memory import share_main_heap
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.fopen.restype = ctypes.c_void_p
if sys.argv[1] == "share":
    assert share_main_heap()
thread = threading.Thread(target=lambda: libc.malloc(1 << 20))
thread.start()
thread.join()
report = libc.fopen(sys.argv[2].encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(report))
libc.fclose(ctypes.c_void_p(report))
"""


def arenas_after_a_thread_allocates(share: bool, tmp_path: Path) -> int:
    report = tmp_path / f"malloc_info_{share}.xml"
    subprocess.run([sys.executable, "-c", COUNT_ARENAS, "share" if share else "own", str(report)], cwd=REPO_ROOT,
                   check=True, timeout=60)
    return report.read_text().count("<heap nr=")


def test_share_main_heap_is_accepted_by_glibc():
    assert share_main_heap() is True


def test_a_thread_started_after_share_main_heap_allocates_from_the_main_arena(tmp_path):
    assert arenas_after_a_thread_allocates(share=False, tmp_path=tmp_path) == 2  # glibc's default: its own
    assert arenas_after_a_thread_allocates(share=True, tmp_path=tmp_path) == 1


@pytest.mark.parametrize(("engine_config", "expected"), [
    (TINY_ENGINE, True),
    (EngineConfig(block_size=8, num_kv_blocks=2048, retain_host_memory=False), False),
])
def test_server_shares_the_main_heap_when_the_engine_retains_host_memory(start_server, engine_config, expected):
    assert start_server(engine_config).server.shares_main_heap is expected
