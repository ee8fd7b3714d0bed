"""Fault table: where a kill lands → trials per state in the ledger, MLflow and the report.

Runs a small synthetic experiment (2 architectures × 3 search trials + 2 final seeds) under each
fault, resumes where a user would, then compares the three views trial by trial. Needs the
PostgreSQL server binaries for the many-machines row (skipped without them).

    python benchmarks/faults.py            # prints a Markdown table (a few minutes on 2 cores)
    python benchmarks/faults.py --only Ctrl-C
"""

from __future__ import annotations

import argparse
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

from tests.helpers import stopped_child  # noqa: E402
from tests.ledger_checks import ledger_view, mlflow_view, report_view, wait_for_lost_trial  # noqa: E402
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
        # a background job inherits SIGINT ignored (and Python then keeps ignoring it): as typed
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
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
    from rnnbench.ledger import StudyLedger
    from rnnbench.sweep import RETRY_OF, open_storage, study_names

    storage = open_storage(storage_url, home)
    n = 0
    for name in study_names(storage, "faults"):
        led = StudyLedger.load(storage, name)
        n += sum(RETRY_OF in t.user_attrs for t in led.search_trials + led.final_trials)
    return n


def scenario(name: str, steps, tmp: Path, storage_url=None, tracking_uri=None, experiment=EXPERIMENT) -> dict:
    from rnnbench.tracking import tracking_uri_for

    home = tmp / "home"
    path = tmp / "faults.yaml"
    path.write_text(experiment)
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


def _two_workers_training(args, env) -> subprocess.Popen:
    """`rnnbench run ARGS --workers 2`, returned once its first search trial has started."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "rnnbench.cli", *args, "--workers", "2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    for line in proc.stdout:
        if "search trial" in line:
            break
    return proc


def stall_a_worker(args, env, tmp, home):
    """--workers 2; one worker stops itself mid-trial (SIGSTOP, its lease renewals with it) and is
    continued (SIGCONT) once the other worker has found its lease expired."""
    env = {**env, "RNNBENCH_FAULT": f"mid_trial_sigstop:{tmp / 'once'}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rnnbench.cli", *args, "--workers", "2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    stalled = stopped_child(proc.pid, timeout=300)
    wait_for_lost_trial(None, home, "faults", timeout=600)
    os.kill(stalled, signal.SIGCONT)
    proc.stdout.read()
    return proc.wait()


CLOCK_SHIFT = """# sitecustomize for the clock-step row: time.time() of every process (workers included) runs
# ahead by the seconds written in $RNNBENCH_CLOCK_FILE, as after an NTP step or a VM pause
import os, time
_real = time.time
def _shifted():
    try:
        with open(os.environ["RNNBENCH_CLOCK_FILE"]) as f:
            return _real() + float(f.read() or 0)
    except OSError:
        return _real()
time.time = _shifted
"""


def step_the_clock(args, env, tmp, home):
    """Every process's wall clock jumps 10 leases ahead mid-run (the journal's leases judge by
    the monotonic clock on one boot, so nothing may expire)."""
    site, clock = tmp / "clock", tmp / "clock-offset"
    site.mkdir()
    (site / "sitecustomize.py").write_text(CLOCK_SHIFT)
    env = {**env, "PYTHONPATH": f"{site}:{env.get('PYTHONPATH', '')}", "RNNBENCH_CLOCK_FILE": str(clock)}
    proc = _two_workers_training(args, env)
    clock.write_text(str(10 * float(env["RNNBENCH_LEASE_SECONDS"])))
    proc.stdout.read()
    return proc.wait()


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", help="only the rows whose fault contains this text (PostgreSQL rows: 'PostgreSQL')"
    )
    only = parser.parse_args().only
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
        (
            "--workers 2: one worker SIGSTOPped mid-trial until its lease is recovered, then SIGCONT",
            [stall_a_worker],
        ),
        ("--workers 2: every wall clock steps 10 leases ahead mid-run", [step_the_clock]),
        (
            "SIGKILL mid-trial, then run again with --max-retries 0",
            [lambda *a: run(*a, fault=["mid_trial"]), lambda *a: run(*a, extra=["--max-retries", "0"])],
        ),
        (
            "SIGTERM after training, before the ledger write, then run again",
            [lambda *a: run(*a, fault=["record_sigterm"]), run],
        ),  # fmt: skip
        ("out of memory on a final seed", [lambda *a: run(*a, fault=["final_oom"])]),
    ]
    for name, steps in cases:
        if only and only not in name:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(scenario(name, steps, Path(tmp)))
            print(rows[-1], file=sys.stderr, flush=True)
    for name, experiment in (
        ("4,000 validations × 15 metrics in one record (~1.5 MB of history)", LONG_HISTORY),
        ("a searched embedding over the parameter budget", OVER_BUDGET),
    ):
        if only and only not in name:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(scenario(name, [run], Path(tmp), experiment=experiment))
            print(rows[-1], file=sys.stderr, flush=True)
    if postgres_bin() is not None and (not only or "PostgreSQL" in only):
        rows.append(many_machines())
        rows += postgres_rows()
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")


# one architecture whose trials validate every step: a record of 4,000 validations
LONG_HISTORY = """\
name: faults
cells: [gru]
tasks:
  - name: memory
    options: {problem: adding, seq_len: 4, train_size: 256, valid_size: 8, test_size: 8}
