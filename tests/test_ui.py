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
    assert not_a_port.exit_code == 2 and "'http' is not a valid integer" in not_a_port.output


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
