"""`rnnbench dashboard`: optuna-dashboard on the run home's ledger, localhost only, one line when absent."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from rnnbench.cli import app


def _tiny_home(home: Path) -> None:
    """A ledger as `rnnbench run` leaves it: a search study and its final stage, one trial each."""
    import optuna

    from rnnbench.sweep import FINAL_SUFFIX, open_storage

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = open_storage(None, home)
    name = "tiny/memory-synthetic/gru-1L-uni"
    search = optuna.create_study(study_name=name, storage=storage)
    search.optimize(lambda t: t.suggest_float("lr", 1e-3, 1e-2, log=True), n_trials=1)
    final = optuna.create_study(study_name=name + FINAL_SUFFIX, storage=storage)
    final.enqueue_trial({}, user_attrs={"seed": 1})
    final.optimize(lambda t: 0.5, n_trials=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_serves_the_ledgers_studies(tmp_path: Path):
    pytest.importorskip("optuna_dashboard")
    home = tmp_path / "home"
    _tiny_home(home)
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "rnnbench.cli", "dashboard", "--home", str(home), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ},
    )  # fmt: skip
    try:
        deadline, studies = time.monotonic() + 30, None
        while studies is None and time.monotonic() < deadline:
            assert server.poll() is None, server.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as response:
                    studies = json.load(response)["study_summaries"]
            except OSError:  # not listening yet
                time.sleep(0.3)
        assert studies is not None, "the dashboard did not answer within 30 s"
        names = sorted(s["study_name"] for s in studies)
        assert names == ["tiny/memory-synthetic/gru-1L-uni", "tiny/memory-synthetic/gru-1L-uni::final"]
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=10)
    assert f"at http://127.0.0.1:{port}" in out.splitlines()[0]  # localhost unless --host is given


def test_dashboard_without_the_package_or_a_ledger_is_one_line(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # import fails as if not installed
    result = CliRunner().invoke(app, ["dashboard", "--home", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output == (
        "error: optuna-dashboard is not installed: pip install 'rnnbench[dashboard]' -c constraints.txt\n"
    )
    monkeypatch.setitem(sys.modules, "optuna_dashboard", type(sys)("optuna_dashboard"))
    missing = CliRunner().invoke(app, ["dashboard", "--home", str(tmp_path / "empty")])
    assert missing.exit_code == 2 and "no Optuna ledger at" in missing.output
    assert len(missing.output.strip().splitlines()) == 1 and not (tmp_path / "empty").exists()


def test_a_busy_or_bad_port_is_one_line_before_anything_is_printed(tmp_path: Path, monkeypatch):
    """The port is checked before the address is printed: that address would lead to whatever holds it."""
    monkeypatch.setitem(sys.modules, "optuna_dashboard", type(sys)("optuna_dashboard"))  # never reached
    home = tmp_path / "home"
    _tiny_home(home)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = CliRunner().invoke(app, ["dashboard", "--home", str(home), "--port", str(port)])
    assert busy.exit_code == 2
    assert busy.output.splitlines() == [
        f"error: cannot serve on 127.0.0.1:{port}: Address already in use; pass another --port"
    ]
    for bad in ("http", "0", "70000"):
        result = CliRunner().invoke(app, ["dashboard", "--home", str(home), "--port", bad])
        assert result.exit_code == 2
        assert result.output.splitlines() == [f"error: --port {bad}: a port is a number from 1 to 65535"]
