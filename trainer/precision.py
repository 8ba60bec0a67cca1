"""Training precision: bfloat16 autocast where the hardware computes bfloat16 natively, float32 elsewhere.

`--precision auto` (the default of `train-tokenizer` and `train-world-model`) trains under bfloat16 autocast on
CUDA and on CPUs with native bfloat16 instructions (AVX512-BF16 or AMX-BF16), float32 otherwise; `bfloat16` and
`float32` force one. Weights, optimizer state and losses stay float32 either way. Measured on this project's
2-core AMD EPYC (AVX512-BF16), one training step on both cores against float32 in the same run
(`python -m benchmarks.training_precision`, benchmarks/results/training_precision_cpu.json): the image tokenizer
(batch 64) 2.7x faster (2.6 s against 7.0 s, channels-last convolutions included), the world model (batch 8 x
562 tokens) 1.5x (0.99 s against 1.46 s; 1.33x on a rerun; its attention, not its GEMMs, is then most of
the step); first-step
losses agree to 1e-4.
"""

from __future__ import annotations

import torch

PRECISIONS = ("auto", "float32", "bfloat16")


class PrecisionError(ValueError):
    """An unknown precision name; the message lists the valid ones."""


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX-BF16)."""
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def precision_problem(precision: str) -> str | None:
    """What is wrong with a precision name (for a config's list of problems), or None when it is valid."""
    if precision in PRECISIONS:
        return None
    return f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"


def uses_bf16_autocast(precision: str, device: torch.device) -> bool:
    """Whether a training run on `device` with `precision` computes under bfloat16 autocast."""
    if problem := precision_problem(precision):
        raise PrecisionError(problem)
    if precision != "auto":
        return precision == "bfloat16"
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
