"""Fault table: where a kill lands → trials per state in the ledger, MLflow and the report.

Runs a small synthetic experiment (2 architectures × 3 search trials + 2 final seeds) under each
fault, resumes where a user would, then compares the three views trial by trial. Needs the
PostgreSQL server binaries for the many-machines row (skipped without them).

    python benchmarks/faults.py            # prints a Markdown table (a few minutes on 2 cores)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.ledger_checks import ledger_view, mlflow_view, report_view  # noqa: E402
from tests.services import MlflowServer, Postgres, postgres_bin  # noqa: E402

EXPERIMENT = """\
name: faults
cells: [gru, rnn]
tasks:
  - name: memory
    options: {problem: adding, seq_len: 8, train_size: 1024, valid_size: 64, test_size: 64}
search:
  hidden_size: {type: int, low: 4, high: 12}
  lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
budget: {trials: 3, epochs: 2}
final: {seeds: 2}
pruner: {name: none}
"""


def rnnbench(args: list[str], env: dict[str, str], stop_at: str | None = None) -> tuple[int, str]:
    """Run the CLI; with ``stop_at``, send SIGINT once that text appears (Ctrl-C)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "rnnbench.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = []
    for line in proc.stdout:
        out.append(line)
        if stop_at and stop_at in line:
            proc.send_signal(signal.SIGINT)
            stop_at = None
    return proc.wait(), "".join(out)


def views(storage_url, tracking_uri, home):
    from mlflow.tracking import MlflowClient

    from rnnbench.sweep import open_storage

    storage, client = open_storage(storage_url, home), MlflowClient(tracking_uri)
    ledger = ledger_view(storage, "faults")
    same_mlflow = mlflow_view(client, "faults") == ledger
    same_report = report_view(client, "faults") == ledger
    per_state = Counter(f"{stage} {status}" for (_, stage, _), (status, _) in ledger.items())
    return per_state, same_mlflow, same_report


def retries(storage_url, home) -> int:
    from rnnbench.projection import StudyLedger
    from rnnbench.sweep import RETRY_OF, open_storage, study_names

    storage = open_storage(storage_url, home)
    n = 0
    for name in study_names(storage, "faults"):
        led = StudyLedger.load(storage, name)
        n += sum(RETRY_OF in t.user_attrs for t in led.search_trials + led.final_trials)
    return n


def scenario(name: str, steps, tmp: Path, storage_url=None, tracking_uri=None) -> dict:
    from rnnbench.tracking import tracking_uri_for

    home = tmp / "home"
    path = tmp / "faults.yaml"
    path.write_text(EXPERIMENT)
    base = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "RNNBENCH_LEASE_SECONDS": "4"}
    args = ["run", str(path), "--home", str(home)]
    if storage_url:
        args += ["--storage", storage_url, "--tracking-uri", tracking_uri]
    started = time.monotonic()
    codes = [step(args, base, tmp, home) for step in steps]
    wall = time.monotonic() - started
    return row(
        name,
        " → ".join(str(c) for c in codes),
        storage_url,
        tracking_uri or tracking_uri_for(home),
        home,
        wall,
    )


def row(name: str, codes: str, storage_url, tracking_uri, home: Path, wall: float) -> dict:
    """One line of the table: the ledger's counts and whether MLflow and the report agree."""
    per_state, same_mlflow, same_report = views(storage_url, tracking_uri, home)
    return {
        "fault": name,
        "exit codes": codes,
        "ledger": ", ".join(f"{k} {v}" for k, v in sorted(per_state.items())),
        "MLflow = ledger": "yes" if same_mlflow else "NO",
        "report = ledger": "yes" if same_report else "NO",
        "retries": retries(storage_url, home),
        "wall s": f"{wall:.0f}",
    }


def run(args, env, tmp, home, fault=None, stop_at=None, extra=()):
    env = dict(env)
    if fault:
        env["RNNBENCH_FAULT"] = ",".join(f"{f}:{tmp / f}" for f in fault)
    return rnnbench(args + list(extra), env, stop_at)[0]


def tear_journal(args, env, tmp, home):
    with open(home / "optuna.journal", "ab") as f:
        f.write(b'{"op_code": 5, "worker_id": "x", "trial_id"')  # a crash mid-write
    return "torn"


def drop_mlflow(args, env, tmp, home):
    (home / "mlflow.db").unlink()
    shutil.rmtree(home / "artifacts", ignore_errors=True)
    return rnnbench(["sync", "faults", "--home", str(home)], env)[0]


def main() -> None:
    rows = []
    cases = [
        ("none", [run]),
        ("SIGKILL mid-trial, then run again", [lambda *a: run(*a, fault=["mid_trial"]), run]),
        (
            "SIGKILL between ledger write and MLflow write, then run again",
            [lambda *a: run(*a, fault=["after_ledger_write"]), run],
        ),
        ("Ctrl-C mid-trial, then run again", [lambda *a: run(*a, stop_at="epoch 1/2"), run]),
        (
            "SIGKILL mid-trial + torn last journal record, then run again",
            [lambda *a: run(*a, fault=["mid_trial"]), tear_journal, run],
        ),
        (
            "--workers 3: one worker SIGKILLed mid-trial, one after its ledger write",
            [lambda *a: run(*a, fault=["mid_trial", "after_ledger_write"], extra=["--workers", "3"])],
        ),
        ("MLflow store deleted after a finished run, then `rnnbench sync`", [run, drop_mlflow]),
    ]
    for name, steps in cases:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(scenario(name, steps, Path(tmp)))
            print(rows[-1], file=sys.stderr, flush=True)
    if postgres_bin() is not None:
        rows.append(many_machines())
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")


def many_machines() -> dict:
    """Three `rnnbench run` on three run homes, one PostgreSQL ledger, one MLflow server; one is
    SIGKILLed mid-trial and one after a ledger write; the third finishes the sweep."""
    pg = Postgres().start()
    try:
        server = MlflowServer(pg.create_database("mlflow")).start()
        try:
            url = pg.create_database("optuna")
            with tempfile.TemporaryDirectory() as tmp:
                tmp = Path(tmp)
                path = tmp / "faults.yaml"
                path.write_text(EXPERIMENT)
                env = {
                    **os.environ,
                    "OMP_NUM_THREADS": "1",
                    "RNNBENCH_LEASE_SECONDS": "4",
                    "RNNBENCH_FAULT": f"mid_trial:{tmp / 'a'},after_ledger_write:{tmp / 'b'}",
                }
                started = time.monotonic()
                procs = [
                    subprocess.Popen(
                        [sys.executable, "-m", "rnnbench.cli", "run", str(path), "--home", str(tmp / m),
                         "--storage", url, "--tracking-uri", server.url],
                        env={**env, "RNNBENCH_MACHINE_ID": m},
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    for m in ("m1", "m2", "m3")
                ]  # fmt: skip
                codes = sorted(p.wait() for p in procs)
                wall = time.monotonic() - started
                name = "3 machines (PostgreSQL + mlflow server): one SIGKILLed mid-trial, one after its ledger write"
                return row(name, " ".join(str(c) for c in codes), url, server.url, tmp, wall)
        finally:
            server.stop()
    finally:
        pg.stop()


if __name__ == "__main__":
    main()
