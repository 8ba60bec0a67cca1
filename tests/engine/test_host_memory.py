"""The engine's step thread (AsyncEngine) reuses retained host memory like the calling thread does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from engine.host_memory import retain_freed_host_memory

REPO_ROOT = Path(__file__).resolve().parents[2]
# In a fresh process (no thread has allocated yet): optionally apply the engine's host-memory settings, let
# a new thread allocate, then count the malloc arenas in glibc's own report (one <heap nr=...> per arena).
COUNT_ARENAS = """
import ctypes, sys, threading
from engine.host_memory import retain_freed_host_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.fopen.restype = ctypes.c_void_p
if sys.argv[1] == "retain":
    assert retain_freed_host_memory()
thread = threading.Thread(target=lambda: libc.malloc(1 << 20))
thread.start()
thread.join()
report = libc.fopen(sys.argv[2].encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(report))
libc.fclose(ctypes.c_void_p(report))
"""


def arenas_after_a_thread_allocates(retain: bool, tmp_path: Path) -> int:
    report = tmp_path / f"malloc_info_{retain}.xml"
    subprocess.run([sys.executable, "-c", COUNT_ARENAS, "retain" if retain else "default", str(report)],
                   cwd=REPO_ROOT, check=True, timeout=60)
    return report.read_text().count("<heap nr=")


def test_retain_freed_host_memory_is_accepted_by_glibc():
    assert retain_freed_host_memory() is True


def test_a_thread_started_after_retaining_host_memory_allocates_from_the_main_arena(tmp_path):
    assert arenas_after_a_thread_allocates(retain=False, tmp_path=tmp_path) == 2  # glibc's default: its own
    assert arenas_after_a_thread_allocates(retain=True, tmp_path=tmp_path) == 1
