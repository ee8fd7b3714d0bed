"""Faults on one machine (journal ledger, --workers 3) and on several (PostgreSQL ledger, MLflow
server, three run homes standing for three machines). A worker is SIGKILLed mid-trial and another
between the ledger write and the MLflow write; afterwards every study holds exactly its budget,
each killed configuration ran again once, nothing ran twice, and the ledger, MLflow and the report
agree trial by trial."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.services import MlflowServer, Postgres, postgres_bin

TINY = """\
name: {name}
cells: [gru, rnn]
tasks:
  - name: memory
    options: {{problem: adding, seq_len: 8, train_size: 256, valid_size: 64, test_size: 64}}
search:
  hidden_size: {{type: int, low: 4, high: 12}}
  lr: {{type: float, low: 1.0e-3, high: 1.0e-2, log: true}}
budget: {{trials: 3, epochs: 2}}
final: {{seeds: 2}}
pruner: {{name: none}}
"""


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    faults = (
        f"mid_trial:{tmp_path / 'killed-mid-trial'},after_ledger_write:{tmp_path / 'killed-after-ledger'}"
    )
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "RNNBENCH_FAULT": faults,
        "RNNBENCH_LEASE_SECONDS": "8",  # short, so the survivor waits little; long enough that a
        # loaded CI machine never misses a renewal (renewed every 2 s)
        **extra,
    }


def _command(path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "rnnbench.cli", "run", str(path), *args]


def _check_agreement(storage, client, experiment: str, tmp_path: Path) -> dict:
    """Exact budgets, one retry per kill, nothing twice, three views equal. Returns the counts."""
    from tests.ledger_checks import ledger_view, mlflow_view, parents_agree, report_view

    # both faults fired, once each
    assert (tmp_path / "killed-mid-trial").exists() and (tmp_path / "killed-after-ledger").exists()
    ledger = ledger_view(storage, experiment)
    per_state = Counter((stage, status) for (_, stage, _), (status, _) in ledger.items())
    for study in {k[0] for k in ledger}:
        search = Counter(
            s for (name, stage, _), (s, _) in ledger.items() if name == study and stage == "search"
        )
        final = Counter(
            s for (name, stage, _), (s, _) in ledger.items() if name == study and stage == "final"
        )
        assert search["complete"] + search["pruned"] + search["failed"] == 3, (study, search)
        assert final["complete"] == 2 and set(final) == {"complete"}, (study, final)
    assert per_state[("search", "lost")] == 1, per_state  # the mid-trial kill, and only it
    _retried_once(storage, experiment)
    assert mlflow_view(client, experiment) == ledger
    assert report_view(client, experiment) == ledger
    parents_agree(client, storage, experiment)
    return dict(per_state)


def _retried_once(storage, experiment: str) -> None:
    from rnnbench.ledger import StudyLedger
    from rnnbench.sweep import RETRY_OF, study_names

    for name in study_names(storage, experiment):
        led = StudyLedger.load(storage, name)
        for t in led.search_trials:
            if led.status(t) == "lost":
                copies = [c for c in led.search_trials if c.user_attrs.get(RETRY_OF) == t.number]
                assert len(copies) == 1 and copies[0].params == t.params
                assert led.status(copies[0]) == "complete"
        configs = Counter(
            tuple(sorted(t.params.items())) for t in led.search_trials if led.status(t) == "complete"
        )
        assert max(configs.values()) == 1, f"{name}: a configuration completed twice"


def test_workers_killed_on_one_machine(tmp_path: Path):
    """--workers 3 on the journal: the parent sees each death, recovers at once, replaces it."""
    from mlflow.tracking import MlflowClient

    from rnnbench.sweep import open_storage
    from rnnbench.tracking import tracking_uri_for

    home = tmp_path / "home"
    path = tmp_path / "one.yaml"
    path.write_text(TINY.format(name="one"))
    started = time.monotonic()
    result = subprocess.run(
        _command(path, "--workers", "3", "--home", str(home)),
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("died (exit code -9)") == 2, result.stdout
    counts = _check_agreement(open_storage(None, home), MlflowClient(tracking_uri_for(home)), "one", tmp_path)
    print(f"\none machine, --workers 3: {counts}, {time.monotonic() - started:.0f} s")

    # MLflow is only a view: lose its store entirely and `rnnbench sync` rebuilds it from the ledger.
    (home / "mlflow.db").unlink()
    shutil.rmtree(home / "artifacts", ignore_errors=True)
    synced = subprocess.run(
        [sys.executable, "-m", "rnnbench.cli", "sync", "one", "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert synced.returncode == 0 and "11 run(s) rewritten" in synced.stdout, synced.stdout + synced.stderr
    assert (
        _check_agreement(open_storage(None, home), MlflowClient(tracking_uri_for(home)), "one", tmp_path)
        == counts
    )


@pytest.fixture(scope="module")
def servers():
    if postgres_bin() is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    pg = Postgres().start()
    try:
        mlflow = MlflowServer(pg.create_database("mlflow")).start()
        try:
            yield pg, mlflow, pg.create_database("optuna")
        finally:
            mlflow.stop()
    finally:
        pg.stop()


def test_machines_killed_with_postgres_and_mlflow_server(tmp_path: Path, servers):
    """Three `rnnbench run` processes, three run homes, one PostgreSQL ledger, one MLflow server,
    started together. Two die; nobody watches them: the survivor sees the dead machine's lease
    expire (Optuna's heartbeat, in the database's clock) and repairs MLflow at its end."""
    from mlflow.tracking import MlflowClient

    from rnnbench.sweep import open_storage

    _, mlflow, optuna_url = servers
    path = tmp_path / "many.yaml"
    path.write_text(TINY.format(name="many"))
    started = time.monotonic()
    procs = []
    for machine in ("m1", "m2", "m3"):
        args = ["--home", str(tmp_path / machine), "--storage", optuna_url, "--tracking-uri", mlflow.url]
        procs.append(
            subprocess.Popen(
                _command(path, *args),
                env=_env(tmp_path, RNNBENCH_MACHINE_ID=machine),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [-9, -9, 0], "\n\n".join(o[-2000:] for o in outputs)
    counts = _check_agreement(open_storage(optuna_url, tmp_path), MlflowClient(mlflow.url), "many", tmp_path)
    print(f"\nthree machines, PostgreSQL: {counts}, {time.monotonic() - started:.0f} s")


@pytest.mark.slow  # 30-80 s; the default run covers the same repair path by deleting mlflow.db
def test_mlflow_server_down_mid_run_loses_nothing(tmp_path: Path):
    """The tracking server dies while trials train: the run finishes on the ledger alone, and a
    sync once the server is back makes MLflow agree with it."""
    from mlflow.tracking import MlflowClient

    from rnnbench.sweep import open_storage
    from tests.ledger_checks import ledger_view, mlflow_view

    server = MlflowServer(f"sqlite:///{tmp_path / 'mlflow.db'}").start()
    path = tmp_path / "down.yaml"
    path.write_text(TINY.format(name="down").replace("cells: [gru, rnn]", "cells: [gru]"))
    home = tmp_path / "home"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    }
    proc = subprocess.Popen(
        _command(path, "--home", str(home), "--tracking-uri", server.url),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = []
    for line in proc.stdout:  # stop the server once the first trial has finished
        seen.append(line)
        if "-> complete" in line:
            server.stop()
            break
    out = "".join(seen) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    assert "rnnbench sync down" in out  # told how to repair
    storage = open_storage(None, home)
    ledger = ledger_view(storage, "down")
    assert Counter(s for s, _ in ledger.values()) == Counter({"complete": 5})

    again = MlflowServer(f"sqlite:///{tmp_path / 'mlflow.db'}")
    again.port, again.url = server.port, server.url  # the same address as before
    again.start()
    try:
        synced = subprocess.run(
            [
                sys.executable,
                "-m",
                "rnnbench.cli",
                "sync",
                "down",
                "--home",
                str(home),
                "--tracking-uri",
                server.url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert synced.returncode == 0, synced.stderr
        assert mlflow_view(MlflowClient(server.url), "down") == ledger
    finally:
        again.stop()
