"""The ledger's lock and leases on a real PostgreSQL (a throwaway cluster on 127.0.0.1): a lock
whose session is terminated is fenced, a stopped holder loses its lock to the server instead of
blocking every machine, and a worker killed between its claim and its first heartbeat has its
trial recovered (faults 3 and 4 of the run engine)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy

from tests.helpers import run_cli
from tests.services import Postgres, postgres_bin


@pytest.fixture(scope="module")
def database():
    if postgres_bin() is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    pg = Postgres().start()
    try:
        yield pg
    finally:
        pg.stop()


def _backend_pid(lock, key: str) -> int:
    conn, _ = lock._held[key]
    return conn.execute(sqlalchemy.text("SELECT pg_backend_pid()")).scalar()


@pytest.mark.slow  # a PostgreSQL cluster started for it: the default suite stays under 10 minutes
def test_a_terminated_lock_session_is_fenced_and_unlocking_it_harms_nobody(database, tmp_path: Path):
    from rnnbench.scheduler import LedgerLock, LockLost

    url = database.create_database("fence")
    a, b = LedgerLock(url, tmp_path), LedgerLock(url, tmp_path)
    admin = sqlalchemy.create_engine(url)
    with a("study"):
        a.fence("study")  # held: no error
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_terminate_backend(:p)"), {"p": _backend_pid(a, "study")})
        with b("study"):  # the server released A's lock with its session: B gets in
            b.fence("study")
            with pytest.raises(LockLost):
                a.fence("study")  # A must not write what B may be writing
    # A's unlock on its dead session raised nothing: the block above exited cleanly


@pytest.mark.slow  # a PostgreSQL cluster started for it: the default suite stays under 10 minutes
def test_a_stopped_holder_loses_its_lock_instead_of_blocking_everyone(database, tmp_path: Path):
    from rnnbench.scheduler import LedgerLock

    url = database.create_database("stopped")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import os, signal, sys\n"
         "from pathlib import Path\n"
         "from rnnbench.scheduler import LedgerLock\n"
         f"with LedgerLock({url!r}, Path({str(tmp_path)!r}))('study'):\n"
         "    print('held', flush=True)\n"
         "    os.kill(os.getpid(), signal.SIGSTOP)\n"],
        env={**os.environ, "RNNBENCH_LEASE_SECONDS": "2"}, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with LedgerLock(url, tmp_path)("study"):
            waited = time.monotonic() - started
        assert waited < 30, waited  # the server ended the stopped holder's idle session
    finally:
        holder.kill()
        holder.wait()
    print(f"\na SIGSTOPped holder's lock came free after {waited:.1f} s (lease 2 s)")


@pytest.mark.slow  # a PostgreSQL cluster started for it: the default suite stays under 10 minutes
def test_a_waiter_queues_in_the_server_and_gives_up_after_five_leases(database, tmp_path: Path, monkeypatch):
    from rnnbench.errors import LedgerUnreachable
    from rnnbench.scheduler import LedgerLock

    url = database.create_database("queue")
    monkeypatch.setenv("RNNBENCH_LEASE_SECONDS", "1")
    waiter = LedgerLock(url, tmp_path)
    key = int.from_bytes(hashlib.sha256(b"study").digest()[:8], "big", signed=True)
    # a holder whose session the server keeps (no idle timeout), e.g. a long critical section
    with sqlalchemy.create_engine(url).connect() as holder:
        holder.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        started = time.monotonic()
        with pytest.raises(LedgerUnreachable, match="held by another worker for over 5 leases"):
            with waiter("study"):
                pass
        waited = time.monotonic() - started
        assert 4.9 < waited < 15, waited  # 5 leases of 1 s, waited out in the server's lock queue
        holder.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    with waiter("study"):  # the lock came free with its holder; the waiter's session is usable
        waiter.fence("study")


@pytest.mark.slow  # a PostgreSQL cluster started for it: the default suite stays under 10 minutes
def test_a_try_lock_is_told_at_once_and_queues_nowhere(database, tmp_path: Path):
    from rnnbench.scheduler import LedgerLock

    url = database.create_database("trylock")
    a, b = LedgerLock(url, tmp_path), LedgerLock(url, tmp_path)
    admin = sqlalchemy.create_engine(url)
    with a("study") as held:
        assert held is True
        started = time.monotonic()
        with b("study", wait=False) as got:
            assert got is False
        assert time.monotonic() - started < 2
        with admin.connect() as conn:  # B left no request in the server's lock queue
            waiting = conn.execute(
                sqlalchemy.text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
            ).scalar()
        assert waiting == 0
        a.fence("study")  # A still holds it
    with b("study", wait=False) as got:
        assert got is True
        b.fence("study")


TINY = """\
name: hb
cells: [gru]
tasks:
  - name: memory
    options: {problem: adding, seq_len: 8, train_size: 256, valid_size: 64, test_size: 64}
