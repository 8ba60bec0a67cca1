"""Learning curves as PNG: real success vs training iteration and vs real env steps, every method.

Each method is a list of runs (seeds) whose metrics.jsonl carry `iteration`, `real_env_steps` and, where
evaluated, `real/success_mean`; seeds are averaged at equal iterations and the spread (min..max) is shaded.
`vla-mbpo report` draws them beside its results table.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SUCCESS_KEY = "real/success_mean"
EVAL_TEMPERATURE_KEY = "real/eval_temperature"  # in the record of a sampled in-training evaluation only


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


def plot_learning_curves(runs: dict[str, list[Path]], out_dir: Path, sft_success: float | None = None) -> list[Path]:
    """Writes success_vs_iteration.png and success_vs_real_steps.png into out_dir; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        if sft_success is not None:
            ax.axhline(100.0 * sft_success, color="grey", linestyle="--", label="SFT")
        ax.set_xlabel(x_label)
        ax.set_ylabel("real success, mean over task families (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        written.append(out_dir / name)
    return written
