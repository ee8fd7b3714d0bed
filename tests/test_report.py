"""`rnnbench report`: ranking and interval arithmetic on hand-built tables, messy stores, end to end."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from scipy import stats

from rnnbench.cli import app
from rnnbench.report.collect import TaskInfo, status_notes
from rnnbench.report.figures import pareto_front
from rnnbench.report.tables import display_frame, rank_task, summary, write
from tests.helpers import run_cli

ACC = TaskInfo("sentiment", "accuracy", "maximize")


def _runs(finals: dict[str, list[float]], extra: list[dict] | None = None) -> pd.DataFrame:
    """A tidy table as collect() builds it: a study row per architecture and its final seeds."""
    rows = []
    for arch, values in finals.items():
        cell, variant = arch.split("-", 1)
        base = {"study": f"e/sentiment-x/{arch}", "architecture": arch, "cell": cell, "variant": variant,
                "task": "sentiment"}  # fmt: skip
        rows.append({**base, "stage": "study", "status": "complete", "best_valid": 0.5, "hp_lr": 0.01,
                     "baseline_test_accuracy": 0.5})  # fmt: skip
        for seed, v in enumerate(values):
            rows.append({**base, "stage": "final", "status": "complete", "seed": seed, "test_accuracy": v,
                         "best_valid_accuracy": v,
                         "params_total": 1000, "train_tokens_per_s_median": 5e4})  # fmt: skip
    return pd.DataFrame(rows + (extra or []))


def test_ranking_and_confidence_intervals_by_hand():
    finals = {
        "lstm-1L-uni": [0.80, 0.82, 0.84],
        "gru-1L-uni": [0.79, 0.83, 0.81],
        "rnn-1L-uni": [0.60, 0.61, 0.62],
    }
    table = rank_task(_runs(finals), ACC).table.set_index("architecture")
    assert list(table.index[:3]) == ["lstm-1L-uni", "gru-1L-uni", "rnn-1L-uni"]  # higher accuracy first
    assert list(table["rank"][:3]) == [1, 2, 3]
    # mean 0.82, s = 0.02, t(0.975, 2) = 4.303: half-width 0.02 * 4.303 / sqrt(3) = 0.04968
    lstm = table.loc["lstm-1L-uni"]
    assert lstm["mean"] == pytest.approx(0.82)
    assert lstm["ci95_high"] - lstm["mean"] == pytest.approx(0.02 * 4.302653 / math.sqrt(3), rel=1e-5)
    assert lstm["mean"] - lstm["ci95_low"] == pytest.approx(lstm["ci95_high"] - lstm["mean"])
    # gru is within noise of lstm (Welch p = 0.58: not rejected, and 3 seeds cannot show it within
    # the margin either: inconclusive); rnn is clearly worse. Holm over the two comparisons.
    p_gru = stats.ttest_ind([0.80, 0.82, 0.84], [0.79, 0.83, 0.81], equal_var=False).pvalue
    p_rnn = stats.ttest_ind([0.80, 0.82, 0.84], [0.60, 0.61, 0.62], equal_var=False).pvalue
    assert table.loc["gru-1L-uni", "p_holm"] == pytest.approx(max(p_gru, min(2 * p_rnn, 1)))
    assert table.loc["rnn-1L-uni", "p_holm"] == pytest.approx(2 * p_rnn)
    assert table.loc["gru-1L-uni", "vs_selected"] == "inconclusive"
    assert table.loc["rnn-1L-uni", "vs_selected"] == "worse"
    assert table.loc["lstm-1L-uni", "vs_selected"] == "selected (best validation)"
    assert table.loc["trivial baseline", "mean"] == pytest.approx(0.5)


def test_an_interval_stops_where_the_metric_does():
    """F1 over 3 seeds at 0.99, 0.999, 0.95: the t-interval's upper end, 1.05, is no F1; nor is a
    negative MSE. The report, the parent runs and the CLI cut the interval to the metric's range."""
    from rnnbench.plugins import metric_bounds
    from rnnbench.report.collect import task_info
    from rnnbench.stats import mean_ci

    f1 = [0.99, 0.999, 0.95]
    mean, low, high = mean_ci(f1)
    assert high > 1.0  # the plain t-interval
    assert mean_ci(f1, bounds=(0.0, 1.0)) == (mean, low, 1.0)
    assert mean_ci([0.01, 0.3, 0.02], bounds=metric_bounds("forecast", "mse"))[1] == 0.0
    assert metric_bounds("ner", "f1_PER") == (0.0, 1.0) and metric_bounds("charlm", "perplexity")[0] == 1.0
    info, _ = task_info("sentiment", [])
    table = rank_task(_runs({"lstm-1L-uni": [0.99, 0.999, 0.95]}), info).table.set_index("architecture")
    assert table.loc["lstm-1L-uni", "ci95_high"] == 1.0 and table.loc["lstm-1L-uni", "ci95_low"] == low


