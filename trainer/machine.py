"""The machine an evaluation ran on, recorded beside its outcomes.

The same policy on the same seeds plays different episodes on another CPU or library build: the floating-point
kernels torch and MuJoCo pick per instruction set round differently, and a rounding that flips one argmax or one
contact changes the rest of the episode (measured: `checkpoints/sft_reference`'s greedy buffer command records
25,838 steps and 73 successes on one 2-core machine, 25,730 and 72 on another). A paired difference counts on
both evaluations meeting the same noise, so it is only computed between evaluations of one fingerprint.
"""

from __future__ import annotations

import platform
from pathlib import Path

import mujoco
import numpy as np
import torch

CPUINFO = Path("/proc/cpuinfo")


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's model name from /proc/cpuinfo where there is one, else what `platform` says."""
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    return platform.processor() or platform.machine()


def machine_fingerprint() -> dict[str, str]:
    """What decides the floating-point results of an evaluation: CPU, the instruction set torch dispatches to,
    and the numeric libraries' versions."""
    return {"cpu": cpu_model(), "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
            "torch": torch.__version__, "mujoco": mujoco.__version__, "numpy": np.__version__}
