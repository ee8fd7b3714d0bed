"""Budget sensitivity (issue 22): rankings at fractions of the step budget against the full one,
on hand-made histories with known answers, and the reviewer's numbers on the first edition of
the reference study."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from rnnbench.report.budget import budget_sensitivity, html_section, write
from rnnbench.report.collect import TaskInfo

MSE = TaskInfo("memory", "mse", "minimize")
ACC = TaskInfo("sentiment", "accuracy", "maximize")
# the first edition of the reference study (reports/reference-cpu at 00856d4): the reviewer's numbers
FIRST_EDITION = Path(__file__).parent / "fixtures" / "reference-cpu-first-edition"


def _study(curves: dict[str, list[list[float]]], metric: str = "mse", per_round: int = 10, logged=None):
    """runs and histories as collect() saves them: ``curves`` maps an architecture to one list of
    validation values per final seed, one validation every ``per_round`` steps; ``logged`` maps
    a run_id to the step counts it logged per validation (else none are logged)."""
    runs, hist = [], []
    for arch, seeds in curves.items():
        cell, variant = arch.split("-", 1)
        for seed, values in enumerate(seeds):
            run_id = f"{arch}/{seed}"
            runs.append({"experiment": "e", "benchmark": "b", "task": "t", "study": f"e/b/{arch}", "architecture": arch,
                         "cell": cell, "variant": variant, "stage": "final", "status": "complete", "seed": seed,
                         "run_id": run_id, "steps": float(per_round * len(values)), "epochs": float(len(values))})  # fmt: skip
            for epoch, v in enumerate(values, start=1):
                hist.append({"run_id": run_id, "metric": f"valid_{metric}", "step": epoch, "value": v})
            for epoch, steps in enumerate((logged or {}).get(run_id, []), start=1):
                hist.append({"run_id": run_id, "metric": "steps", "step": epoch, "value": float(steps)})
    return pd.DataFrame(runs), pd.DataFrame(hist).assign(best_trial=False)


def _taus(result) -> dict[float, float]:
    return dict(zip(result.taus["fraction"], result.taus["tau"]))


def test_a_ranking_that_never_changes_has_tau_one_everywhere():
    runs, hist = _study({
        "gru-1L": [[0.5, 0.4, 0.3, 0.2], [0.5, 0.4, 0.3, 0.2]],
        "lstm-1L": [[0.6, 0.5, 0.4, 0.3], [0.6, 0.5, 0.4, 0.3]],
        "rnn-1L": [[0.9, 0.8, 0.7, 0.6], [0.9, 0.8, 0.7, 0.6]],
    })  # fmt: skip
    result = budget_sensitivity(runs, hist, {"b": MSE})
    assert _taus(result) == {0.25: pytest.approx(1.0), 0.5: pytest.approx(1.0), 0.75: pytest.approx(1.0),
                             1.0: pytest.approx(1.0)}  # fmt: skip
    assert set(result.taus["architectures"]) == {3} and result.taus["budget"].iloc[0] == 40
    assert list(result.rank_paths("b").loc["gru-1L"]) == [1, 1, 1, 1]


def test_a_reversed_ranking_has_tau_minus_one_and_maximise_flips_the_order():
    # first validation a < b < c < d; the last one reverses it
    curves = {"a-1L": [[1.0, 1.0, 1.0, 1.0]], "b-1L": [[2.0, 2.0, 2.0, 0.9]], "c-1L": [[3.0, 3.0, 3.0, 0.8]],
              "d-1L": [[4.0, 4.0, 4.0, 0.7]]}  # fmt: skip
    runs, hist = _study(curves)
    taus = _taus(budget_sensitivity(runs, hist, {"b": MSE}))
    assert (
        taus[0.25] == pytest.approx(-1.0)
        and taus[0.75] == pytest.approx(-1.0)
        and taus[1.0] == pytest.approx(1)
    )
    # higher is better: the same reversal with accuracies (a leads at first, d at the end)
    runs, hist = _study({"a-1L": [[0.4] * 4], "b-1L": [[0.3, 0.3, 0.3, 0.5]], "c-1L": [[0.2, 0.2, 0.2, 0.6]],
                         "d-1L": [[0.1, 0.1, 0.1, 0.7]]}, metric="accuracy")  # fmt: skip
    result = budget_sensitivity(runs, hist, {"b": ACC})
    assert _taus(result)[0.25] == pytest.approx(-1.0)
    assert list(result.rank_paths("b").loc["d-1L"]) == [4, 4, 4, 1]


def test_the_best_checkpoint_so_far_counts_not_the_last_validation():
    """Stopped at 50%, a kept its checkpoint of 0.5 from the first validation: it ranks first,
    although its latest validation (0.9) is worse than b's (0.6)."""
    runs, hist = _study({"a-1L": [[0.5, 0.9, 0.9, 0.9]], "b-1L": [[0.7, 0.6, 0.6, 0.4]]})
    ranks = budget_sensitivity(runs, hist, {"b": MSE}).ranks.set_index(["fraction", "architecture"])
    assert ranks.loc[(0.5, "a-1L"), "value"] == 0.5 and ranks.loc[(0.5, "a-1L"), "rank"] == 1
    assert ranks.loc[(1.0, "b-1L"), "rank"] == 1


