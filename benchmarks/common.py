"""Shared benchmark helpers: machine description, a GEMM roofline measured in the same run, timers."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

import torch


def machine_info() -> dict:
    """What the numbers were measured on (printed and stored with every result)."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processor": _cpu_model(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["load_average_1m"] = os.getloadavg()[0]
    except OSError:
        info["load_average_1m"] = None
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def best_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None] | None = None) -> float:
    """The fastest of `repeats` timed calls (after one untimed warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        best = min(best, time.perf_counter() - start)
    return best


def gemm_flops_per_second(size: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32,
                          device: str = "cpu") -> float:
    """Achieved FLOP/s of one large square matmul: the practical roofline of this machine and thread count."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    out = torch.empty(size, size, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    seconds = best_seconds(lambda: torch.matmul(a, b, out=out), repeats, sync)
    return 2 * size**3 / seconds


def format_table(rows: list[tuple[str, str]], title: str) -> str:
    width = max(len(name) for name, _ in rows)
    lines = [title, "-" * len(title)]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)