def test_lower_is_better_and_unranked_studies():
    mse = TaskInfo("sentiment", "accuracy", "minimize")  # same columns, opposite direction
    runs = _runs({"lstm-1L-uni": [0.3, 0.31], "gru-1L-uni": [0.2, 0.22]})
    runs = pd.concat([runs, pd.DataFrame([{"study": "e/sentiment-x/rnn-1L-uni", "architecture": "rnn-1L-uni",
                      "cell": "rnn", "variant": "1L-uni", "task": "sentiment", "stage": "search",
                      "status": "failed"}])])  # fmt: skip
    t = rank_task(runs, mse)
    ranked = t.table.dropna(subset=["rank"])
    assert list(ranked["architecture"]) == ["gru-1L-uni", "lstm-1L-uni"]
    assert any("rnn-1L-uni" in n for n in t.notes)  # a study without final seeds is named, not dropped
    row = t.table.set_index("architecture").loc["rnn-1L-uni"]
    assert row["vs_selected"] == "no final seeds" and row["trials_ok/pruned/failed"] == "0/0/1"


def test_one_seed_has_no_interval_and_no_test():
    t = rank_task(_runs({"lstm-1L-uni": [0.8], "gru-1L-uni": [0.7]}), ACC).table.set_index("architecture")
    assert math.isnan(t.loc["lstm-1L-uni", "ci95_low"])
    assert t.loc["gru-1L-uni", "vs_selected"] == "no verdict"


def test_two_seeds_show_their_values_and_no_interval_or_verdict():
    """The issue's case: F1 0.47 from 2 seeds printed as [-0.51, 1.45] and called “≈ best” next to 0.99."""
    t = rank_task(_runs({"lstm-1L-uni": [0.99, 0.995], "gru-1L-uni": [0.39, 0.55]}), ACC)
    table = t.table.set_index("architecture")
    gru = table.loc["gru-1L-uni"]
    assert gru["mean"] == pytest.approx(0.47) and gru["seeds"] == 2
    assert math.isnan(gru["ci95_low"]) and math.isnan(gru["ci95_high"])  # t(0.975, 1) = 12.7: no
    assert gru["vs_selected"] == "no verdict" and math.isnan(gru["p_holm"])
    assert gru["seed_values"] == [0.39, 0.55]
    shown = display_frame(t).set_index("architecture")
    metric = next(c for c in shown.columns if c.startswith("test accuracy"))
    assert shown.loc["gru-1L-uni", metric] == "0.47 (seeds: 0.39, 0.55)"
    assert "[" not in shown.loc["lstm-1L-uni", metric]
    assert "≈ best" not in set(shown["verdict vs selected"])
    (note,) = [n for n in t.notes if "fewer than 3" in n]  # said under the table, and why
    assert "lstm-1L-uni (2), gru-1L-uni (2)" in note and "12.71" in note


def test_three_seeds_get_the_t_interval_and_welch_verdict_beside_two_seed_rows():
    finals = {"lstm-1L-uni": [0.80, 0.82, 0.84], "gru-1L-uni": [0.79, 0.83, 0.81], "rnn-1L-uni": [0.9, 0.5]}
    t = rank_task(_runs(finals), ACC)
    table = t.table.set_index("architecture")
    half = 0.02 * stats.t.ppf(0.975, 2) / math.sqrt(3)
    assert table.loc["lstm-1L-uni", "ci95_high"] == pytest.approx(0.82 + half)
    p = stats.ttest_ind([0.80, 0.82, 0.84], [0.79, 0.83, 0.81], equal_var=False).pvalue
    assert table.loc["gru-1L-uni", "p_holm"] == pytest.approx(p)  # the family's only test
    assert table.loc["gru-1L-uni", "vs_selected"] == "inconclusive"
    assert table.loc["rnn-1L-uni", "vs_selected"] == "no verdict"  # only 2 seeds
    shown = display_frame(t).set_index("architecture")
    metric = next(c for c in shown.columns if c.startswith("test accuracy"))
    assert shown.loc["lstm-1L-uni", metric] == f"0.82 [{0.82 - half:.4g}, {0.82 + half:.4g}]"
    assert shown.loc["rnn-1L-uni", metric] == "0.7 (seeds: 0.9, 0.5)"
    assert [n for n in t.notes if "fewer than 3" in n][0].startswith(
        "fewer than 3 final seeds: rnn-1L-uni (2)."
    )


