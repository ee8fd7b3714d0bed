"""`rnnbench ui`: a busy port is one line and exit 2; the server stops with its terminal."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from rnnbench.cli import app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _home_with_a_store(tmp_path: Path) -> Path:
    from rnnbench.tracking import create_sqlite_store

    home = tmp_path / "home"
    home.mkdir()
    create_sqlite_store(home)
    return home


def test_a_busy_port_is_one_line_and_exit_2(tmp_path: Path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "mlflow.db").touch()  # the ui refuses before it opens the store
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["ui", "--home", str(home), "--port", str(port)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: cannot serve on 127.0.0.1:{port}: Address already in use; pass another --port"
    ]
    not_a_port = CliRunner().invoke(app, ["ui", "--home", str(home), "--port", "http"])
    assert not_a_port.exit_code == 2
    assert not_a_port.output.strip().splitlines() == [
        "error: --port http: a port is a number from 1 to 65535"
    ]


@pytest.mark.slow  # an MLflow server start: about 15 s
def test_the_server_stops_when_its_terminal_closes(tmp_path: Path):
    """SIGHUP (a closed terminal) to `rnnbench ui` ends the MLflow server it started: the port is
    free again and no process of it is left."""
    home = _home_with_a_store(tmp_path)
    port = _free_port()
    ui = subprocess.Popen(
        [sys.executable, "-m", "rnnbench.cli", "ui", "--home", str(home), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own terminal-like session, so the signal reaches it alone
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "the MLflow UI did not answer within 90 s"
                assert ui.poll() is None, "rnnbench ui exited early"
                time.sleep(0.5)
        os.kill(ui.pid, signal.SIGHUP)
        assert ui.wait(timeout=30) == 0
        deadline = time.monotonic() + 15
        while True:  # nothing listens any more: the server's whole group is gone
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) != 0:
                    break
            assert time.monotonic() < deadline, "the MLflow server outlived rnnbench ui"
            time.sleep(0.3)
    finally:
        if ui.poll() is None:
            ui.kill()


def test_the_ui_command_serves_rnnbench_s_mlflow_app(tmp_path: Path, monkeypatch):
    """`rnnbench ui` starts MLflow's server as rnnbench's app (`--app-name rnnbench`) and prints the
    experiments page, with no ?workflowType= to keep the view: the app keeps it (see the next tests)."""
    import rnnbench.cli as cli
    from rnnbench.tracking import mlflow_app_registered

    assert mlflow_app_registered(), (
        "entry point mlflow.app:rnnbench missing: pip install -e . (pyproject.toml)"
    )
    commands = []
    monkeypatch.setattr(cli, "_serve_until_stopped", lambda command: commands.append(command) or 0)
    home = tmp_path / "home"
    home.mkdir()
    (home / "mlflow.db").touch()
    port = _free_port()
    result = CliRunner().invoke(app, ["ui", "--home", str(home), "--port", str(port)])
    assert result.exit_code == 0, result.output
    assert f"at http://127.0.0.1:{port}/#/experiments  (Ctrl-C to stop)" in result.output
    assert "workflowType" not in result.output and "warning" not in result.output
    assert commands[0][-2:] == ["--app-name", "rnnbench"]


def test_the_app_s_page_makes_model_training_the_remembered_view():
    """The one page MLflow's UI is (index.html) sets the browser's remembered view to "Model training"
    before the UI's bundle reads it, and only where none is remembered: the UI's own switch still rules."""
    from rnnbench.tracking import mlflow_ui_app

    flask_app = mlflow_ui_app()  # no MLflow server around it: the Flask app, not the FastAPI wrapper
    page = flask_app.test_client().get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    seed = 'if(localStorage.getItem("mlflow.workflowType_v1")===null)'
    assert seed in html and 'localStorage.setItem("mlflow.workflowType_v1","\\"machine_learning\\"")' in html
    assert html.index(seed) < html.index("static/js/main.")  # before the bundle


@pytest.mark.slow  # an MLflow server start and nine pages in Chromium: about 2 minutes on 2 busy cores
def test_a_click_through_the_ui_never_shows_the_genai_view(tmp_path: Path):
    """In a fresh headless Chromium, from the address `rnnbench ui` prints, click experiment → parent
    run → child run (its tabs) → its logged model → the experiment's Models tab: every page is MLflow's
    Model training view, none its GenAI one ("Training runs", "Agent versions", "Detect Issues"...),
    and no address in between is typed or carries ?workflowType=."""
    pytest.importorskip("playwright")
    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    import screenshot_mlflow

    if screenshot_mlflow.chromium() is None:
        pytest.skip("Chromium is not installed")
    from mlflow.entities import LoggedModelOutput

    from rnnbench.tracking import Tracker, tracking_uri_for

    home = _home_with_a_store(tmp_path)
    tracker = Tracker(tracking_uri_for(home), "clicks", home / "artifacts")
    client = tracker.client
    parent = tracker.start_run("memory-synthetic/gru-1L-uni", {"stage": "study"})
    client.log_metric(parent, "best_valid", 0.25)
    child_name = "memory-synthetic/gru-1L-uni/seed-0"
    child = tracker.start_run(child_name, {"stage": "final", "seed": 0}, parent_id=parent)
    for step in range(3):
        client.log_metric(child, "valid_mse", 0.5 - 0.1 * step, step=step)
    model = client.create_logged_model(tracker.experiment_id, name="gru-seed-0", source_run_id=child)
    client.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(child, [LoggedModelOutput(model.model_id, step=2)])
    for run_id in (child, parent):
        client.set_terminated(run_id)

    ui, address = screenshot_mlflow.start_ui(home, _free_port(), tmp_path / "ui.log")
    try:
        assert address.endswith("/#/experiments") and "workflowType" not in address
        problems = screenshot_mlflow.click_through(
            address,
            "clicks",
            ("memory-synthetic/gru-1L-uni", parent),
            (child_name, child),
            ("gru-seed-0", model.model_id),
            tmp_path / "shots",
            {"05-child-model-metrics.png": ["valid_mse"], "09-experiment-models.png": ["gru-seed-0"]},
        )
    finally:
        screenshot_mlflow.stop_ui(ui)
    assert problems == []
    assert len(list((tmp_path / "shots").glob("*.png"))) == 9
