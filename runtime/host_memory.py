"""Keeps the served engine's host memory as fast as the in-process engine's (CPU, glibc only).

The engine retains freed host memory (EngineConfig.retain_host_memory: glibc mallopt, no mmap, no trim)
so its large per-step K/V gathers reuse warm pages. That holds for the main malloc arena only. The server
runs the engine's step loop in a background thread (AsyncEngine), and glibc gives each new thread its own
arena, built from 64 MiB heaps that are unmapped again when they empty: every step's gathers then fault
their pages in afresh. Measured here on the server's engine thread during a served 32 x 16 x 2 run: 31M
minor page faults, 62 s of system time beside 134 s of user time (the in-process engine: ~1% system time).
A micro-benchmark (1 torch thread, 30 x allocate-and-fill of 8/40/100/200 MB tensors): 0.5 s on the main
thread, 4.4 s on a new thread (3.9 s of it system time), 0.6 s on a new thread that shares the main arena.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_ARENA_MAX = -8  # glibc mallopt parameter: the most malloc arenas the process may create


def share_main_heap() -> bool:
    """Makes threads that allocate for the first time from now on use the main malloc arena (glibc
    `mallopt(M_ARENA_MAX, 1)`). Call it before starting the engine's thread. Returns whether the C library
    accepted the setting (False where it is not glibc; nothing changes then)."""
    name = ctypes.util.find_library("c")
    try:
        return bool(ctypes.CDLL(name).mallopt(_M_ARENA_MAX, 1))
    except (OSError, AttributeError, TypeError):
        return False
