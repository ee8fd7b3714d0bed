"""Report verdicts: the winner chosen on validation, three verdicts, Holm families, split seeds."""

import math

import numpy as np
import pandas as pd
import pytest

from rnnbench.report import collect, tables, verdicts
from rnnbench.report.collect import TaskInfo
from rnnbench.stats import holm

ACCURACY = TaskInfo("sentiment", "accuracy", "maximize", (0.0, 1.0), 0.005)
MSE = TaskInfo("memory", "mse", "minimize", (0.0, math.inf), 0.05, True)


def _runs(finals: dict[str, tuple[list[float], list[float]]], metric="accuracy", bench="b", task="sentiment"):
    """Final-seed rows: architecture -> (validation values, test values)."""
    rows = []
    for arch, (valid, test) in finals.items():
        for seed, (v, t) in enumerate(zip(valid, test)):
            rows.append(
                {
                    "experiment": "e", "study": f"e/{bench}/{arch}", "architecture": arch, "cell": arch.split("-")[0],
                    "variant": "1L-uni", "task": task, "benchmark": bench, "dataset": "synthetic", "stage": "final",
                    "status": "complete", "seed": seed, "run_id": f"{arch}-{seed}",
                    f"best_valid_{metric}": v, f"test_{metric}": t,
                }
            )  # fmt: skip
    return pd.DataFrame(rows)


def test_the_winner_is_chosen_on_validation_not_test():
    runs = _runs(
        {
            "lstm-1L-uni": ([0.90, 0.91, 0.90], [0.80, 0.80, 0.81]),  # best on validation
            "gru-1L-uni": ([0.85, 0.86, 0.85], [0.83, 0.84, 0.83]),  # best on test
        }
    )
    assert verdicts.selected(runs, ACCURACY, "b") == "lstm-1L-uni"
    table = tables.rank_task(runs, ACCURACY, "b").table
    assert list(table["architecture"][:2]) == ["lstm-1L-uni", "gru-1L-uni"]
    assert table["vs_selected"].iloc[0] == "selected (best validation)"
    assert table["vs_selected"].iloc[1] == "better"  # gru is better on test than the selected lstm


def test_family_is_holm_adjusted_and_says_which_family():
    rng = np.random.default_rng(0)
    finals = {f"a{i}-1L-uni": (list(0.8 - 0.01 * i + rng.normal(0, 0.002, 4)),) * 2 for i in range(5)}
    runs = _runs(finals)
    fam = verdicts.family(runs, None, ACCURACY, "b")
    assert len(fam) == 4 and set(fam["versus"]) == {"a0-1L-uni"}
    assert fam["family"].iloc[0] == "b: best_vs_rest"
    assert fam["p_holm"].tolist() == pytest.approx(holm(fam["p_value"].tolist()))
    assert set(fam["method"]) == {"Welch over seeds"}
    pairs = verdicts.family(runs, None, ACCURACY, "b", "all_pairs")
    assert len(pairs) == 10


def test_equivalent_needs_a_margin_and_a_tight_interval():
    same = [0.800, 0.801, 0.799, 0.800, 0.8005, 0.7995]
    runs = _runs({"a-1L-uni": (same, same), "b-1L-uni": ([v - 1e-4 for v in same], [v + 1e-4 for v in same])})
    assert verdicts.family(runs, None, ACCURACY, "b")["verdict"].tolist() == ["equivalent"]
    no_margin = TaskInfo("sentiment", "accuracy", "maximize", (0.0, 1.0))
    assert verdicts.family(runs, None, no_margin, "b")["verdict"].tolist() == ["inconclusive"]
    assert verdicts.margin_text(no_margin) == "no margin declared: better/worse/inconclusive only"


def test_seeds_that_split_are_counted_not_averaged():
    values = [0.0025, 0.0023, 0.1774]  # two solve the adding problem, one stays at the baseline
    assert verdicts.seed_split(values, 0.177, MSE) == (2, 3)
    assert verdicts.seed_split([0.0025, 0.004, 0.03], 0.177, MSE) is None  # a spread, not a split
    runs = _runs(
        {"gru-1L-uni": ([0.0003] * 3, [0.0003, 0.0004, 0.0005]), "lstm-1L-uni": (values, values)},
        metric="mse", task="memory",
    )  # fmt: skip
    runs["baseline_test_mse"] = 0.177
    t = tables.rank_task(runs, MSE, "b")
    lstm = t.table.set_index("architecture").loc["lstm-1L-uni"]
    assert math.isnan(lstm["ci95_low"]) and lstm["vs_selected"] == "no verdict"
    shown = tables.display_frame(t).set_index("architecture")
    metric_column = next(c for c in shown.columns if c.startswith("test mse"))
    assert "2 of 3 seeds reach mse < 0.1 × baseline" in shown.loc["lstm-1L-uni", metric_column]


def test_margin_from_the_experiment_overrides_the_task():
    runs = _runs({"a-1L-uni": ([0.8] * 3, [0.8] * 3)})
    runs["margin"] = "2%"
    runs["primary_metric"], runs["direction"] = "accuracy", "maximize"
    info = collect.benchmark_infos(runs)[0]["b"]
    assert (info.margin, info.margin_relative, info.margin_source) == (0.02, True, "experiment")
    assert verdicts.absolute_margin(info, 0.8) == pytest.approx(0.016)


