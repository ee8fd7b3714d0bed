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