def _ranked(task: str, means: dict[str, float]):
    table = rank_task(_runs({a: [m - 0.01, m, m + 0.01] for a, m in means.items()}), ACC)
    table.task = task
    return table


def test_summary_scores_each_architecture_over_its_own_benchmarks_and_shows_wins():
    # causal tasks refuse the bidirectional gru: it is ranked on 2 of the 4 benchmarks
    tables = [
        _ranked("charlm", {"lstm-1L-uni": 0.9, "gru-1L-uni": 0.8, "rnn-1L-uni": 0.7}),
        _ranked("memory", {"lstm-1L-uni": 0.9, "gru-1L-uni": 0.7, "rnn-1L-uni": 0.8}),
        _ranked("sentiment", {"gru-1L-bi": 0.95, "lstm-1L-uni": 0.7, "gru-1L-uni": 0.8, "rnn-1L-uni": 0.6}),
        _ranked("ner", {"gru-1L-bi": 0.95, "lstm-1L-uni": 0.8, "gru-1L-uni": 0.7, "rnn-1L-uni": 0.6}),
    ]
    s = summary(tables).set_index("architecture")
    # lstm wins both causal tasks: the summary must not hide that behind the benchmarks all share
    assert s["wins"].to_dict() == {"gru-1L-bi": 2, "lstm-1L-uni": 2, "gru-1L-uni": 0, "rnn-1L-uni": 0}
    assert s["benchmarks_ranked"].to_dict() == {
        "gru-1L-bi": 2,
        "lstm-1L-uni": 4,
        "gru-1L-uni": 4,
        "rnn-1L-uni": 4,
    }
    # share of each field beaten, (n - rank) / (n - 1): lstm 1, 1, 1/3, 2/3; gru 1/2, 0, 2/3, 1/3
    assert s["rivals_beaten"].round(4).to_dict() == {
        "gru-1L-bi": 1.0, "lstm-1L-uni": 0.75, "gru-1L-uni": 0.375, "rnn-1L-uni": 0.125
    }  # fmt: skip
    assert s["mean_rank"].to_dict() == {
        "gru-1L-bi": 1.0,
        "lstm-1L-uni": 1.75,
        "gru-1L-uni": 2.5,
        "rnn-1L-uni": 3.25,
    }
    assert list(s.index) == ["gru-1L-bi", "lstm-1L-uni", "gru-1L-uni", "rnn-1L-uni"]  # by rivals_beaten
    # like for like: the mean over sentiment and ner only, where all four ran
    assert s["mean_rank_common"].to_dict() == {
        "gru-1L-bi": 1.0,
        "lstm-1L-uni": 2.5,
        "gru-1L-uni": 2.5,
        "rnn-1L-uni": 4.0,
    }
    # apart: the three that ran all four, ranked among themselves (bi taken out of sentiment and ner)
    # lstm 1,1,2,1 -> 1.25; gru 2,3,1,2 -> 2.0; rnn 3,2,3,3 -> 2.75
    wider = s["mean_rank_4_benchmarks"]
    assert wider.drop("gru-1L-bi").to_dict() == {"lstm-1L-uni": 1.25, "gru-1L-uni": 2.0, "rnn-1L-uni": 2.75}
    assert math.isnan(wider["gru-1L-bi"])
    assert math.isnan(s.loc["gru-1L-bi", "charlm"])
    described = summary(tables).attrs["columns"]
    assert (
        "sentiment, ner" in described["mean_rank_common"]
        and "3 architectures" in described["mean_rank_4_benchmarks"]
        and "benchmarks_ranked" in described["mean_rank"]
    )


def test_summary_of_a_field_smaller_elsewhere_is_not_flattered():
    """A raw rank of 2 among 2 is last, of 2 among 12 near the top: the share beaten tells them apart."""
    tables = [
        _ranked("small", {"a-1L-uni": 0.9, "b-1L-uni": 0.8}),
        _ranked(
            "large", {f"c{i}-1L-uni": 0.5 + i / 100 for i in range(10)} | {"b-1L-uni": 0.95, "a-1L-uni": 0.1}
        ),
    ]
    s = summary(tables).set_index("architecture")
    assert s.loc["b-1L-uni", "rivals_beaten"] == 0.5 and s.loc["a-1L-uni", "rivals_beaten"] == 0.5
    assert s.loc["c9-1L-uni", "rivals_beaten"] == 10 / 11 and s.index[0] == "c9-1L-uni"


