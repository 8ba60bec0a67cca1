"""`vla-mbpo report`: the results table over methods and seeds, and the learning-curve PNGs.

Each `--run LABEL=DIR` is one seed of one method. A training run (`vla-mbpo train`, `train-online-ppo`)
contributes its last evaluated record of DIR/metrics.jsonl; a directory without one (an SFT policy, whose
metrics.jsonl holds only its losses, evaluated by `sft --eval-episodes` or `evaluate --out DIR/eval.json`)
contributes DIR/eval.json. With `--eval-file NAME` every run contributes DIR/NAME instead (an `evaluate --out`
JSON, e.g. the final policy sampled at a temperature), its real env steps still read from its metrics.
Per method: real success per seed, mean, sample std and min..max, per task family too, and the real env
steps spent. Every run of one report must follow one action rule (the mode, or sampling at one temperature):
a table that mixes them is refused, naming the runs of each rule. From `--eval-file` tables whose baseline
(`--sft-label`) is one run evaluated on the same episodes, each method also gets its paired difference to it
(`trainer.paired_comparison`), unless their files record different machines (`trainer.machine`: then n/a,
with the machines in results.json); a method given one directory per (seed, iteration), its policies saved at
several iterations, gets a row per iteration and a curve of success vs iteration. Writes OUT/results.json,
OUT/results.md and the learning curves.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from trainer.config import format_action_rule
from trainer.paired_comparison import other_machines, paired_difference, read_episode_outcomes, read_machine
from trainer.plots import (
    EVAL_TEMPERATURE_KEY,
    SUCCESS_KEY,
    EvaluatedCurve,
    plot_evaluated_iterations,
    plot_learning_curves,
    read_metrics,
)

FAMILY_PREFIX = "real/success_"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
UNRECORDED_RULE = "unrecorded"  # an `evaluate --out` JSON written before evaluations recorded their rule


class ReportError(ValueError):
    """A run directory with no evaluated result; the message names it."""


@dataclass(frozen=True)
class RunResult:
    """The final real-env success of one seed of one method."""

    run_dir: str
    mean_success: float  # fraction over task families
    success_rate: dict[str, float]  # family -> fraction
    real_env_steps: int | None  # None for a policy that was not trained by RL (SFT)
    iteration: int | None
    action_rule: str  # "mode", "sampled T=...", or UNRECORDED_RULE


def read_run(run_dir: Path, eval_file: str | None = None) -> RunResult:
    """The last evaluated record of a training run, or a policy directory's eval.json; with `eval_file`, that
    file of the run directory (the real env steps and iteration of a training run from its last record)."""
    if eval_file is not None:
        return _read_named_evaluation(run_dir, eval_file)
    metrics = run_dir / METRICS_FILE
    evaluation = run_dir / EVAL_FILE
    evaluated = [r for r in read_metrics(metrics) if SUCCESS_KEY in r] if metrics.is_file() else []
    if evaluated:
        last = evaluated[-1]
        families = {k[len(FAMILY_PREFIX):]: float(v) for k, v in last.items()
                    if k.startswith(FAMILY_PREFIX) and k != SUCCESS_KEY}
        rule = format_action_rule(EVAL_TEMPERATURE_KEY not in last, float(last.get(EVAL_TEMPERATURE_KEY, 1.0)))
        return RunResult(str(run_dir), float(last[SUCCESS_KEY]), families, int(last.get("real_env_steps", 0)),
                         int(last.get("iteration", 0)), rule)
    if evaluation.is_file():
        mean, rates, rule = read_evaluation(evaluation)
        return RunResult(str(run_dir), mean, rates, None, None, rule)
    if metrics.is_file():
        raise ReportError(f"{metrics} holds no evaluated record ({SUCCESS_KEY}) and {run_dir} has no {EVAL_FILE}; "
                          "train with --eval-episodes > 0 or run `vla-mbpo evaluate --out DIR/eval.json`")
    raise ReportError(f"{run_dir} has neither {METRICS_FILE} nor {EVAL_FILE}")


def read_evaluation(path: Path) -> tuple[float, dict[str, float], str]:
    """(mean success, family -> success, action rule) of an `evaluate --out` JSON; a ReportError naming a
    missing or malformed file."""
    if not path.is_file():
        raise ReportError(f"{path} does not exist; write it with `vla-mbpo evaluate --policy ... --out {path}`")
    try:
        data = json.loads(path.read_text())
        rates = {k: float(v) for k, v in data["success_rate"].items()}
        return float(data["mean_success"]), rates, str(data.get("action_rule", UNRECORDED_RULE))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ReportError(f"{path} is not an `evaluate --out` JSON (mean_success, success_rate): {exc!r}") from exc


def _read_named_evaluation(run_dir: Path, eval_file: str) -> RunResult:
    mean, rates, rule = read_evaluation(run_dir / eval_file)
    metrics = run_dir / METRICS_FILE
    trained = [r for r in read_metrics(metrics) if "real_env_steps" in r] if metrics.is_file() else []
    steps, iteration = (int(trained[-1]["real_env_steps"]), int(trained[-1].get("iteration", 0))) if trained else \
        (None, None)
    return RunResult(str(run_dir), mean, rates, steps, iteration, rule)


def check_one_action_rule(results: list[RunResult]) -> str:
    """The action rule all `results` share; a ReportError naming the runs of each rule when they differ."""
    by_rule: dict[str, list[str]] = {}
    for r in results:
        by_rule.setdefault(r.action_rule, []).append(r.run_dir)
    if len(by_rule) == 1:
        return next(iter(by_rule))
    parts = "; ".join(f"{rule}: {', '.join(dirs)}" for rule, dirs in sorted(by_rule.items()))
    hint = (f" ({UNRECORDED_RULE}: written before evaluations recorded their rule; re-run `vla-mbpo evaluate "
            "--out`)") if UNRECORDED_RULE in by_rule else ""
    raise ReportError(f"the runs of one table must follow one action rule, got {parts}{hint}")


def summarize(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one seed), min and max."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "min": min(values), "max": max(values)}


def method_summary(results: list[RunResult]) -> dict:
    families = sorted(set.intersection(*[set(r.success_rate) for r in results]))
    steps = {r.real_env_steps for r in results}
    return {"seeds": len(results), "success": summarize([r.mean_success for r in results]),
            "per_family": {f: summarize([r.success_rate[f] for r in results]) for f in families},
            "real_env_steps": sorted(s for s in steps if s is not None), "runs": [asdict(r) for r in results]}


def format_results(summary: dict[str, dict], baseline_label: str | None = None) -> str:
    """Markdown: one row per method, success % as mean +- std (min..max) over seeds, each seed's value; with
    paired differences in the summary, a last column of them (points, +- one standard error over episodes)."""
    families = sorted({f for m in summary.values() for f in m["per_family"]})
    paired = any("paired_vs_baseline" in m for m in summary.values())
    extra = f" vs {baseline_label}, paired (points) |" if paired else ""
    lines = ["| method | seeds | mean success % | " + " | ".join(families) + " | per seed | real env steps |" + extra,
             "|---" * (len(families) + 5 + int(paired)) + "|"]
    for label, m in summary.items():
        s = m["success"]
        cells = [f"{100 * m['per_family'][f]['mean']:.1f}" if f in m["per_family"] else "" for f in families]
        per_seed = " / ".join(f"{100 * r['mean_success']:.1f}" for r in m["runs"])
        steps = ", ".join(str(x) for x in m["real_env_steps"]) or "-"
        spread = f"{100 * s['mean']:.1f} +- {100 * s['std']:.1f} ({100 * s['min']:.1f}..{100 * s['max']:.1f})"
        row = f"| {label} | {m['seeds']} | {spread} | " + " | ".join(cells) + f" | {per_seed} | {steps} |"
        if paired:
            d = m.get("paired_vs_baseline")
            if d:
                row += f" {100 * d['mean']:+.1f} +- {100 * d['se']:.1f} ({d['episodes']} episodes) |"
            elif label == baseline_label:
                row += " - |"
            elif "paired_refused" in m:  # evaluated on another machine than the baseline: not the same noise
                row += " n/a (another machine) |"
            else:  # runs evaluated on other episodes than the baseline's
                row += " n/a (other episodes) |"
        lines.append(row)
    return "\n".join(lines)


def add_paired_differences(summary: dict[str, dict], runs: dict[str, list[Path]], baseline_label: str,
                           eval_file: str) -> None:
    """Adds `paired_vs_baseline` to every method evaluated on exactly the baseline's episodes on the baseline's
    machine, `paired_refused` (which machines differ) to a method evaluated on the same episodes elsewhere."""
    def outcomes(run_dir: Path) -> dict:
        try:
            return read_episode_outcomes(run_dir / eval_file)
        except ValueError as exc:
            raise ReportError(str(exc)) from None

    baseline = outcomes(runs[baseline_label][0])
    baseline_machine = read_machine(runs[baseline_label][0] / eval_file)
    for label, dirs in runs.items():
        if label == baseline_label:
            continue
        elsewhere = other_machines(baseline_machine, [read_machine(d / eval_file) for d in dirs])
        if elsewhere:
            summary[label]["paired_refused"] = {"baseline_machine": baseline_machine, "other_machines": elsewhere}
            continue
        difference = paired_difference([outcomes(d) for d in dirs], baseline)
        if difference is not None:
            summary[label]["paired_vs_baseline"] = difference


def build_report(runs: dict[str, list[Path]], out_dir: Path, sft_label: str | None = None,
                 eval_file: str | None = None) -> dict[str, dict]:
    """Reads every run, writes results.json/results.md and the learning curves; returns the summary.
    With `eval_file` the table comes from that file of every run and the in-training curves are not drawn
    (their evaluations may follow another rule); a single `sft_label` run there is the baseline of the paired
    differences, and a method whose directories hold policies saved at several iterations (seeds continued
    with --resume) gets a row per iteration, "LABEL, N it.", and a curve in success_vs_iteration.png."""
    results = {label: [read_run(d, eval_file) for d in dirs] for label, dirs in runs.items()}
    rule = check_one_action_rule([r for rs in results.values() for r in rs])
    series: dict[str, list[str]] = {}
    if eval_file is not None:
        runs, results, series = rows_per_iteration(runs, results)
    summary = {label: method_summary(rs) for label, rs in results.items()}
    if eval_file is not None and sft_label in runs and len(runs[sft_label]) == 1:
        add_paired_differences(summary, runs, sft_label, eval_file)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2))
    table = format_results(summary, sft_label)
    (out_dir / "results.md").write_text(table + f"\n\nActions at evaluation: {rule}.\n")
    curves = {label: [d / METRICS_FILE for d in dirs] for label, dirs in runs.items()
              if eval_file is None and all(r["iteration"] is not None for r in summary[label]["runs"])}
    sft = summary[sft_label]["success"]["mean"] if sft_label in summary else None
    if curves:
        plot_learning_curves(curves, out_dir, sft)
    if series:
        plot_evaluated_iterations(evaluated_curves(summary, series), reference_lines(summary, series, sft_label),
                                  out_dir, sft, rule)
    return summary


def rows_per_iteration(runs: dict[str, list[Path]], results: dict[str, list[RunResult]]
                       ) -> tuple[dict[str, list[Path]], dict[str, list[RunResult]], dict[str, list[str]]]:
    """Splits every method whose runs were trained to more than one iteration into one row per iteration,
    labelled "LABEL, N it."; returns the new runs and results and, per split method, its rows in order."""
    new_runs: dict[str, list[Path]] = {}
    new_results: dict[str, list[RunResult]] = {}
    series: dict[str, list[str]] = {}
    for label, rs in results.items():
        iterations = sorted({r.iteration for r in rs if r.iteration is not None})
        if len(iterations) < 2 or any(r.iteration is None for r in rs):
            new_runs[label], new_results[label] = runs[label], rs
            continue
        series[label] = [f"{label}, {it} it." for it in iterations]
        taken = sorted(set(series[label]) & set(results))
        if taken:
            raise ReportError(f"method {label!r} was saved at iterations {iterations}, so it gets rows "
                              f"{series[label]}, but {taken} is already another method's label; rename one")
        for it, row in zip(iterations, series[label], strict=True):
            new_results[row] = [r for r in rs if r.iteration == it]
            new_runs[row] = [Path(r.run_dir) for r in new_results[row]]
    return new_runs, new_results, series


def evaluated_curves(summary: dict[str, dict], series: dict[str, list[str]]) -> dict[str, EvaluatedCurve]:
    """Per split method, its rows' success (mean, min, max over seeds) against their iteration."""
    curves = {}
    for label, rows in series.items():
        success = [summary[row]["success"] for row in rows]
        curves[label] = EvaluatedCurve(iterations=[summary[row]["runs"][0]["iteration"] for row in rows],
                                       mean=[s["mean"] for s in success], low=[s["min"] for s in success],
                                       high=[s["max"] for s in success],
                                       seeds=min(summary[row]["seeds"] for row in rows))
    return curves


