"""The ledger's rules in isolation: torn journals, idempotent recovery, leases, idempotent
projection, and stores refused before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from rnnbench.scheduler import LEASE_ATTR, Lease, owner_identity, recover
from rnnbench.sweep import RETRY_OF, open_storage, repair_journal, trial_status
from tests.helpers import run_cli


def _study(tmp_path: Path, name: str = "e/task/gru-1L-uni"):
    storage = open_storage(None, tmp_path)
    return storage, optuna.create_study(study_name=name, storage=storage, load_if_exists=True)


def test_torn_last_journal_record_is_cut_before_appending(tmp_path: Path, capsys):
    storage, s = _study(tmp_path)
    s.tell(s.ask(), 1.0)
    journal = tmp_path / "optuna.journal"
    whole = journal.read_bytes()
    journal.write_bytes(whole + b'{"op_code": 5, "worker_id": "x", "trial_id"')  # a crash mid-write
    message = repair_journal(journal)
    assert "half-written" in message and journal.read_bytes() == whole
    # appending after the repair keeps the file readable (it used to glue onto the torn line)
    storage, s = _study(tmp_path)
    s.tell(s.ask(), 2.0)
    assert [t.value for t in _study(tmp_path)[1].get_trials()] == [1.0, 2.0]
    assert repair_journal(journal) is None  # an intact file is left alone


def test_garbled_tail_is_cut_and_damage_inside_is_refused(tmp_path: Path):
    _, s = _study(tmp_path)
    s.tell(s.ask(), 1.0)
    journal = tmp_path / "optuna.journal"
    whole = journal.read_bytes()
    journal.write_bytes(whole + b"\x00\x00\x00\n")  # NULs a crash can leave behind
    repair_journal(journal)
    assert journal.read_bytes() == whole
    lines = whole.splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:1] + [b"{broken\n"] + lines[1:]))
    from rnnbench.sweep import StoreError

    with pytest.raises(StoreError, match="damaged"):
        storage = open_storage(None, tmp_path)
        optuna.load_study(study_name="e/task/gru-1L-uni", storage=storage).get_trials()


def test_a_record_over_a_megabyte_survives_repair(tmp_path: Path):
    """Issue 24, fault 6: a record bigger than the old 1 MiB repair window (4,000 validations of
    15 metrics) made every later start fail with "journal is damaged"; and a torn tail after one
    must still be cut back to it."""
    _, s = _study(tmp_path)
    trial = s.ask()
    history = [{f"metric_{k}": 0.123456789 * i for k in range(15)} | {"epoch": i} for i in range(4000)]
    trial.set_user_attr("record", {"status": "complete", "history": history})
    s.tell(trial, 1.0)
    journal = tmp_path / "optuna.journal"
    whole = journal.read_bytes()
    assert max(map(len, whole.splitlines())) > 1.5e6
    assert repair_journal(journal) is None and journal.read_bytes() == whole
    journal.write_bytes(whole + b'{"op_code": 5, "worker_id": "x", "trial_id"')
    assert "half-written" in repair_journal(journal) and journal.read_bytes() == whole
    lines = whole.splitlines(keepends=True)
    journal.write_bytes(whole[:-20])  # the tell after it torn: cut back to the big record, whole
    repair_journal(journal)
    assert journal.read_bytes() == b"".join(lines[:-1])
    [t] = _study(tmp_path)[1].get_trials()
    assert t.state == TrialState.RUNNING and len(t.user_attrs["record"]["history"]) == 4000
    big = tmp_path / "garbage" / "optuna.journal"
    big.parent.mkdir()
    big.write_bytes(b"\x00" * (2 << 20))  # no record at all: not a journal torn at its end
    with pytest.raises(ValueError, match="no complete record"):
        repair_journal(big)


def test_a_wall_clock_step_expires_no_journal_lease(tmp_path: Path, monkeypatch):
    """Issue 24, fault 2: leases were judged by the wall clock, so an NTP step, a suspend or a VM
    pause over a lease failed every live trial on the machine at once. On the same boot the
    monotonic clock judges; a lease written on another boot (or machine) keeps the wall clock."""
    storage, s = _study(tmp_path)
    trial = s.ask()
    lease = Lease(storage, trial._trial_id, owner_identity())
    lease.renew()  # no thread: the test moves the clocks itself
    wall, mono = time.time, time.monotonic
    monkeypatch.setattr(time, "time", lambda: wall() + 3600)  # the wall clock jumps an hour
    assert recover(storage, s) == 0 and s.get_trials()[0].state == TrialState.RUNNING
    monkeypatch.setattr(time, "monotonic", lambda: mono() + 3600)  # the lease really runs out
    monkeypatch.setattr("rnnbench.scheduler.owner_is_dead", lambda owner: False)
    recover(storage, s)
    assert s.get_trials()[0].state == TrialState.FAIL
    # a lease from another boot: only its wall-clock expiry can be compared
    other = s.ask()
    storage.set_trial_system_attr(
        other._trial_id,
        LEASE_ATTR,
        {"owner": {"machine": "elsewhere"}, "expires": wall() + 60, "boot": "another", "expires_mono": 0},
    )
    monkeypatch.setattr(time, "time", wall)
    recover(storage, s)
    assert s.get_trials()[other.number].state == TrialState.RUNNING
    monkeypatch.setattr(time, "time", lambda: wall() + 120)
    recover(storage, s)
    assert s.get_trials()[other.number].state == TrialState.FAIL


def test_the_retry_decision_is_written_when_made(tmp_path: Path):
    """Issue 24, fault 5: the retry limit was judged at read time with the current --max-retries,
    so lowering it on a resume counted a lost trial (whose copy had run) a second time, and raising
    it reopened finished searches. Recovery now writes its decision into the trial."""
    storage, s = _study(tmp_path)
    lost = _expired_trial(storage, s)
    assert recover(storage, s, max_retries=3) == 1
    for limit in (0, 1, 3, 10):  # whatever limit a later start reads with, it stays a retried loss
        assert trial_status(s.get_trials()[lost.number], limit) == "lost"
    copy = s.ask()  # the queued copy, lost in its turn with its retries spent (limit 1)
    assert copy.user_attrs[RETRY_OF] == lost.number and copy.user_attrs["retries"] == 1
    storage.set_trial_system_attr(
        copy._trial_id, LEASE_ATTR, {"owner": {"machine": "elsewhere"}, "expires": 0}
    )
    assert recover(storage, s, max_retries=1) == 0  # no copy: counted as failed, worker_lost
    for limit in (0, 1, 3, 10):
        assert trial_status(s.get_trials()[copy.number], limit) == "failed"


def _expired_trial(storage, s, params=None):
    trial = s.ask()
    trial.suggest_float("lr", 1e-3, 1e-1)
    storage.set_trial_system_attr(
        trial._trial_id, LEASE_ATTR, {"owner": {"machine": "elsewhere", "pid": 1, "start": 0}, "expires": 0}
    )
    return trial


def test_recovery_is_idempotent_whatever_is_killed_when(tmp_path: Path):
    storage, s = _study(tmp_path)
    lost = _expired_trial(storage, s)
    # a recovery killed after queueing the copy, before failing the trial:
    s.enqueue_trial(lost.params, user_attrs={RETRY_OF: lost.number, "retries": 1})
    assert recover(storage, s) == 0  # fails it, does not queue it again
    assert recover(storage, s) == 0
    trials = s.get_trials()
    assert [trial_status(t) for t in trials] == ["lost", "waiting"]
    # a recovery killed after failing, before queueing: the next one queues exactly one copy
    other = _expired_trial(storage, s)
    storage.set_trial_state_values(other._trial_id, TrialState.FAIL)
    assert recover(storage, s) == 1 and recover(storage, s) == 0
    copies = [t for t in s.get_trials() if t.user_attrs.get(RETRY_OF) == other.number]
    assert len(copies) == 1 and copies[0].system_attrs["fixed_params"] == other.params


def test_a_live_lease_is_never_recovered(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("RNNBENCH_LEASE_SECONDS", "2")
    storage, s = _study(tmp_path)
    trial = s.ask()
    lease = Lease(storage, trial._trial_id, owner_identity()).start()
    try:
        time.sleep(3)  # longer than the lease: only its renewals keep it
        assert recover(storage, s) == 0
        assert s.get_trials()[0].state == TrialState.RUNNING
    finally:
        lease.stop()
    time.sleep(2.5)  # renewals stopped, but the owner (this process) is alive: expiry decides
    recover(storage, s)
    assert trial_status(s.get_trials()[0]) == "lost"


def test_retries_are_bounded(tmp_path: Path):
    storage, s = _study(tmp_path)
    first = _expired_trial(storage, s)
    assert recover(storage, s, max_retries=1) == 1  # lost once: one copy queued
    copy = _expired_trial(storage, s)  # the copy is claimed (queued trials go first) and lost too
    assert copy.params == first.params
    assert recover(storage, s, max_retries=1) == 0  # no third run of it: it counts as failed
    assert [trial_status(t, 1) for t in s.get_trials()] == ["lost", "failed"]


def test_projection_twice_writes_the_same_run(tmp_path: Path):
    """The same ledger record projected twice: one run, one point per epoch."""
    from mlflow.tracking import MlflowClient

    from rnnbench.ledger import StudyLedger
    from rnnbench.projection import Projection
    from rnnbench.scheduler import LedgerLock
    from rnnbench.sweep import RECORD
    from rnnbench.tracking import Tracker, create_sqlite_store

    storage, s = _study(tmp_path)
    s.set_user_attr("tags", {"study": s.study_name, "cell": "gru", "metric": "mse", "direction": "minimize"})
    s.set_user_attr("trials", 1)
    trial = s.ask()
    trial.suggest_float("lr", 1e-3, 1e-1)
    history = [{"epoch": e, "time_ms": 1000 * e, "metrics": {"valid_mse": 1.0 / e}} for e in (1, 2)]
    trial.set_user_attr(RECORD, {"status": "complete", "history": history, "best_valid": {"mse": 0.5}})
    s.tell(trial, 0.5)
    uri = create_sqlite_store(tmp_path)
    projection = Projection(Tracker(uri, "e"), storage, LedgerLock(None, tmp_path))
    led = StudyLedger.load(storage, s.study_name)
    first = projection.project_trial(led, "search", led.search_trials[0])
    second = projection.project_trial(StudyLedger.load(storage, s.study_name), "search", led.search_trials[0])
    assert first == second
    client = MlflowClient(uri)
    assert [m.value for m in client.get_metric_history(first, "valid_mse")] == [1.0, 0.5]
    assert projection.sync("e")["projected"] == 0  # nothing stale left


def _run_cli(args: list[str], home: Path):
    return run_cli(
        ["run", "experiments/smoke.yaml", *args], home, cwd=Path(__file__).resolve().parents[1],
        timeout=120, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
    )  # fmt: skip


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--storage", "sqlite:///x.db"], "SQLite is not safe"),
        (["--storage", "redis://127.0.0.1:1/0"], "unknown storage scheme"),
        (["--storage", "postgresql://nobody:pw@127.0.0.1:1/optuna"], "not reachable"),
        (["--tracking-uri", "http://127.0.0.1:1"], "not reachable"),
        (["--tracking-uri", "ftp://example/x"], "unknown tracking URI scheme"),
    ],
)
def test_unusable_stores_are_one_line_and_write_nothing(tmp_path: Path, args, expected):
    home = tmp_path / "home"
    result = _run_cli(args, home)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and lines[0].startswith("error:"), result.stderr
    assert not home.exists()


def test_wrong_postgres_credentials_are_one_line(tmp_path: Path):
    from tests.services import Postgres, postgres_bin

    if postgres_bin() is None:
        pytest.skip("PostgreSQL server binaries are not installed")
    pg = Postgres().start()
    try:
        url = pg.create_database("optuna").replace("postgres@", "nobody@")
        result = _run_cli(["--storage", url], tmp_path / "home")
        assert result.returncode == 2 and "not reachable" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "home").exists()
    finally:
        pg.stop()


def test_record_is_plain_json(tmp_path: Path):
    from rnnbench.ledger import json_safe as _json_safe

    record = _json_safe({"a": float("nan"), "b": [1, 2.5, float("inf")], "c": {"d": True}})
    assert json.loads(json.dumps(record)) == {"a": None, "b": [1, 2.5, None], "c": {"d": True}}


def test_a_torn_record_from_a_killed_worker_never_poisons_the_next_append(tmp_path: Path):
    """Mid-run (no restart, no repair pass): the next writer's lock cuts the torn tail first."""
    storage, s = _study(tmp_path)
    s.tell(s.ask(), 1.0)
    with open(tmp_path / "optuna.journal", "ab") as f:
        f.write(b'{"op_code": 6, "worker_id": "dead", "tri')  # a worker SIGKILLed mid-append
    s.tell(s.ask(), 2.0)  # the same live process writes on
    fresh = optuna.load_study(study_name=s.study_name, storage=open_storage(None, tmp_path))
    assert [t.value for t in fresh.get_trials()] == [1.0, 2.0]