search:
  lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
fixed: {hidden_size: 4, batch_size: 8}
budget: {trials: 1, max_steps: 4000, eval_every: 1}
final: {seeds: 1}
pruner: {name: none}
"""

# sampled embeddings from 8 to 4,096 wide under a 20,000-parameter budget: the wide ones cannot fit
OVER_BUDGET = """\
name: faults
cells: [gru]
tasks:
  - {name: sentiment, dataset: synthetic, parameter_budget: 20000}
search:
  embedding_dim: {type: int, low: 8, high: 4096, log: true}
budget: {trials: 4, epochs: 1, steps_per_epoch: 5}
final: {seeds: 1}
pruner: {name: none}
"""


def postgres_rows() -> list[dict]:
    """On PostgreSQL: a worker killed between its claim and its first heartbeat; every lock
    session terminated by the server over and over during a --workers 3 run."""
    import threading

    import sqlalchemy

    pg = Postgres().start()
    rows = []
    try:
        url = pg.create_database("heartbeat")
        with tempfile.TemporaryDirectory() as tmp:
            steps = [lambda a, e, t, h: run(a + ["--storage", url], e, t, h, fault=["before_first_heartbeat"]),
                     lambda a, e, t, h: run(a + ["--storage", url], e, t, h)]  # fmt: skip
            name = "PostgreSQL: SIGKILL between the claim and the first heartbeat, then run again"
            rows.append(scenario_on(name, steps, Path(tmp), url))
        url = pg.create_database("terminated")
        stop = threading.Event()

        def terminate_lock_sessions() -> None:
            engine = sqlalchemy.create_engine(url)
            while not stop.wait(0.2):
                with engine.connect() as conn:
                    conn.execute(sqlalchemy.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                    ))  # fmt: skip
                    conn.commit()

        killer = threading.Thread(target=terminate_lock_sessions, daemon=True)
        with tempfile.TemporaryDirectory() as tmp:
            killer.start()
            steps = [lambda a, e, t, h: run(a + ["--storage", url], e, t, h, extra=["--workers", "3"])]
            name = "PostgreSQL, --workers 3: every held ledger lock's session terminated every 0.2 s"
            try:
                rows.append(scenario_on(name, steps, Path(tmp), url))
            finally:
                stop.set()
    finally:
        pg.stop()
    for r in rows:
        print(r, file=sys.stderr, flush=True)
    return rows


def scenario_on(name: str, steps, tmp: Path, url: str) -> dict:
    """:func:`scenario` with a PostgreSQL ledger and the run home's MLflow store."""
    from rnnbench.tracking import tracking_uri_for

    home = tmp / "home"
    path = tmp / "faults.yaml"
    path.write_text(EXPERIMENT)
    base = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "RNNBENCH_LEASE_SECONDS": "4"}
    args = ["run", str(path), "--home", str(home)]
    started = time.monotonic()
    codes = [step(args, base, tmp, home) for step in steps]
    return row(
        name, " → ".join(str(c) for c in codes), url, tracking_uri_for(home), home, time.monotonic() - started
    )


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
