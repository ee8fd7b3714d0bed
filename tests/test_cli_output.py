"""What a person reads when output is piped to a log: nothing cut, no MLflow chatter."""

from __future__ import annotations

import os

from click.testing import CliRunner

from rnnbench.cli import app


def test_list_is_never_cut_when_piped():
    from rnnbench import catalog

    result = CliRunner().invoke(app, ["list"])  # stdout is not a terminal here, as in a pipe
    assert result.exit_code == 0, result.output
    assert "…" not in result.output
    data = catalog.load()
    for entry in data["cells"] + data["tasks"]:
        assert entry["description"] in result.output  # each on one line, whole


def test_mlflow_prints_no_run_urls_for_an_http_store(monkeypatch, capsys):
    """MLflow writes "🏃 View run … at: http://…" to stdout each time a run ends on an HTTP store
    (TrackingServiceClient._log_url); rnnbench turns that off before any run starts."""
    from mlflow.tracking import MlflowClient

    from rnnbench.tracking import _quiet_mlflow

    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    _quiet_mlflow()
    assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"
    client = MlflowClient("http://127.0.0.1:9")  # nothing listens: a print would have to ask it first
    client._tracking_client._log_url("0" * 32)
    assert capsys.readouterr().out == ""


def test_skipped_studies_are_named_only_when_asked_and_the_ledger_names_its_objectives(tmp_path):
    """skip_invalid is the user's own choice: a run does not repeat it unless --verbose. The Optuna
    dashboard labels each study's objective with its metric (not "Objective 0")."""
    import optuna

    from rnnbench.sweep import FINAL_SUFFIX, open_storage

    (tmp_path / "skip.yaml").write_text(
        "name: skip\ncells: [{name: gru, bidirectional: [false, true]}]\ntasks: [memory]\n"
        "fixed: {hidden_size: 8}\nbudget: {trials: 1, epochs: 1, steps_per_epoch: 2}\nfinal: {seeds: 1}\n"
        "skip_invalid: true\n"
    )
    env = {"RNNBENCH_HOME": str(tmp_path / "home")}
    quiet = CliRunner(env=env).invoke(app, ["run", str(tmp_path / "skip.yaml")])
    assert quiet.exit_code == 0, quiet.output
    assert not [line for line in quiet.output.splitlines() if line.startswith("skipped ")]
    again = CliRunner(env=env).invoke(app, ["run", str(tmp_path / "skip.yaml"), "--verbose"])
    assert again.exit_code == 0, again.output
    assert "skipped skip/memory-synthetic/gru-1L-bi: task 'memory' is causal" in again.output
    storage = open_storage(None, tmp_path / "home")
    search = optuna.load_study(study_name="skip/memory-synthetic/gru-1L-uni", storage=storage)
    final = optuna.load_study(study_name="skip/memory-synthetic/gru-1L-uni" + FINAL_SUFFIX, storage=storage)
    assert (search.metric_names, final.metric_names) == (["valid mse"], ["test mse"])


def test_the_results_table_fits_80_columns_without_breaking_a_name():
    """The smoke run's summary at 80 columns: every benchmark and architecture whole on its line,
    the experiment named once (title), which way each metric is better."""
    from rich.console import Console

    from rnnbench.cli import results_table

    row = {"complete": 2, "pruned": 0, "failed": 0, "lost": 0, "interrupted": 0, "best_valid": 0.1303,
           "seeds": 3, "test_mean": 0.2158, "test_ci95": (0.07912, 0.3525), "metric": "mse",
           "direction": "minimize", "seed_values": [0.1, 0.2, 0.3]}  # fmt: skip
    studies = [
        {**row, "study": f"smoke/{bench}/{arch}"}
        for bench in ("forecast-synthetic", "sentiment-synthetic", "memory-T40")
        for arch in ("peephole-1L-uni", "lstm-2L-uni", "gru-1L-bi")
    ]
    console = Console(width=80, record=True)
    console.print(results_table("smoke", studies))
    text = console.export_text()
    lines = text.splitlines()
    assert max(map(len, lines)) <= 80
    assert "smoke/" not in text
    for name in ("forecast-synthetic", "sentiment-synthetic", "memory-T40", "peephole-1L-uni", "gru-1L-bi"):
        assert any(name in line for line in lines), name  # whole on one line
    assert sum("forecast-synthetic" in line for line in lines) == 1  # named once for its group
    assert "mse ↓ lower is better" in text and "0.216 [0.0791, 0.352]" in text