def test_a_writer_killed_holding_the_journal_lock_blocks_nobody(tmp_path: Path):
    from rnnbench.sweep import JournalLock

    journal = tmp_path / "optuna.journal"
    journal.write_bytes(b"")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from rnnbench.sweep import JournalLock; "
            f"JournalLock(Path({str(journal)!r})).acquire(); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    started = time.monotonic()
    lock = JournalLock(journal)
    lock.acquire()
    lock.release()
    assert time.monotonic() - started < 2  # Optuna's symlink lock would wait out its 30 s grace


def test_read_only_home_and_full_disk_are_one_line(tmp_path: Path):
    """A home that cannot be created (/sys refuses even root), and a disk that fills up mid-run
    (a file-size limit just above the stores' sizes): one line saying what to do, no traceback,
    and the finished trials still there to resume from."""

    read_only = _run_cli(["--home", "/sys/rnnbench-home"], tmp_path / "unused")
    assert read_only.returncode == 2 and "not writable" in read_only.stderr, read_only.stderr
    assert len(read_only.stderr.strip().splitlines()) == 1

    home = tmp_path / "home"
    path = tmp_path / "disk.yaml"
    path.write_text(DISK_EXPERIMENT.format(seeds=1))
    env = {**os.environ, "RNNBENCH_HOME": str(home), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "rnnbench.cli", "run", str(path)]
    assert subprocess.run(command, env=env, capture_output=True, timeout=300).returncode == 0
    # the journal fills first (mlflow.db, bigger already, fails whenever it grows: MLflow is best effort)
    limit = (home / "optuna.journal").stat().st_size + 4096
    path.write_text(DISK_EXPERIMENT.format(seeds=8))  # more seeds: more records than fit
    full = _run_with_file_size_limit(command, env, limit)
    assert full.returncode == 1, full.stderr
    lines = full.stderr.strip().splitlines()
    assert len(lines) == 1 and "run the same command again" in lines[0] and "Traceback" not in full.stderr
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    (row,) = [line for line in again.stdout.splitlines() if line.strip().startswith("gru-1L-uni ")]
    assert row.split()[-1] == "8†"  # its n column: all 8 final seeds, at the step cap (no patience)