search:
  lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
fixed: {hidden_size: 8}
budget: {trials: 3, epochs: 1}
final: {seeds: 1}
pruner: {name: none}
"""


@pytest.mark.slow  # two whole runs on PostgreSQL, one waiting out a lease
def test_a_worker_killed_between_claim_and_first_heartbeat_is_recovered(database, tmp_path: Path):
    from rnnbench.sweep import open_storage
    from tests.ledger_checks import ledger_view

    url = database.create_database("heartbeat")
    path, home = tmp_path / "hb.yaml", tmp_path / "home"
    path.write_text(TINY)
    env = {"RNNBENCH_LEASE_SECONDS": "4"}
    killed = run_cli(["run", str(path), "--storage", url], home,
                     RNNBENCH_FAULT=f"before_first_heartbeat:{tmp_path / 'once'}", **env)  # fmt: skip
    assert killed.returncode == -9, killed.stdout + killed.stderr
    started = time.monotonic()
    resumed = run_cli(["run", str(path), "--storage", url], home, **env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    ledger = ledger_view(open_storage(url, home), "hb")
    counts = Counter((stage, status) for (_, stage, _), (status, _) in ledger.items())
    assert counts == Counter({("search", "complete"): 3, ("search", "lost"): 1, ("final", "complete"): 1})
    print(f"\nkilled before its first heartbeat: recovered, resume took {time.monotonic() - started:.0f} s")


@pytest.mark.slow  # a PostgreSQL cluster started for it: the default suite stays under 10 minutes
def test_a_study_whose_every_trial_is_taken_is_skipped_until_one_frees(database, tmp_path: Path, monkeypatch):
    """A waiting worker skips, unread, a study whose trials are all running under live leases and
    drops one that is finished; a failed or overdue trial, room in the budget or a seed to queue
    makes it worth a read again."""
    import optuna

    from rnnbench.experiment import parse
    from rnnbench.ledger import create_study
    from rnnbench.plan import prepare
    from rnnbench.scheduler import LedgerLock, claimed, owner_identity
    from rnnbench.sweep import open_storage
    from rnnbench.waiting import LedgerWatch

    monkeypatch.setenv("RNNBENCH_LEASE_SECONDS", "2")

    def ledger(db: str):
        url = database.create_database(db)
        plan = prepare(parse(TINY.replace("trials: 3", "trials: 2")), home=tmp_path / db, storage_url=url)
        storage, lock = open_storage(url, tmp_path / db), LedgerLock(url, tmp_path / db)
        (study,) = plan.studies
        with lock(study.name):
            create_study(plan, storage, study)
        watch = LedgerWatch(storage, None)

        def look(seeds: int = 1) -> tuple[bool, str | None]:  # (changed since the last look, verdict)
            return study.name in watch.changed(), watch.settled(study.name, budget=2, seeds=seeds)

        def claim(owner: int, stage: str = "search"):  # (the open claim, its trial)
            manager = claimed(storage, lock, study, stage, owner_identity(owner))
            trial = manager.__enter__().trial
            assert trial is not None
            return manager, trial

        return storage, study, look, claim

    storage, study, look, claim = ledger("busy")
    assert look()[1] is None  # a new study (no trials, so no version yet): room for both
    first, _ = claim(0)
    assert look() == (True, None)  # room for one more
    second, _ = claim(1)
    assert look() == (True, "busy")  # both running, leases renewed: nothing to claim
    assert look() == (False, "busy")
    error = RuntimeError("lost")  # a failure without a record: a retry is due
    assert second.__exit__(RuntimeError, error, None) is False  # not swallowed
    assert look() == (True, None)
    assert look() == (False, None)
    first.__exit__(None, None, None)  # its lease stops with the block; the trial stays running
    deadline = time.monotonic() + 30
    while not look()[0]:  # its heartbeat goes overdue: the study's version changes, it is looked at
        assert time.monotonic() < deadline, "an unrenewed lease never changed the study's version"
        time.sleep(0.5)

    storage, study, look, claim = ledger("done")

    def finish(manager, trial) -> None:
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.COMPLETE, [0.1])
        manager.__exit__(None, None, None)

    for owner in (0, 1):
        finish(*claim(owner))
    assert look() == (True, None)  # the search is finished and no seed is queued yet
    seed = claim(2, "final")  # queues the one seed and takes it
    assert look() == (True, "busy")
    finish(*seed)
    assert look() == (True, "done")
    assert look(seeds=2) == (False, None)  # a second seed would be queued

    # a trial that finished before another by its own clock but committed after it leaves the last
    # finish where it was: its study's version still changes (a worker once waited on it forever)
    storage, study, look, claim = ledger("order")
    early, late = claim(0), claim(1)
    look()
    finish(*late)
    assert look()[0]
    finish(*early)
    with storage.engine.begin() as conn:
        conn.execute(
            sqlalchemy.text(
                "UPDATE trials SET datetime_complete = datetime_complete - interval '1 hour' WHERE trial_id = :t"
            ),
            {"t": early[1]._trial_id},
        )
    assert look()[0], "a finish committed after a later one changed nothing a waiting worker sees"


@pytest.mark.slow  # a PostgreSQL cluster started for it: the default suite stays under 10 minutes
def test_the_trial_cache_sees_every_change_another_worker_makes(database, tmp_path: Path):
    """One trial cache per storage (rnnbench.sweep.with_trial_cache) serves every load of a worker;
    what another worker writes after this one cached its trials (a trial taken, finished with a
    record, a new one queued) shows in the next load."""
    import optuna

    from rnnbench.ledger import StudyLedger
    from rnnbench.sweep import RECORD, load_study, open_storage, with_trial_cache

    url = database.create_database("cache")
    mine, theirs = open_storage(url, tmp_path), open_storage(url, tmp_path)  # two workers
    assert with_trial_cache(mine) is with_trial_cache(mine)
    assert with_trial_cache(mine) is not with_trial_cache(theirs)
    optuna.create_study(study_name="cached", storage=url)
    study = load_study(theirs, "cached")
    study.enqueue_trial({}, user_attrs={"seed": 1})
    assert [t.state for t in StudyLedger.load(mine, "cached").search_trials] == [
        optuna.trial.TrialState.WAITING
    ]

    taken = study.ask()  # theirs takes it: running
    assert [t.state for t in StudyLedger.load(mine, "cached").search_trials] == [
        optuna.trial.TrialState.RUNNING
    ]
    taken.set_user_attr(RECORD, {"seed": 1})
    study.tell(taken, 0.5)
    study.enqueue_trial({}, user_attrs={"seed": 2})
    trials = StudyLedger.load(mine, "cached").search_trials
    assert [(t.state, t.value, t.user_attrs.get(RECORD)) for t in trials] == [
        (optuna.trial.TrialState.COMPLETE, 0.5, {"seed": 1}),
        (optuna.trial.TrialState.WAITING, None, None),
    ]