def test_summary_without_a_benchmark_common_to_all():
    tables = [
        _ranked("a", {"lstm-1L-uni": 0.9, "gru-1L-uni": 0.8}),
        _ranked("b", {"rnn-1L-uni": 0.5, "gru-1L-bi": 0.6}),
    ]
    s = summary(tables)
    assert s["mean_rank_common"].isna().all() and "no benchmark" in s.attrs["columns"]["mean_rank_common"]
    assert [c for c in s.columns if c.startswith("mean_rank_") and c != "mean_rank_common"] == []
    assert set(s["wins"]) == {0, 1} and set(s["benchmarks_ranked"]) == {1}


def _figure_runs() -> pd.DataFrame:
    import matplotlib

    matplotlib.use("Agg")
    return _runs(
        {"lstm-1L-uni": [0.80, 0.82, 0.84], "gru-1L-uni": [0.79, 0.83, 0.81], "rnn-1L-uni": [0.78, 0.8, 0.82]}
    )


def test_equal_parameter_counts_stand_as_a_strip_by_architecture():
    """A parameter budget gives counts within a few % of each other: no spread along a count axis."""
    from rnnbench.report import figures

    runs = _figure_runs()
    runs.loc[runs["architecture"] == "gru-1L-uni", "params_total"] = 1030  # within 5% of 1000
    t = rank_task(runs, ACC)
    fig = figures.metric_vs_params([t], figures.Style.for_runs(runs))
    ax = fig.axes[0]
    assert [label.get_text() for label in ax.get_xticklabels()] == list(t.table["architecture"][:3])
    assert "all 1k–1.03k parameters (within 3%)" in ax.get_title() and "equal within 5%" in ax.get_xlabel()
    # the baseline (0.5) lies far below the scores: said in the title, where no error bar can cross it
    assert "trivial baseline 0.5, below this scale" in ax.get_title() and not ax.texts
    runs.loc[runs["architecture"] == "gru-1L-uni", "params_total"] = 3000  # a real difference: a count axis
    fig = figures.metric_vs_params([rank_task(runs, ACC)], figures.Style.for_runs(runs))
    assert fig.axes[0].get_xlabel() == "parameters (count)" and "parameters" not in fig.axes[0].get_title()


def test_one_legend_keeps_cells_and_variants_apart_across_panels():
    """A cell first seen in a later panel is listed under "cell", not after the variants."""
    from rnnbench.report import figures

    rows = [
        {"benchmark": b, "experiment": "e", "cell": c, "variant": v, "architecture": f"{c}-{v}", "hparam": h,
         "importance": 0.5}
        for b, c, v in (("a", "rnn", "1L-uni"), ("b", "lstm", "2L-uni"), ("c", "gru", "1L-bi"))
        for h in ("lr", "dropout")
    ]  # fmt: skip
    table = pd.DataFrame(rows)
    fig = figures.importance(table, figures.Style.for_runs(table.assign(stage="final")))
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts == ["cell", "gru", "lstm", "rnn", "variant", "1L-bi", "1L-uni", "2L-uni"]


def test_curves_are_drawn_against_training_steps_where_logged():
    from rnnbench.report import figures

    runs = _figure_runs().assign(benchmark="sentiment-x", experiment="e")
    runs["run_id"] = [f"r{i}" for i in range(len(runs))]
    best = runs[runs["stage"] == "final"].groupby("architecture").head(1)
    rows = []
    for run_id in best["run_id"]:
        for validation in (1, 2, 3):
            rows.append((run_id, "valid_accuracy", validation, 0.5 + validation / 10))
            rows.append((run_id, "steps", validation, 125.0 * validation))
    hist = pd.DataFrame(rows, columns=["run_id", "metric", "step", "value"]).assign(best_trial=True)
    style, infos = figures.Style.for_runs(runs), {"sentiment-x": ACC}
    ax = figures.valid_curves(runs, hist, infos, style).axes[0]
    assert ax.get_xlabel() == "training steps" and ax.get_xlim()[1] >= 375
    ax = figures.valid_curves(runs, hist[hist["metric"] != "steps"], infos, style).axes[0]
    assert ax.get_xlabel() == "validation" and ax.get_xlim()[1] < 10  # older runs: the validation's number


def test_written_tables_carry_values_notes_and_memory(tmp_path: Path):
    runs = _runs({"lstm-1L-uni": [0.8, 0.82, 0.84], "gru-1L-uni": [0.7, 0.72]})
    runs.loc[runs["stage"] == "final", "train_memory_mib_peak"] = [1.5, 1.5, 1.5, 0.7, 0.7]
    t = rank_task(runs, ACC)
    write([t], summary([t]), tmp_path)
    md = (tmp_path / "sentiment.md").read_text()
    assert "0.71 (seeds: 0.7, 0.72)" in md and "- fewer than 3 final seeds: gru-1L-uni (2)" in md
    assert "train memory (MiB)" in md and "| 1.5 |" in md
    csv = pd.read_csv(tmp_path / "sentiment.csv").set_index("architecture")
    assert csv.loc["gru-1L-uni", "seed_values"] == "0.7;0.72"
    assert "mean_rank" in (tmp_path / "summary.md").read_text()