def _run_with_file_size_limit(command: list[str], env: dict, limit: int) -> subprocess.CompletedProcess:
    """Run with no file allowed past ``limit`` bytes: a disk that fills up, for one process only."""
    import resource

    return subprocess.run(
        command,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )


DISK_EXPERIMENT = """\
name: disk
cells: [gru]
tasks:
  - name: memory
    options: {{problem: adding, seq_len: 6, train_size: 128, valid_size: 32, test_size: 32}}
fixed: {{hidden_size: 4}}
budget: {{trials: 0, epochs: 1}}
final: {{seeds: {seeds}}}
"""


def test_mlflow_store_creation_failing_leaves_nothing_behind(tmp_path: Path):
    """The disk fills while MLflow builds its schema: no half-migrated mlflow.db stays behind to
    fail every later run; the next run (with space) simply creates it."""

    home = tmp_path / "home"
    path = tmp_path / "disk.yaml"
    path.write_text(DISK_EXPERIMENT.format(seeds=1))
    env = {**os.environ, "RNNBENCH_HOME": str(home), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "rnnbench.cli", "run", str(path)]
    limit = 64 * 1024  # MLflow's schema alone is larger
    full = _run_with_file_size_limit(command, env, limit)
    assert full.returncode != 0 and len(full.stderr.strip().splitlines()) == 1, full.stderr
    assert "cannot create the MLflow store" in full.stderr
    assert not (home / "mlflow.db").exists() and not list(home.glob(".mlflow.db.*"))
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
