"""Paired differences on shared evaluation episodes: exact means and standard errors, refusal of mismatches."""

import json
import math

import pytest

from trainer import report
from trainer.paired_comparison import other_machines, paired_difference, read_episode_outcomes, read_machine

LIFT = "VlaMbpo/Lift-v0"


def outcomes(*successes):
    return {(LIFT, seed): bool(s) for seed, s in enumerate(successes)}


def test_paired_difference_averages_runs_per_episode_before_the_baseline():
    baseline = outcomes(1, 0, 0, 1)
    runs = [outcomes(1, 1, 0, 0), outcomes(1, 0, 1, 0)]
    result = paired_difference(runs, baseline)
    diffs = [0.0, 0.5, 0.5, -1.0]  # per episode: mean over the two runs minus the baseline
    assert result["mean"] == pytest.approx(0.0) and result["episodes"] == 4
    mean = sum(diffs) / 4
    assert result["se"] == pytest.approx(math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3) / 2)


def test_paired_difference_needs_the_same_episodes():
    assert paired_difference([outcomes(1, 0)], outcomes(1, 0, 0)) is None
    assert paired_difference([{("VlaMbpo/Push-v0", 0): True}], {(LIFT, 0): True}) is None
    assert paired_difference([], outcomes(1)) is None
    assert paired_difference([outcomes(1)], {}) is None


def test_read_episode_outcomes(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"episodes": [{"env_id": LIFT, "seed": 7, "success": True, "env_steps": 40}]}))
    assert read_episode_outcomes(path) == {(LIFT, 7): True}
    path.write_text(json.dumps({"mean_success": 0.5}))
    assert read_episode_outcomes(path) == {}
    path.write_text(json.dumps({"episodes": [{"env_id": LIFT, "success": True}]}))
    with pytest.raises(ValueError, match="eval.json: an episode entry needs env_id, seed and success"):
        read_episode_outcomes(path)


def write_run(path, successes, steps=None):
    path.mkdir(parents=True)
    if steps is not None:
        (path / "metrics.jsonl").write_text(json.dumps({"iteration": 1, "real_env_steps": steps}) + "\n")
    rate = sum(successes) / len(successes)
    episodes = [{"env_id": LIFT, "seed": s, "success": bool(v), "env_steps": 8} for s, v in enumerate(successes)]
    (path / "eval_t.json").write_text(json.dumps({"success_rate": {"lift": rate}, "mean_success": rate,
                                                  "action_rule": "sampled T=0.5", "episodes": episodes}))
    return path


def test_report_adds_the_paired_column_against_one_baseline_run(tmp_path):
    runs = {"SFT": [write_run(tmp_path / "sft", [1, 0, 0, 1])],
            "PPO": [write_run(tmp_path / "p0", [1, 1, 0, 1], 900), write_run(tmp_path / "p1", [1, 1, 1, 1], 900)],
            "short": [write_run(tmp_path / "short", [1, 1], 900)]}
    summary = report.build_report(runs, tmp_path / "out", sft_label="SFT", eval_file="eval_t.json")
    # per-episode diffs 0, 1, 0.5, 0: mean 0.375, sample std sqrt(0.6875 / 3), over sqrt(4) episodes
    se = math.sqrt(0.6875 / 3) / 2
    assert summary["PPO"]["paired_vs_baseline"] == {"mean": 0.375, "se": pytest.approx(se), "episodes": 4}
    assert "paired_vs_baseline" not in summary["short"] and "paired_vs_baseline" not in summary["SFT"]
    table = (tmp_path / "out" / "results.md").read_text().splitlines()
    assert table[0].endswith("| real env steps | vs SFT, paired (points) |")
    assert table[1] == "|---" * 7 + "|"
    assert table[2].endswith("| - | - |") and table[4].endswith("| 900 | n/a (other episodes) |")
    assert table[3].endswith("| 900 | +37.5 +- 23.9 (4 episodes) |")


def test_report_does_not_pair_evaluations_from_another_machine(tmp_path):
    """The same seeds on another CPU or library build are not the same noise: no paired column for those runs."""
    here = {"cpu": "AMD EPYC", "cpu_capability": "AVX512", "torch": "2.13.0+cpu", "mujoco": "4.0.1", "numpy": "2.4.6"}
    there = {**here, "cpu": "Intel Xeon"}
    runs = {"SFT": [write_run(tmp_path / "sft", [1, 0, 0, 1])], "same": [write_run(tmp_path / "a", [1, 1, 0, 1], 900)],
            "other": [write_run(tmp_path / "b", [1, 1, 0, 1], 900), write_run(tmp_path / "c", [1, 1, 0, 1], 900)],
            "unrecorded": [write_run(tmp_path / "d", [1, 1, 0, 1], 900)]}
    for run, machine in (("sft", here), ("a", here), ("b", here), ("c", there)):
        path = tmp_path / run / "eval_t.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "machine": machine}))
    summary = report.build_report(runs, tmp_path / "out", sft_label="SFT", eval_file="eval_t.json")
    assert summary["same"]["paired_vs_baseline"]["mean"] == 0.25
    assert summary["unrecorded"]["paired_vs_baseline"]["mean"] == 0.25  # a file from before machines were recorded
    assert "paired_vs_baseline" not in summary["other"]
    assert summary["other"]["paired_refused"] == {"baseline_machine": here, "other_machines": [there]}
    table = (tmp_path / "out" / "results.md").read_text().splitlines()
    assert table[4].endswith("| 900 | n/a (another machine) |")


def test_read_machine(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"mean_success": 0.5, "machine": {"cpu": "AMD EPYC"}}))
    assert read_machine(path) == {"cpu": "AMD EPYC"}
    path.write_text(json.dumps({"mean_success": 0.5}))
    assert read_machine(path) is None
    assert other_machines(None, [{"cpu": "x"}]) == []
    assert other_machines({"cpu": "x"}, [None, {"cpu": "x"}, {"cpu": "y"}]) == [{"cpu": "y"}]