def test_old_stores_with_the_rss_column_still_report():
    runs = _runs({"lstm-1L-uni": [0.8, 0.82, 0.84]})
    runs["peak_memory_mb"] = 570.0
    t = rank_task(runs, ACC)
    assert "peak_memory_mb" not in t.table and math.isnan(t.table["train_memory_mib"].iloc[0])
    assert display_frame(t)["train memory (MiB)"].iloc[0] == "–"
    (note,) = [n for n in status_notes(runs) if "peak_memory_mb" in n]
    assert note.startswith("4 run(s) were logged by an older rnnbench")


def test_pareto_front():
    points = pd.DataFrame({"tps": [100, 200, 300, 400], "mean": [0.9, 0.95, 0.8, 0.85]})
    front = pareto_front(points, "tps", "maximize")
    assert sorted(front["tps"]) == [200, 400]  # 100 and 300 are beaten on both axes


def _tracker_with_messy_runs(home: Path):
    """A store as a still-running experiment leaves it: failed, pruned, running trials, no final stage."""
    from rnnbench.tracking import Tracker, tracking_uri_for

    home.mkdir(parents=True)
    tracker = Tracker(tracking_uri_for(home), "messy", home / "artifacts")
    study = {"study": "messy/memory-synthetic/gru-1L-uni", "cell": "gru", "layers": 1, "bidirectional": False,
             "task": "memory", "dataset": "synthetic"}  # fmt: skip
    parent = tracker.start_run("study", {**study, "stage": "study", "status": "running"})
    for trial, (status, metrics) in enumerate(
        [
            (
                "complete",
                {"best_valid_mse": 0.1, "valid_mse": 0.1, "peak_memory_mb": 570.0},
            ),  # an older rnnbench
            ("failed", {}),
            ("pruned", {"valid_mse": 0.3}),
            ("running", {"valid_mse": 0.2}),
        ]  # fmt: skip
    ):
        run = tracker.start_run(
            f"trial-{trial}", {**study, "stage": "search", "trial": trial, "status": status}, parent
        )
        tracker.log_params(run, {"hidden_size": 8, "lr": 0.01})
        if metrics:
            tracker.log_metrics(run, metrics, step=1)
        if status == "failed":
            tracker.set_tags(run, {"failure_reason": "nan", "failure_message": "loss became nan at step 3"})
        if status != "running":
            tracker.end_run(run, "FAILED" if status == "failed" else "FINISHED")
    return tracker