def reference_lines(summary: dict[str, dict], series: dict[str, list[str]], sft_label: str | None
                    ) -> dict[str, float]:
    """The methods evaluated once (not split, not the SFT baseline): label with its real steps -> mean success."""
    rows = {row for rs in series.values() for row in rs}
    lines = {}
    for label, m in summary.items():
        if label in rows or label == sft_label:
            continue
        counts = [r["real_env_steps"] for r in m["runs"] if r["real_env_steps"] is not None]
        steps = f", {round(statistics.fmean(counts)):,} real steps" if counts else ""
        seeds = f" ({m['seeds']} seeds)" if m["seeds"] > 1 else ""
        lines[f"{label}{seeds}{steps}"] = m["success"]["mean"]
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vla-mbpo report", description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", default=[], required=True, metavar="LABEL=DIR",
                        help="one seed of one method (the last '=' ends the label); repeat the label for more seeds")
    parser.add_argument("--sft-label", default="SFT", help="the label drawn as the reference line in the plots")
    parser.add_argument("--out", type=Path, required=True, help="directory for results.json/.md and the PNGs")
    parser.add_argument("--eval-file", default=None, metavar="NAME",
                        help="read every run's DIR/NAME (an `evaluate --out` JSON) instead of its metrics; no plots")
    args = parser.parse_args(argv)
    runs: dict[str, list[Path]] = {}
    for item in args.run:
        label, _, path = item.rpartition("=")  # the last "=": labels such as "VLA-MBPO n=2" keep theirs
        if not label or not path:
            parser.error(f"--run needs LABEL=DIR, got {item!r}")
        runs.setdefault(label, []).append(Path(path))
    try:
        summary = build_report(runs, args.out, args.sft_label, args.eval_file)
    except ReportError as exc:
        parser.error(str(exc))
    print(format_results(summary, args.sft_label))
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}")
    return 0
