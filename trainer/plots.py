"""Learning curves as PNG: real success vs training iteration and vs real env steps, every method.

Each method is a list of runs (seeds) whose metrics.jsonl carry `iteration`, `real_env_steps` and, where
evaluated, `real/success_mean`; seeds are averaged at equal iterations and the spread (min..max) is shaded.
`vla-mbpo report` draws them beside its results table; from evaluations of saved policies at several
iterations (`report --eval-file`) it draws success vs iteration with `plot_evaluated_iterations`.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SUCCESS_KEY = "real/success_mean"
EVAL_TEMPERATURE_KEY = "real/eval_temperature"  # in the record of a sampled in-training evaluation only
REFERENCE_STYLES = ("-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1)))  # line styles of the methods evaluated once


def read_metrics(path: Path) -> list[dict]:
    """Every JSON record of a metrics.jsonl file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def success_points(records: list[dict], x_key: str) -> dict[int, tuple[float, float]]:
    """iteration -> (x, success %) of the evaluated records (the last one where an iteration has two)."""
    return {int(r["iteration"]): (float(r[x_key]), 100.0 * r[SUCCESS_KEY]) for r in records if SUCCESS_KEY in r}


def aggregate(runs: list[dict[int, tuple[float, float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Over seeds, at every evaluated iteration that all seeds share: the mean x (seeds spend different real
    env steps per iteration) and the mean, min and max success. Returns (x, mean, low, high)."""
    shared = sorted(set.intersection(*[set(points) for points in runs])) if runs else []
    if not shared:
        return (np.zeros(0),) * 4
    xs = np.array([[points[i][0] for i in shared] for points in runs])  # [seeds, points]
    ys = np.array([[points[i][1] for i in shared] for points in runs])
    return xs.mean(0), ys.mean(0), ys.min(0), ys.max(0)


@dataclass(frozen=True)
class EvaluatedCurve:
    """One method's real success (fractions) at each evaluated iteration, over its seeds."""

    iterations: list[int]
    mean: list[float]
    low: list[float]
    high: list[float]
    seeds: int


def plot_learning_curves(runs: dict[str, list[Path]], out_dir: Path, sft_success: float | None = None) -> list[Path]:
    """Writes success_vs_iteration.png and success_vs_real_steps.png into out_dir; returns their paths."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for x_key, x_label, name in (("iteration", "training iteration", "success_vs_iteration.png"),
                                 ("real_env_steps", "real env steps (control steps)", "success_vs_real_steps.png")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for label, paths in runs.items():
            x, mean, low, high = aggregate([success_points(read_metrics(p), x_key) for p in paths])
            if x.size == 0:
                continue
            seeds = f" ({len(paths)} seeds)" if len(paths) > 1 else ""
            ax.plot(x, mean, marker="o", label=label + seeds)
            if len(paths) > 1:
                ax.fill_between(x, low, high, alpha=0.2)
        written.append(_save(plt, fig, ax, x_label, sft_success, out_dir / name))
    return written


def plot_evaluated_iterations(curves: dict[str, EvaluatedCurve], references: dict[str, float], out_dir: Path,
                              sft_success: float | None = None, rule: str = "") -> Path:
    """success_vs_iteration.png from evaluations of saved policies (`report --eval-file`): each curve is one
    method's seeds evaluated at several iterations (mean, min..max shaded), each reference a method evaluated
    once (online PPO at its real steps) drawn as a horizontal line. Fractions in, percent drawn."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, c in curves.items():
        seeds = f" ({c.seeds} seeds)" if c.seeds > 1 else ""
        line, = ax.plot(c.iterations, 100.0 * np.asarray(c.mean), marker="o", label=label + seeds)
        if c.seeds > 1:
            ax.fill_between(c.iterations, 100.0 * np.asarray(c.low), 100.0 * np.asarray(c.high), alpha=0.2,
                            color=line.get_color())
    for (label, success), style in zip(references.items(), itertools.cycle(REFERENCE_STYLES)):
        ax.axhline(100.0 * success, color="black", linestyle=style, linewidth=1.0, label=label)
    if rule:
        ax.set_title(f"actions at evaluation: {rule}", fontsize=9)
    return _save(plt, fig, ax, "training iteration", sft_success, out_dir / "success_vs_iteration.png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, ax, x_label: str, sft_success: float | None, path: Path) -> Path:
    if sft_success is not None:
        ax.axhline(100.0 * sft_success, color="grey", linestyle="--", label="SFT")
    ax.set_xlabel(x_label)
    ax.set_ylabel("real success, mean over task families (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
