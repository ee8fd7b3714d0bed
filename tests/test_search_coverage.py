"""Best configurations at the edge of their searched range, and pruning per architecture: the
report's search section and the CLI's note lines (rnnbench.report.search)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from rnnbench.report.search import (
    SPACE_COLUMN,
    best_values,
    edge_notes,
    edge_of,
    pruning_table,
    search_html,
    search_space_of_note,
    with_search_space,
)

SPACE = {
    "lr": {"type": "float", "low": 2e-3, "high": 2e-2, "log": True},
    "dropout": {"type": "float", "low": 0.0, "high": 0.3, "log": False},
    "layers_extra": {"type": "int", "low": 1, "high": 5, "log": False, "step": 1},
    "batch_size": {"type": "categorical", "choices": [32, 64]},
}


@pytest.mark.parametrize(
    "value, low, high, log, edge",
    [
        (2.2e-3, 2e-3, 2e-2, True, "low"),  # 4% of the log range
        (1.85e-2, 2e-3, 2e-2, True, "high"),  # 97%
        (6.3e-3, 2e-3, 2e-2, True, None),  # the log middle
        (3.5e-3, 2e-3, 2e-2, False, "low"),  # 8% of the linear range, 24% of the log one...
        (3.5e-3, 2e-3, 2e-2, True, None),
        (0.02, 0.0, 0.3, False, "low"),
        (0.28, 0.0, 0.3, False, "high"),
        (0.15, 0.0, 0.3, False, None),
        (1, 1, 5, False, "low"),  # int ranges: the end values
        (5, 1, 5, False, "high"),
        (2, 1, 5, False, None),
        (16, 16, 256, True, "low"),
        (64, 16, 256, True, None),
        (None, 0.0, 1.0, False, None),  # no value, no range, nothing to flag
        (0.5, 0.5, 0.5, False, None),
    ],
)
def test_edge_of(value, low, high, log, edge):
    assert edge_of(value, low, high, log) == edge


def _study(bench: str, arch: str, **hp) -> dict:
    return {"experiment": "e", "stage": "study", "study": f"e/{bench}/{arch}", "benchmark": bench,
            "architecture": arch, "status": "complete", **{f"hp_{k}": v for k, v in hp.items()}}  # fmt: skip


def _runs() -> pd.DataFrame:
    rows = [
        _study("forecast-etth1", "gru-1L-uni", lr=2.1e-3, dropout=0.15, layers_extra=3, batch_size=32),
        _study("forecast-etth1", "lstm-1L-uni", lr=2.3e-3, dropout=0.29, layers_extra=1, batch_size=64),
        _study("forecast-etth1", "rnn-1L-uni", lr=6e-3, dropout=0.1, layers_extra=5, batch_size=64),
    ]
    for arch, statuses in (
        ("gru-1L-uni", ["complete", "pruned", "pruned"]),
        ("lstm-1L-uni", ["complete", "failed", "lost"]),
    ):
        for i, status in enumerate(statuses):
            rows.append({"experiment": "e", "stage": "search", "study": f"e/forecast-etth1/{arch}", "trial": i,
                         "benchmark": "forecast-etth1", "architecture": arch, "status": status})  # fmt: skip
    return with_search_space(pd.DataFrame(rows), {"e": SPACE})


def test_best_values_flag_each_numeric_parameter_and_skip_categoricals():
    best = best_values(_runs())
    assert set(best["parameter"]) == {"lr", "dropout", "layers_extra"}
    flagged = {(r.architecture, r.parameter): r.edge for r in best.itertuples() if pd.notna(r.edge)}
    assert flagged == {
        ("gru-1L-uni", "lr"): "low",
        ("lstm-1L-uni", "lr"): "low",
        ("lstm-1L-uni", "dropout"): "high",
        ("lstm-1L-uni", "layers_extra"): "low",
        ("rnn-1L-uni", "layers_extra"): "high",
    }


def test_edge_notes_count_the_studies_of_a_benchmark():
    notes = edge_notes(best_values(_runs()))
    assert (
        "forecast-etth1: best lr at the low edge of [0.002, 0.02, log] in 2 of 3 studies "
        "(gru-1L-uni, lstm-1L-uni): widen the range"
    ) in notes
    assert (
        "forecast-etth1: best layers_extra at the high edge of [1, 5] in 1 of 3 studies (rnn-1L-uni): widen the range"
        in notes
    )
    assert len(notes) == 4  # lr low, dropout high, layers_extra low and high


def test_an_edge_the_domain_closes_is_not_to_be_widened():
    runs = _runs()
    runs.loc[runs["stage"] == "study", "hp_dropout"] = 0.0
    notes = edge_notes(best_values(runs))
    assert (
        "forecast-etth1: best dropout at the low edge of [0, 0.3] in 3 of 3 studies (gru-1L-uni, lstm-1L-uni, rnn-1L-uni): 0 is as far as dropout goes"
        in notes
    )


def test_a_table_without_ranges_flags_nothing_and_says_why():
    runs = _runs().drop(columns=SPACE_COLUMN)
    assert best_values(runs).empty and edge_notes(best_values(runs)) == []
    assert "not in this report's runs table" in search_html(runs)


def test_pruning_counts_what_counts_toward_the_budget():
    table = pruning_table(_runs()).set_index("architecture")
    assert table.loc["gru-1L-uni", "forecast-etth1"] == "2/3"
    assert table.loc["lstm-1L-uni", "forecast-etth1"] == "0/2"  # a lost trial is retried, not counted
    html = search_html(_runs())
    assert "search coverage" in html and "2/3" in html and "best lr at the low edge" in html


def test_the_ranges_come_from_the_experiment_file_mlflow_keeps():
    note = "rnnbench experiment. The file it ran, with every default filled in:\n\n```yaml\n" + (
        "name: e\nsearch:\n  lr: {type: float, low: 0.002, high: 0.02, log: true}\n```\n"
    )
    assert search_space_of_note(note) == {"lr": {"type": "float", "low": 0.002, "high": 0.02, "log": True}}
    assert search_space_of_note("a note someone wrote") is None
    runs = with_search_space(pd.DataFrame({"experiment": ["e", "other"]}), {"e": search_space_of_note(note)})
    assert json.loads(runs[SPACE_COLUMN][0])["lr"]["high"] == 0.02 and pd.isna(runs[SPACE_COLUMN][1])


def test_the_cli_notes_a_best_configuration_at_the_edge(tmp_path: Path):
    """From the ledger, as `rnnbench run` prints under its results table."""
    from rnnbench.cli import _edge_lines
    from rnnbench.experiment import parse
    from rnnbench.ledger import create_study
    from rnnbench.plan import open_stores, prepare

    experiment = parse(
        "name: s\ncells: [gru]\ntasks: [memory]\nsearch:\n"
        "  lr: {type: float, low: 1.0e-3, high: 1.0e-1, log: true}\nbudget: {trials: 2, epochs: 1}\n"
    )
    plan = prepare(experiment, home=tmp_path)
    stores = open_stores(plan)
    search, _ = create_study(plan, stores[1], plan.studies[0])
    for lr, loss in ((1.1e-3, 0.5), (1e-2, 0.9)):  # the best at 2% of the log range
        search.enqueue_trial({"lr": lr})
        trial = search.ask()
        trial.suggest_float("lr", 1e-3, 1e-1, log=True)
        search.tell(trial, loss)
    assert _edge_lines(plan) == [
        "memory-synthetic: best lr at the low edge of [0.001, 0.1, log] in 1 of 1 studies (gru-1L-uni): widen the range"
    ]
