"""The Python API: rnnbench.run and rnnbench.load_results return tidy pandas frames; importing
rnnbench stays light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import rnnbench
from rnnbench.api import _overrides, load_experiment
from rnnbench.errors import ConfigError

REFERENCE = Path(__file__).parents[1] / "reports" / "reference-cpu"

TINY = """\
name: api-tiny
cells: [gru]
tasks:
  - name: memory
    options: {problem: adding, seq_len: 4, train_size: 32, valid_size: 16, test_size: 16}
search:
  lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
fixed: {hidden_size: 4}
budget: {trials: 1, epochs: 1}
final: {seeds: 1}
pruner: {name: none}
"""


def test_import_rnnbench_loads_no_heavy_library():
    code = (
        "import sys, rnnbench; rnnbench.run; rnnbench.load_results; rnnbench.Results\n"
        "heavy = [m for m in ('torch', 'pandas', 'optuna', 'mlflow', 'pydantic') if m in sys.modules]\n"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_an_experiment_from_a_path_a_string_or_a_mapping(tmp_path: Path):
    path = tmp_path / "api-tiny.yaml"
    path.write_text(TINY)
    as_mapping = yaml.safe_load(TINY)
    for given in (path, str(path), TINY, as_mapping):
        e = load_experiment(given, ["budget.trials=2"])
        assert e.name == "api-tiny" and e.budget.trials == 2
    assert as_mapping["budget"]["trials"] == 1  # the caller's mapping is left as it was
    with pytest.raises(ConfigError, match=r"<string> \(from the override `budget.trails=2`\)"):
        load_experiment(TINY, ["budget.trails=2"])


def test_overrides_as_a_mapping_are_written_as_yaml():
    assert _overrides({"budget.trials": 3, "cells": ["lstm", "gru"], "fixed.lr": 1e-3, "name": "1.0"}) == [
        "budget.trials=3",
        "cells=[lstm, gru]",
        "fixed.lr=0.001",
        "name='1.0'",
    ]
    e = load_experiment(TINY, {"cells": ["lstm", "gru"], "name": "x-1", "fixed.dropout": 0.5})
    assert [c.name for c in e.cells] == ["lstm", "gru"] and e.name == "x-1" and e.fixed["dropout"] == 0.5


def test_results_of_a_saved_report():
    if not (REFERENCE / "runs.parquet").is_file():
        pytest.skip("reports/reference-cpu is not in this checkout")
    results = rnnbench.load_results(REFERENCE)
    assert results.experiment == "reference-cpu" and len(results.runs) > 100
    assert set(results.tables) == set(results.runs["benchmark"].dropna()) and set(
        results.ranking["benchmark"]
    ) == set(results.tables)
    first = results.summary.iloc[0]
    assert {"architecture", "benchmarks_ranked", "wins"} <= set(results.summary.columns)
    assert first["benchmarks_ranked"] >= 1
    assert {"run_id", "metric", "step", "value"} <= set(results.histories.columns)


def test_load_results_without_a_store_is_one_clear_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="no MLflow store"):
        rnnbench.load_results("api-tiny", home=tmp_path)


@pytest.mark.slow  # a real run through the stores: 10-30 s on a busy 2-core machine
def test_run_then_resume_with_the_same_overrides_and_refuse_others(tmp_path: Path):
    home = tmp_path / "home"
    results = rnnbench.run(TINY, home=home, overrides=["budget.trials=2"])
    assert list(results.studies["study"]) == ["api-tiny/memory-synthetic/gru-1L-uni"]
    assert results.studies.loc[0, "complete"] == 2 and results.studies.loc[0, "seeds"] == 1
    ranking = results.tables["memory-synthetic"]
    assert "gru-1L-uni" in set(ranking["architecture"]) and ranking["rank"].min() == 1
    assert set(results.runs["stage"]) == {"study", "search", "final"}
    assert results.summary.loc[0, "architecture"] == "gru-1L-uni"

    again = rnnbench.run(TINY, home=home, overrides={"budget.trials": 2})  # a resume: nothing to run
    assert again.studies.loc[0, "complete"] == 2
    with pytest.raises(ConfigError, match="already exists with a different budget"):
        rnnbench.run(TINY, home=home)  # the file alone asks for 1 trial

    from mlflow.tracking import MlflowClient

    from rnnbench.tracking import tracking_uri_for

    client = MlflowClient(tracking_uri_for(home))
    study_run = results.runs[results.runs["stage"] == "study"].iloc[0]
    stored = client.download_artifacts(study_run["run_id"], "experiment.yaml", str(tmp_path))
    assert yaml.safe_load(Path(stored).read_text())["budget"]["trials"] == 2  # the experiment as run
    loaded = rnnbench.load_results("api-tiny", home=home)
    assert len(loaded.runs) == len(results.runs)


@pytest.mark.slow  # the documented example, as written: a real run, about 30 s
def test_the_documented_example_runs(tmp_path: Path, monkeypatch):
    import re

    page = (Path(__file__).parents[1] / "docs" / "reference" / "python-api.md").read_text()
    example = next(b for b in re.findall(r"```python\n(.*?)```", page, re.S) if "rnnbench.run(" in b)
    monkeypatch.chdir(tmp_path)  # its run home is ./runs
    namespace: dict = {}
    exec(compile(example, "python-api.md", "exec"), namespace)  # noqa: S102
    results = namespace["results"]
    assert set(results.tables["memory-synthetic"]["architecture"]) >= {"gru-1L-uni", "lstm-1L-uni"}
    trials = results.studies[["complete", "pruned", "failed"]].sum(axis=1)
    assert (trials == 3).all() and (results.studies["seeds"] == 3).all()  # the override's 3 trials