def test_messy_experiment_reports_what_is_missing(tmp_path: Path, monkeypatch):
    home = tmp_path / "home"
    _tracker_with_messy_runs(home)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["report", "messy", "--home", str(home), "--format", "html"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "reports" / "messy"
    assert (
        (out / "index.html").is_file()
        and (out / "report.html").is_file()
        and (out / "runs.parquet").is_file()
    )
    text = result.output
    assert "1 search trial(s) failed (nan: 1)" in text and "1 search trial(s) pruned" in text
    assert "1 of 1 studies have no final seeds yet" in text
    assert "1 run(s) were logged by an older rnnbench with peak_memory_mb" in text
    runs = pd.read_parquet(out / "runs.parquet")
    assert len(runs) == 5 and set(runs["status"]) == {"running", "complete", "failed", "pruned"}
    assert runs.loc[runs["status"] == "failed", "failure_reason"].item() == "nan"


def test_bad_input_is_one_line(tmp_path: Path):
    home = tmp_path / "home"
    _tracker_with_messy_runs(home)
    runner = CliRunner()
    unknown = runner.invoke(app, ["report", "mesy", "--home", str(home)])
    assert unknown.exit_code != 0 and "messy" in unknown.output and "Traceback" not in unknown.output
    missing = runner.invoke(app, ["report", "x", "--home", str(tmp_path / "nowhere")])
    assert missing.exit_code != 0 and len(missing.output.strip().splitlines()) == 1
    unreachable = runner.invoke(app, ["report", "x", "--tracking-uri", "http://127.0.0.1:9"])
    assert unreachable.exit_code != 0 and "not reachable" in unreachable.output
    assert len(unreachable.output.strip().splitlines()) == 1


TINY = """\
name: rep
cells: [rnn, {name: gru, bidirectional: [false, true]}]
tasks:
  - name: memory
    options: {problem: adding, seq_len: 6, train_size: 128, valid_size: 32, test_size: 32}
  - name: memory
    label: memory-T12
    options: {problem: adding, seq_len: 12, train_size: 128, valid_size: 32, test_size: 32}
search:
  hidden_size: {type: int, low: 4, high: 8}
  lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
budget: {trials: 5, epochs: 2, steps_per_epoch: 3}
final: {seeds: 2}
pruner: {name: none}
skip_invalid: true
"""


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory) -> Path:
    """A real tiny experiment, run in a subprocess, then reported (once for this module)."""
    tmp_path = tmp_path_factory.mktemp("report")
    home, out = tmp_path / "home", tmp_path / "reports" / "rep"
    (tmp_path / "rep.yaml").write_text(TINY)
    run = run_cli(["run", str(tmp_path / "rep.yaml")], home)
    assert run.returncode == 0, run.stderr
    # the YAML file names the experiment
    result = CliRunner().invoke(
        app, ["report", str(tmp_path / "rep.yaml"), "--home", str(home), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    return out


def test_a_generated_report_names_no_path_of_this_machine(smoke_report: Path):
    """What a report writes is shared (committed, mailed): its notebook reaches the run home by a
    path relative to itself, and no table, page or notebook holds an absolute path of ours."""
    import nbformat

    root = str(smoke_report.parents[1])  # the test's own folder: home, reports, the experiment file
    written = [p for p in smoke_report.rglob("*") if p.suffix in {".ipynb", ".html", ".md", ".csv", ".json"}]
    assert len(written) > 10
    for path in written:
        assert root not in path.read_text(errors="replace"), path
    runs = pd.read_parquet(smoke_report / "runs.parquet")
    assert not any(root in str(v) for column in runs.columns for v in runs[column].dropna().unique())
    parameters = nbformat.read(smoke_report / "report.ipynb", as_version=4).cells[1].source
    assert "tracking_uri = 'sqlite:///../../home/mlflow.db'" in parameters
    assert "journal = '../../home/optuna.journal'" in parameters


def test_end_to_end_report_with_executed_notebook(smoke_report: Path):
    out = smoke_report
    for name in ("index.html", "report.html", "report.ipynb", "report_notebook.html", "runs.csv",
                 "tables/memory-synthetic.md", "tables/memory-T12.md", "tables/summary.csv", "figures/metric_vs_seq_len.svg"):  # fmt: skip
        assert (out / name).is_file(), name
    for name in ("metric_vs_params", "metric_vs_throughput", "valid_curves", "optimisation_history", "grad_norm",
                 "metric_vs_seq_len", "importance", "budget_sensitivity"):  # fmt: skip
        assert (out / "figures" / f"{name}.png").stat().st_size > 10_000, name
    # its name before the rename still leads to it (links made then), without being listed twice
    assert (out / "figures" / "memory_vs_length.png").read_bytes() == (
        out / "figures" / "metric_vs_seq_len.png"
    ).read_bytes()
    assert "memory_vs_length" not in (out / "index.html").read_text()
    page = (out / "report.html").read_text()  # issue 22: the budget-sensitivity table and figure
    assert "<h2>budget sensitivity</h2>" in page and "figures/budget_sensitivity.png" in page
    assert (out / "tables" / "budget_sensitivity.csv").is_file()
    nb = json.loads((out / "report.ipynb").read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"]]
    assert outputs and not [o for o in outputs if o["output_type"] == "error"]
    assert nb["cells"][1]["metadata"]["tags"] == ["parameters"]
    runs = pd.read_csv(out / "runs.csv")
    # 4 studies (bidirectional gru refused by the causal task) x (study run + 5 trials + 2 seeds)
    assert len(runs) == 32 and set(runs["stage"]) == {"study", "search", "final"}
    assert {"hp_hidden_size", "hp_lr", "params_total", "env_torch", "data_seq_len"} <= set(runs.columns)
    index = (out / "index.html").read_text()
    assert (
        "report.ipynb" in index and "figures/metric_vs_params.png" in index and "tables/summary.html" in index
    )
    memory = pd.read_csv(out / "tables" / "memory-T12.csv")
    assert "trivial baseline" in set(memory["architecture"])


def test_report_pages_render_in_headless_chromium(smoke_report: Path):
    pytest.importorskip("playwright")
    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    import screenshot_report

    if screenshot_report.chromium() is None:
        pytest.skip("Chromium is not installed")
    shot = smoke_report / "screenshot.png"
    assert screenshot_report.check(smoke_report, shot) == []  # no console errors, dead links or images
    assert shot.stat().st_size > 50_000


def test_benchmark_ranked_on_the_metric_its_study_optimised(tmp_path: Path):
    """memory's copy problem optimises cross_entropy, not the class default mse: the study run says so."""
    from rnnbench.report.collect import collect, open_client
    from rnnbench.report.tables import rank_task
    from rnnbench.tracking import Tracker, tracking_uri_for

    home = tmp_path / "home"
    home.mkdir()
    tracker = Tracker(tracking_uri_for(home), "copy", home / "artifacts")
    for cell, values in (("gru", [1.0, 1.1]), ("rnn", [2.0, 2.1])):
        tags = {"study": f"copy/memory-copy/{cell}-1L-uni", "cell": cell, "layers": 1, "bidirectional": False,
                "task": "memory", "dataset": "synthetic"}  # fmt: skip
        parent = tracker.start_run("study", {**tags, "stage": "study", "status": "complete",
                                             "metric": "cross_entropy", "direction": "minimize"})  # fmt: skip
        for seed, v in enumerate(values):
            run = tracker.start_run(f"final-seed-{seed}", {**tags, "stage": "final", "seed": seed,
                                                           "status": "complete"}, parent)  # fmt: skip
            tracker.log_metrics(run, {"test_cross_entropy": v, "best_valid_cross_entropy": v})
            tracker.end_run(run)
        tracker.end_run(parent)
    uri = tracking_uri_for(home)
    data = collect(open_client(uri), "copy", tracking_uri=uri)
    info = data.benchmarks["memory-copy"]
    assert (info.metric, info.direction) == ("cross_entropy", "minimize")
    table = rank_task(data.runs, info, "memory-copy").table.dropna(subset=["rank"])
    assert list(table["architecture"]) == ["gru-1L-uni", "rnn-1L-uni"]
    assert table["mean"].iloc[0] == pytest.approx(1.05)


def _notebook_outputs(nb) -> tuple[dict[str, str], dict[str, bytes]]:
    """The executed notebook's ranking tables (HTML, by heading) and figures (PNG, by section)."""
    import base64
    import re

    tables, figures, section = {}, {}, None
    for cell in nb.cells:
        if cell.cell_type == "markdown" and cell.source.startswith("### "):
            section = cell.source.splitlines()[0][4:]
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if "<h2>" in data.get("text/html", ""):
                tables[re.search(r"<h2>(.*?)</h2>", data["text/html"]).group(1)] = data["text/html"]
            if "image/png" in data and section:
                figures[section] = base64.b64decode(data["image/png"])
    return tables, figures


def test_an_edited_notebook_cell_changes_tables_and_figures(smoke_report: Path):
    """The notebook ranks and draws from runs.parquet itself: a filter edited in its parameters
    cell and re-executed headless gives other tables and figures."""
    import nbformat

    from rnnbench.report import notebook
    from rnnbench.report.figures import CAPTIONS

    nb = nbformat.read(smoke_report / "report.ipynb", as_version=4)
    tables, figures = _notebook_outputs(nb)
    assert set(tables) == {"summary", "memory-synthetic", "memory-T12"}
    # every figure is drawn inline by the notebook (the same calls the HTML report saves)
    # (two architectures on the causal memory tasks: too few for a critical-difference diagram)
    assert set(figures) == set(CAPTIONS) - {"compare_experiments", "critical_difference"}
    assert all(len(png) > 10_000 for png in figures.values())
    assert "rnn-1L-uni" in tables["memory-T12"] and "gru-1L-uni" in tables["memory-T12"]

    assert nb.cells[1].metadata["tags"] == ["parameters"]
    nb.cells[1].source = nb.cells[1].source.replace("cells = None", "cells = ['gru']")
    assert notebook.execute(nb, smoke_report) == []
    edited_tables, edited_figures = _notebook_outputs(nb)
    assert "rnn-1L-uni" not in edited_tables["memory-T12"] and "gru-1L-uni" in edited_tables["memory-T12"]
    assert "rnn-1L-uni" not in edited_tables["summary"]
    changed = {name for name in figures if edited_figures.get(name) != figures[name]}
    assert {"metric_vs_params", "valid_curves", "metric_vs_seq_len", "optimisation_history"} <= changed


def _two_experiments(home: Path) -> None:
    """Two experiments of final seeds on two memory lengths (labels that sort wrong as text)."""
    from rnnbench.tracking import Tracker, tracking_uri_for

    home.mkdir(parents=True)
    scores = {"old": {"gru": [0.30, 0.32, 0.31], "lstm": [0.20, 0.22, 0.21]},
              "new": {"gru": [0.10, 0.12, 0.11], "lstm": [0.25, 0.26, 0.24]}}  # fmt: skip
    for experiment, by_cell in scores.items():
        tracker = Tracker(tracking_uri_for(home), experiment, home / "artifacts")
        for bench in ("memory-T40", "memory-T10"):
            for cell, values in by_cell.items():
                tags = {"study": f"{experiment}/{bench}/{cell}-1L-uni", "cell": cell, "layers": 1,
                        "bidirectional": False, "task": "memory", "dataset": "synthetic"}  # fmt: skip
                parent = tracker.start_run("study", {**tags, "stage": "study", "status": "complete"})
                for seed, v in enumerate(values):
                    run = tracker.start_run(f"seed-{seed}", {**tags, "stage": "final", "seed": seed,
                                                           "status": "complete"}, parent)  # fmt: skip
                    tracker.log_metrics(run, {"test_mse": v, "best_valid_mse": v, "params_total": 1000.0 + seed,
                                              "train_tokens_per_s_median": 12345.6})  # fmt: skip
                    tracker.end_run(run)
                tracker.end_run(parent)


def test_report_compares_two_experiments(tmp_path: Path):
    home, out = tmp_path / "home", tmp_path / "cmp"
    _two_experiments(home)
    runner = CliRunner()
    twice = runner.invoke(app, ["report", "old", "old", "--home", str(home), "--out", str(out)])
    assert twice.exit_code == 2 and "named twice" in twice.output and not out.exists()
    result = runner.invoke(app, ["report", "old", "new", "--home", str(home), "--out", str(out), "--format", "html"])  # fmt: skip
    assert result.exit_code == 0, result.output
    runs = pd.read_parquet(out / "runs.parquet")
    assert runs.groupby("experiment").size().to_dict() == {
        "new": 16,
        "old": 16,
    }  # 2 benchmarks x 2 cells x (study + 3 seeds)
    assert set(pd.read_parquet(out / "histories.parquet").columns) >= {"experiment", "run_id"}
    # tidy ranking CSV: one row per experiment and architecture; gru wins in new, lstm in old
    ranked = pd.read_csv(out / "tables" / "memory-T10.csv").dropna(subset=["rank"])
    best = ranked[ranked["rank"] == 1].set_index("experiment")["architecture"].to_dict()
    assert best == {"old": "lstm-1L-uni", "new": "gru-1L-uni"}
    md = (out / "tables" / "memory-T10.md").read_text()
    assert "| architecture | old · rank | old · test mse" in md and "| new · rank |" in md
    assert "| 12,346 |" in md  # tokens/s: an integer with thousands separators
    page = (out / "report.html").read_text()
    assert page.index("<h2>memory-T10</h2>") < page.index("<h2>memory-T40</h2>")  # natural order
    assert (out / "figures" / "compare_experiments.png").stat().st_size > 10_000


def test_older_stores_summaries_come_from_their_series_name():
    """Before the summaries had names of their own, a run's median throughput and peak memory were
    logged as one more point of the per-epoch series; the report reads them from there."""
    from mlflow.entities import Metric, Run, RunData, RunInfo

    from rnnbench.report.collect import run_row

    def run(metrics: dict[str, float]) -> Run:
        info = RunInfo("r", "1", "u", "FINISHED", 0, 1, "active", run_name="seed-0")
        data = RunData([Metric(k, v, 0, 0) for k, v in metrics.items()], [], [])
        return Run(info, data)

    old = run_row(run({"train_tokens_per_s": 900.0, "train_memory_mib": 3.0}), "e")
    assert old["train_tokens_per_s_median"] == 900.0 and old["train_memory_mib_peak"] == 3.0
    new = run_row(run({"train_tokens_per_s": 900.0, "train_tokens_per_s_median": 1000.0}), "e")
    assert new["train_tokens_per_s_median"] == 1000.0  # the summary, not the last epoch's value


def test_failed_final_seeds_are_counted_in_a_note():
    """A deterministic failure on a final seed counts as failed: the table says n of N seeds."""
    base = {"study": "e/sentiment-x/gru-1L-uni", "architecture": "gru-1L-uni", "cell": "gru",
            "variant": "1L-uni", "task": "sentiment", "stage": "final", "status": "failed",
            "failure_reason": "nan_loss"}  # fmt: skip
    runs = _runs({"lstm-1L-uni": [0.8, 0.81, 0.82], "gru-1L-uni": [0.7, 0.72]}, [base])
    t = rank_task(runs, ACC)
    assert t.table.set_index("architecture").loc["gru-1L-uni", "seeds"] == 2
    (note,) = [n for n in t.notes if "final seeds completed" in n]
    assert note == "gru-1L-uni: 2 of 3 final seeds completed (1 failed: nan_loss)"
