"""`vla-mbpo report`: exact per-seed, mean and spread values, SFT eval.json runs, plots, clear errors."""

import json

import numpy as np
import pytest

from trainer import report
from trainer.plots import aggregate, success_points


def write_training_run(path, finals, steps=29_000):
    """A metrics.jsonl with evaluations at iterations 0 and 2 (the last one is the run's result)."""
    path.mkdir(parents=True)
    records = [{"iteration": 0, "real_env_steps": steps, "real/success_mean": 0.1, "real/success_lift": 0.1},
               {"iteration": 1, "real_env_steps": steps, "ppo/actor_loss": 0.0},
               {"iteration": 2, "real_env_steps": steps, "real/success_mean": sum(finals) / len(finals),
                **{f"real/success_{f}": v for f, v in zip(("lift", "push", "place"), finals, strict=True)}}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_sft_eval(path, rates):
    """Like `vla-mbpo sft --eval-episodes`: a metrics.jsonl of losses only, the evaluation in eval.json."""
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text(json.dumps({"step": 100, "sft/loss": 1.5}) + "\n")
    (path / "eval.json").write_text(json.dumps({"success_rate": rates, "mean_success": sum(rates.values()) / 3,
                                                "action_rule": "mode"}))
    return path


def write_evaluation(path, rate, rule):
    """An `evaluate --out` JSON with one rate for every family."""
    path.write_text(json.dumps({"success_rate": {"lift": rate, "push": rate, "place": rate}, "mean_success": rate,
                                "action_rule": rule}))


def test_report_table_has_exact_means_spreads_and_seeds(tmp_path):
    runs = {"SFT": [write_sft_eval(tmp_path / "sft0", {"lift": 0.3, "push": 0.0, "place": 0.0}),
                    write_sft_eval(tmp_path / "sft1", {"lift": 0.6, "push": 0.0, "place": 0.0})],
            "VLA-MBPO": [write_training_run(tmp_path / f"m{i}", f) for i, f in
                         enumerate([(0.3, 0.3, 0.3), (0.6, 0.3, 0.0), (0.9, 0.0, 0.0)])]}
    summary = report.build_report(runs, tmp_path / "out", sft_label="SFT")
    mbpo = summary["VLA-MBPO"]
    assert mbpo["seeds"] == 3 and mbpo["real_env_steps"] == [29_000]
    assert mbpo["success"]["mean"] == pytest.approx(0.3) and mbpo["success"]["std"] == pytest.approx(0.0)
    assert mbpo["per_family"]["lift"]["mean"] == pytest.approx(0.6)
    assert mbpo["per_family"]["lift"]["std"] == pytest.approx(0.3)  # sample std of 0.3, 0.6, 0.9
    assert (mbpo["per_family"]["push"]["min"], mbpo["per_family"]["push"]["max"]) == (0.0, 0.3)
    sft = summary["SFT"]
    assert sft["success"]["mean"] == pytest.approx(0.15) and sft["real_env_steps"] == []
    assert sft["success"]["std"] == pytest.approx(np.std([0.1, 0.2], ddof=1))
    table = (tmp_path / "out" / "results.md").read_text().splitlines()
    assert table[0] == "| method | seeds | mean success % | lift | place | push | per seed | real env steps |"
    assert table[2] == "| SFT | 2 | 15.0 +- 7.1 (10.0..20.0) | 45.0 | 0.0 | 0.0 | 10.0 / 20.0 | - |"
    assert table[3] == "| VLA-MBPO | 3 | 30.0 +- 0.0 (30.0..30.0) | 60.0 | 10.0 | 20.0 | 30.0 / 30.0 / 30.0 | 29000 |"
    assert json.loads((tmp_path / "out" / "results.json").read_text())["VLA-MBPO"]["seeds"] == 3
    for name in ("success_vs_iteration.png", "success_vs_real_steps.png"):
        assert (tmp_path / "out" / name).stat().st_size > 1000


def test_report_names_a_run_without_results(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(report.ReportError, match=f"{empty} has neither metrics.jsonl nor eval.json"):
        report.read_run(empty)
    unevaluated = tmp_path / "unevaluated"
    unevaluated.mkdir()
    (unevaluated / "metrics.jsonl").write_text(json.dumps({"iteration": 1}) + "\n")
    with pytest.raises(report.ReportError, match="holds no evaluated record"):
        report.read_run(unevaluated)


def test_report_reads_a_named_evaluation_of_every_run(tmp_path):
    """--eval-file: the table from DIR/NAME (steps of a training run still from its metrics), no curves."""
    trained = write_training_run(tmp_path / "ppo", (0.3, 0.3, 0.3), steps=26_082)
    sft = write_sft_eval(tmp_path / "sft", {"lift": 0.3, "push": 0.0, "place": 0.0})
    for run, rate in ((trained, 0.5), (sft, 0.25)):
        write_evaluation(run / "eval_t0.5.json", rate, "sampled T=0.5")
    summary = report.build_report({"SFT": [sft], "PPO": [trained]}, tmp_path / "out", eval_file="eval_t0.5.json")
    assert summary["PPO"]["runs"] == [{"run_dir": str(trained), "mean_success": 0.5, "real_env_steps": 26_082,
                                       "iteration": 2, "success_rate": {"lift": 0.5, "push": 0.5, "place": 0.5},
                                       "action_rule": "sampled T=0.5"}]
    assert summary["SFT"]["success"]["mean"] == 0.25 and summary["SFT"]["real_env_steps"] == []
    assert (tmp_path / "out" / "results.md").read_text().splitlines()[-1] == "Actions at evaluation: sampled T=0.5."
    assert not list((tmp_path / "out").glob("*.png"))
    with pytest.raises(report.ReportError, match=f"{tmp_path / 'ppo' / 'missing.json'} does not exist"):
        report.read_run(trained, "missing.json")
    (trained / "bad.json").write_text(json.dumps({"success_rate": {}}))
    with pytest.raises(report.ReportError, match="bad.json is not an `evaluate --out` JSON"):
        report.read_run(trained, "bad.json")


def test_report_refuses_a_table_that_mixes_action_rules(tmp_path):
    """A sampled in-training evaluation (its record carries the temperature) next to mode ones is refused."""
    mode = write_training_run(tmp_path / "mode", (0.3, 0.3, 0.3))
    sampled = write_training_run(tmp_path / "sampled", (0.4, 0.4, 0.4))
    records = (sampled / "metrics.jsonl").read_text().splitlines()
    last = {**json.loads(records[-1]), "real/eval_temperature": 0.5}
    (sampled / "metrics.jsonl").write_text("\n".join([*records[:-1], json.dumps(last)]) + "\n")
    assert report.read_run(sampled).action_rule == "sampled T=0.5" and report.read_run(mode).action_rule == "mode"
    with pytest.raises(report.ReportError, match=f"one action rule, got mode: {mode}; sampled T=0.5: {sampled}$"):
        report.build_report({"A": [mode], "B": [sampled]}, tmp_path / "out")
    for run, rule in ((mode, "sampled T=0.5"), (sampled, "sampled T=1")):
        write_evaluation(run / "eval_t.json", 0.5, rule)
    with pytest.raises(report.ReportError, match="sampled T=0.5: .*mode; sampled T=1: .*sampled$"):
        report.build_report({"A": [mode, sampled]}, tmp_path / "out", eval_file="eval_t.json")
    (mode / "old.json").write_text(json.dumps({"success_rate": {"lift": 0.1}, "mean_success": 0.1}))
    write_evaluation(sampled / "old.json", 0.5, "mode")
    with pytest.raises(report.ReportError, match="unrecorded: .*written before evaluations recorded their rule"):
        report.build_report({"A": [mode, sampled]}, tmp_path / "out", eval_file="old.json")
    assert not (tmp_path / "out").exists()  # nothing is written for a refused table


def test_report_cli_rejects_a_malformed_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        report.main(["--run", "nolabel", "--out", str(tmp_path)])
    assert "--run needs LABEL=DIR, got 'nolabel'" in capsys.readouterr().err


def test_report_cli_keeps_an_equals_sign_in_the_label(tmp_path, capsys):
    run = write_training_run(tmp_path / "n2", (0.3, 0.6, 0.0))
    assert report.main(["--run", f"VLA-MBPO n=2={run}", "--out", str(tmp_path / "out")]) == 0
    assert "| VLA-MBPO n=2 | 1 | 30.0 +- 0.0 (30.0..30.0) |" in capsys.readouterr().out


def test_learning_curves_average_seeds_at_shared_iterations():
    seed0 = {0: (0.0, 10.0), 1: (900.0, 20.0), 2: (2000.0, 30.0)}
    seed1 = {0: (0.0, 20.0), 2: (1800.0, 50.0)}  # evaluated less often, fewer real steps per iteration
    x, mean, low, high = aggregate([seed0, seed1])
    assert x.tolist() == [0.0, 1900.0] and mean.tolist() == [15.0, 40.0]
    assert low.tolist() == [10.0, 30.0] and high.tolist() == [20.0, 50.0]
    records = [{"iteration": 0, "real_env_steps": 0, "real/success_mean": 0.25},
               {"iteration": 1, "real_env_steps": 900},
               {"iteration": 2, "real_env_steps": 2000, "real/success_mean": 0.5}]
    assert success_points(records, "real_env_steps") == {0: (0.0, 25.0), 2: (2000.0, 50.0)}


def write_saved_policy(path, iteration, rate, steps=25_730):
    """A training run stopped at `iteration` (its metrics' last record) and its policy evaluated into eval_t.json."""
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text(json.dumps({"iteration": iteration, "real_env_steps": steps}) + "\n")
    write_evaluation(path / "eval_t.json", rate, "sampled T=0.5")
    return path


def test_report_gives_a_method_saved_at_several_iterations_a_row_and_a_point_each(tmp_path):
    """--eval-file with seeds continued to 12 and 24 iterations under one label: a row per iteration, a curve of
    them against iteration, the methods evaluated once as horizontal lines; SFT is neither."""
    sft = write_sft_eval(tmp_path / "sft", {"lift": 0.3, "push": 0.3, "place": 0.3})
    write_evaluation(sft / "eval_t.json", 0.3, "sampled T=0.5")
    mbpo = [write_saved_policy(tmp_path / f"m{it}_s{s}", it, rate)
            for it, rates in ((24, (0.5, 0.6)), (12, (0.4, 0.3))) for s, rate in enumerate(rates)]
    ppo = [write_saved_policy(tmp_path / f"ppo{s}", 7, rate, steps) for s, (rate, steps) in
           enumerate(((0.4, 25_729), (0.5, 25_783)))]
    runs = {"SFT": [sft], "VLA-MBPO": mbpo, "PPO": ppo}
    summary = report.build_report(runs, tmp_path / "out", sft_label="SFT", eval_file="eval_t.json")
    assert list(summary) == ["SFT", "VLA-MBPO, 12 it.", "VLA-MBPO, 24 it.", "PPO"]
    assert [r["run_dir"] for r in summary["VLA-MBPO, 12 it."]["runs"]] == [str(tmp_path / "m12_s0"),
                                                                          str(tmp_path / "m12_s1")]
    assert summary["VLA-MBPO, 24 it."]["success"] == {"mean": pytest.approx(0.55), "std": pytest.approx(0.0707107),
                                                      "min": 0.5, "max": 0.6}
    series = {"VLA-MBPO": ["VLA-MBPO, 12 it.", "VLA-MBPO, 24 it."]}
    curve = report.evaluated_curves(summary, series)["VLA-MBPO"]
    assert (curve.iterations, curve.low, curve.high, curve.seeds) == ([12, 24], [0.3, 0.5], [0.4, 0.6], 2)
    assert curve.mean == [pytest.approx(0.35), pytest.approx(0.55)]
    assert report.reference_lines(summary, series, "SFT") == {"PPO (2 seeds), 25,756 real steps": 0.45}
    table = (tmp_path / "out" / "results.md").read_text().splitlines()
    assert table[3] == "| VLA-MBPO, 12 it. | 2 | 35.0 +- 7.1 (30.0..40.0) | 35.0 | 35.0 | 35.0 | 40.0 / 30.0 | 25730 |"
    assert (tmp_path / "out" / "success_vs_iteration.png").stat().st_size > 1000
    assert not (tmp_path / "out" / "success_vs_real_steps.png").exists()
    mixed = {"SFT": [sft], "one": [mbpo[0], sft]}  # a policy without iteration beside a trained one: not split
    assert list(report.build_report(mixed, tmp_path / "mixed", eval_file="eval_t.json")) == ["SFT", "one"]
    clash = {"VLA-MBPO": mbpo, "VLA-MBPO, 12 it.": ppo}
    rows = r"rows \['VLA-MBPO, 12 it.', 'VLA-MBPO, 24 it.'\], but \['VLA-MBPO, 12 it.'\] is already another method's"
    with pytest.raises(report.ReportError, match=rows):
        report.build_report(clash, tmp_path / "clash", eval_file="eval_t.json")