def test_a_run_stopped_early_keeps_its_best():
    """a's seeds stopped (early stopping) after 2 of 4 validations; from then on they hold their
    best, 0.5, while b goes on improving: a leads at 75%, b at 100%."""
    runs, hist = _study({"a-1L": [[0.8, 0.5], [0.7, 0.5]], "b-1L": [[0.9, 0.8, 0.6, 0.4]] * 2})
    result = budget_sensitivity(runs, hist, {"b": MSE})
    ranks = result.ranks.set_index(["fraction", "architecture"])
    assert result.taus["budget"].iloc[0] == 40  # the longest run's steps, not a's 20
    assert ranks.loc[(0.75, "a-1L"), "value"] == 0.5 and ranks.loc[(1.0, "a-1L"), "value"] == 0.5
    assert ranks.loc[(0.75, "a-1L"), "rank"] == 1 and ranks.loc[(1.0, "a-1L"), "rank"] == 2
    assert _taus(result)[0.75] == pytest.approx(-1.0)


def test_when_patience_stopped_every_seed_the_budget_is_said_to_be_short():
    runs, hist = _study({"a-1L": [[0.8, 0.5]], "b-1L": [[0.9, 0.8]]})
    result = budget_sensitivity(runs.assign(stop_reason="converged"), hist, {"b": MSE})
    assert result.taus["budget"].iloc[0] == 20 and any("stopped by patience" in n for n in result.notes)
    mixed = runs.assign(stop_reason=["converged", "max_steps"])
    assert not budget_sensitivity(mixed, hist, {"b": MSE}).notes


def test_ties_share_a_rank_and_tau_b_accounts_for_them():
    """At the end a and b tie (rank 1.5 each), earlier they did not: τ-b = 2/sqrt(3·2)."""
    runs, hist = _study({"a-1L": [[0.3, 0.1]], "b-1L": [[0.2, 0.1]], "c-1L": [[0.5, 0.5]]})
    result = budget_sensitivity(runs, hist, {"b": MSE}, fractions=(0.5, 1.0))
    assert list(result.rank_paths("b")[1.0]) == [1.5, 1.5, 3]
    assert _taus(result)[0.5] == pytest.approx(2 / 6**0.5)


def test_an_architecture_not_yet_validated_is_left_out_of_that_point():
    """c validates every 20 steps (larger batches, say): at 25% of 40 steps it has no validation,
    so the 25% ranking compares a and b only and says c is missing. A seed with no history at all
    is named in the notes."""
    runs, hist = _study({"a-1L": [[0.1, 0.1, 0.1, 0.1]], "b-1L": [[0.2, 0.2, 0.2, 0.2]]})
    c_runs, c_hist = _study({"c-1L": [[0.3, 0.05]]}, per_round=20)
    lost, _ = _study({"a-1L": [[0.1]]})
    runs = pd.concat([runs, c_runs, lost.assign(run_id="a-1L/lost", seed=9)], ignore_index=True)
    result = budget_sensitivity(runs, pd.concat([hist, c_hist]), {"b": MSE})
    first = result.taus.set_index("fraction").loc[0.25]
    assert first["architectures"] == 2 and first["left_out"] == "c-1L" and first["tau"] == pytest.approx(1.0)
    assert result.taus.set_index("fraction").loc[0.5, "architectures"] == 3
    assert any("without a validation history" in n and "a-1L" in n for n in result.notes)


