"""A method against a baseline on the same evaluation episodes: the paired difference in success.

Two `evaluate --out` files with the same seeds hold the same scenes (and, sampled, the same per-episode noise),
so an episode's outcome under the method minus its outcome under the baseline removes the scene-to-scene
variance that dominates a 300-episode success rate. With several runs (training seeds) of the method, each
episode's outcome is first averaged over the runs, so the baseline's outcome of that episode counts once. The
standard error is over episodes, for these trained runs: it does not include how much another set of training
seeds would differ (the per-seed column of the report shows that spread). The shared noise holds on one machine only
(`trainer.machine`): files that record different machines are not paired.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

EpisodeKey = tuple[str, int]  # (env id, env seed)


def read_episode_outcomes(path: Path) -> dict[EpisodeKey, bool]:
    """(env id, env seed) -> success of every episode an `evaluate --out` JSON lists ({} if it lists none); a
    ValueError naming the file when an episode entry is malformed."""
    data = json.loads(Path(path).read_text())
    try:
        return {(str(e["env_id"]), int(e["seed"])): bool(e["success"]) for e in data.get("episodes", [])}
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: an episode entry needs env_id, seed and success: {exc!r}") from None


def read_machine(path: Path) -> dict | None:
    """The machine fingerprint an `evaluate --out` JSON records, or None for a file written before they did."""
    machine = json.loads(Path(path).read_text()).get("machine")
    return dict(machine) if isinstance(machine, dict) else None


def other_machines(baseline: dict | None, runs: list[dict | None]) -> list[dict]:
    """The recorded machines of `runs` that are not the baseline's (none when the baseline's is unrecorded)."""
    if baseline is None:
        return []
    return [m for m in runs if m is not None and m != baseline]


def paired_difference(method_runs: list[dict[EpisodeKey, bool]], baseline: dict[EpisodeKey, bool],
                      ) -> dict[str, float] | None:
    """Mean over episodes of (the method's success averaged over its runs - the baseline's success), its standard
    error over episodes, and the episode count; None unless every run lists exactly the baseline's episodes."""
    if not baseline or any(run.keys() != baseline.keys() for run in method_runs) or not method_runs:
        return None
    diffs = [statistics.fmean(float(run[k]) for run in method_runs) - float(baseline[k]) for k in sorted(baseline)]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
    return {"mean": statistics.fmean(diffs), "se": se, "episodes": len(diffs)}