def test_no_approximately_equal_sign_anywhere_in_a_table():
    runs = _runs({"a-1L-uni": ([0.8, 0.81, 0.8],) * 2, "b-1L-uni": ([0.79, 0.8, 0.8],) * 2})
    html = tables.benchmark_html([tables.rank_task(runs, ACCURACY, "b")], "b")
    assert "≈" not in html and "selected (best validation)" in html


def _sentiment_items(runs: pd.DataFrame, accuracy: dict[str, float], n=400, seed=0) -> pd.DataFrame:
    """Per-sentence confusion indicators (the sentiment task's item columns) of every final seed:
    a sentence's difficulty is shared by all models, so the pairing has something to cancel."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, n)
    difficulty = rng.normal(0, 1.5, n)
    frames = []
    for row in runs.itertuples():
        logit = np.log(accuracy[row.architecture] / (1 - accuracy[row.architecture])) - difficulty
        right = rng.random(n) < 1 / (1 + np.exp(-logit))
        predicted = np.where(right, truth, 1 - truth)
        frame = pd.DataFrame({"run_id": row.run_id, "split": "test", "item": np.arange(n)})
        for t in (0, 1):
            for p in (0, 1):
                frame[f"c_{t}_{p}"] = ((truth == t) & (predicted == p)).astype(np.int32)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def test_items_give_a_paired_verdict_through_the_task_own_metric():
    runs = _runs({"lstm-1L-uni": ([0.9] * 4, [0.0] * 4), "gru-1L-uni": ([0.8] * 4, [0.0] * 4)})
    items = _sentiment_items(runs, {"lstm-1L-uni": 0.9, "gru-1L-uni": 0.7})
    rows = verdicts.compare(runs, "gru-1L-uni", "lstm-1L-uni", benchmark="b", items=items,
                                          infos={"b": ACCURACY})  # fmt: skip
    row = rows.iloc[0]
    assert row["method"] == "paired bootstrap over seeds and items" and row["items"] == 400
    assert row["verdict"] == "worse" and row["ci95_high"] < 0
    # the difference is the task's own accuracy recomputed from the confusion indicators
    accuracy = items.assign(right=items["c_0_0"] + items["c_1_1"]).merge(runs[["run_id", "architecture"]])
    per_seed = accuracy.groupby(["architecture", "run_id"])["right"].mean().groupby("architecture").mean()
    assert row["difference"] == pytest.approx(per_seed["gru-1L-uni"] - per_seed["lstm-1L-uni"])
    assert list(rows.columns[:4]) == ["benchmark", "family", "architecture", "versus"]


def test_old_runs_without_items_fall_back_to_seed_level_with_a_note():
    runs = _runs({"a-1L-uni": ([0.8, 0.81, 0.8],) * 2, "b-1L-uni": ([0.7, 0.71, 0.7],) * 2})
    t = tables.rank_task(runs, ACCURACY, "b", items=collect.empty_items())
    assert any("seed-level Welch only" in n for n in t.notes)
    assert t.comparisons["method"].tolist() == ["Welch over seeds"]


def test_a_saved_report_is_rendered_again_without_mlflow(tmp_path):
    """`rnnbench report FOLDER`: an archived report's runs.parquet and items.parquet, re-rendered
    with the current statistics (the committed reference report is regenerated this way)."""
    from click.testing import CliRunner

    from rnnbench.cli import app

    runs = _runs({"lstm-1L-uni": ([0.9] * 4, [0.9] * 4), "gru-1L-uni": ([0.8] * 4, [0.7] * 4)}).assign(
        primary_metric="accuracy", direction="maximize"
    )
    runs.to_parquet(tmp_path / collect.RUNS_FILE)
    _sentiment_items(runs, {"lstm-1L-uni": 0.9, "gru-1L-uni": 0.7}).to_parquet(tmp_path / collect.ITEMS_FILE)
    result = CliRunner().invoke(
        app, ["report", str(tmp_path), "--format", "html", "--out", str(tmp_path / "again")]
    )
    assert result.exit_code == 0, result.output
    table = (tmp_path / "again" / "tables" / "b.md").read_text()
    assert "selected (best validation)" in table and "| worse |" in table
    assert "seed-level Welch only" not in (tmp_path / "again" / "report.html").read_text()  # items used


def test_an_interval_cut_at_the_metric_bound_is_marked_and_explained():
    runs = _runs({"a-1L-uni": ([0.99, 0.999, 0.95],) * 2, "b-1L-uni": ([0.8, 0.81, 0.8],) * 2})
    t = tables.rank_task(runs, ACCURACY, "b")
    shown = tables.display_frame(t).set_index("architecture")
    metric = next(c for c in shown.columns if c.startswith("test accuracy"))
    assert shown.loc["a-1L-uni", metric].endswith(", 1*]")  # the t-interval reached 1.044
    assert "[" in shown.loc["b-1L-uni", metric] and "*" not in shown.loc["b-1L-uni", metric]
    (note,) = [n for n in t.notes if n.startswith("* interval cut")]
    assert "a-1L-uni (1.044)" in note and "b-1L-uni" not in note