def test_logged_step_counts_place_the_validations():
    """Rounds of 5, 5 and 20 steps (the step counts the trainer logs per validation): at 50% of
    30 steps both early validations count. Without them every round is taken as 10 steps."""
    curves = {"a-1L": [[0.9, 0.2, 0.1]], "b-1L": [[0.5, 0.4, 0.3]]}
    runs, hist = _study(curves, logged={"a-1L/0": [5, 10, 30], "b-1L/0": [5, 10, 30]})
    ranks = budget_sensitivity(runs, hist, {"b": MSE}, fractions=(0.5,)).ranks.set_index("architecture")
    assert ranks.loc["a-1L", "value"] == 0.2 and ranks.loc["a-1L", "rank"] == 1
    runs, hist = _study(curves)
    ranks = budget_sensitivity(runs, hist, {"b": MSE}, fractions=(0.5,)).ranks.set_index("architecture")
    assert ranks.loc["a-1L", "value"] == 0.9 and ranks.loc["a-1L", "rank"] == 2


def test_no_history_gives_an_empty_result_the_report_can_show(tmp_path: Path):
    runs, _ = _study({"a-1L": [[0.1]]})
    result = budget_sensitivity(runs, pd.DataFrame(), {"b": MSE})
    assert result.taus.empty and "no validation history" in html_section(result)
    assert all(p.is_file() for p in write(result, tmp_path))


def test_the_reviewers_numbers_on_the_reference_study():
    """Issue 22: τ of the rankings at 250 and 500 of 750 steps against 750 steps."""
    from rnnbench.report.collect import benchmark_infos

    runs = pd.read_parquet(FIRST_EDITION / "runs.parquet")
    hist = pd.read_parquet(FIRST_EDITION / "histories.parquet")
    infos, _ = benchmark_infos(runs)
    result = budget_sensitivity(runs, hist, infos, fractions=(1 / 3, 2 / 3, 1.0))
    taus = result.taus.assign(fraction=result.taus["fraction"].round(2)).set_index(["benchmark", "fraction"])
    expected = {
        "charlm-tinyshakespeare": (0.36, 1.00),
        "adding-T100": (0.29, 0.86),
        "sentiment-sst2": (0.74, 0.64),
    }
    for bench, (third, two_thirds) in expected.items():
        assert taus.loc[(bench, 0.33), "tau"] == pytest.approx(third, abs=0.005), bench
        assert taus.loc[(bench, 0.67), "tau"] == pytest.approx(two_thirds, abs=0.005), bench
        assert taus.loc[(bench, 0.33), "steps"] == pytest.approx(250)
    assert list(result.rank_paths("sentiment-sst2").loc["lstm-2L-uni"]) == [4, 9, 1.5]
    # at 100% the ranking is the report's own (mean best validation of the final seeds)
    from rnnbench.report.verdicts import validation_means

    full = result.ranks[(result.ranks["benchmark"] == "ner-conll2003") & (result.ranks["fraction"] == 1.0)]
    assert list(full.sort_values("rank")["architecture"]) == list(validation_means(runs, infos["ner-conll2003"],
                                                                                    "ner-conll2003").index)  # fmt: skip


def test_the_figure_draws_tau_and_a_rank_panel_per_benchmark(tmp_path: Path):
    import matplotlib

    matplotlib.use("Agg")
    from rnnbench.report import figures

    runs, hist = _study({"a-1L": [[0.3, 0.1]], "b-1L": [[0.2, 0.1]], "c-1L": [[0.5, 0.5]]})
    fig = figures.budget_sensitivity(runs, hist, {"b": MSE}, figures.Style.for_runs(runs))
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == ["ranking agreement against budget", "b"]
    assert figures.save(fig, tmp_path, "budget_sensitivity").stat().st_size > 10_000
    assert figures.budget_sensitivity(runs, hist.iloc[0:0], {"b": MSE}, None).startswith(
        "budget_sensitivity: no"
    )
