"""Claims, leases and recovery: who runs which trial, and what happens when a worker dies.

- **Lock.** Every claim, every requeue and every creation of a shared record (study, MLflow
  parent run) happens under one lock per study in the ledger: a file lock beside the journal on
  one machine, a PostgreSQL advisory lock across machines (released by the server if the holder
  dies). So N workers on M machines run exactly the budget and never queue a configuration twice.
- **Lease.** A worker holds a lease on the trial it runs and renews it from a thread. On
  PostgreSQL that is Optuna's own heartbeat (``record_heartbeat``, in the database's clock), judged
  by ``fail_stale_trials``; the journal has no heartbeat, so the lease is a trial system attribute
  with an expiry in this machine's monotonic clock (judged by it on the same boot, so a wall-clock
  step, a suspend or a VM pause expires no lease) and in the wall clock (for any other judge). The owner (machine, pid, process start time) is written
  too, so a dead worker *on this machine* is recognised at once, without waiting for expiry.
- **Recovery** (under the lock, by any worker, at every claim and while waiting): fail the
  RUNNING trials whose lease expired or whose owner is dead, then queue a copy of every lost or
  interrupted trial that has none yet. Both steps are idempotent, so a kill anywhere in between
  leaves work the next recovery finishes, never a duplicate. A live worker's trial is never touched.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import optuna
import psutil
from filelock import FileLock, Timeout
from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled
from optuna.trial import FrozenTrial, TrialState

from rnnbench.errors import LedgerUnreachable, first_line
from rnnbench.experiment import Study
from rnnbench.faults import fault
from rnnbench.ledger import BUDGET_ATTR, StudyLedger, fail_quietly
from rnnbench.sweep import (
    DEFAULT_MAX_RETRIES,
    FINAL_SUFFIX,
    LOST_DECISION,
    RECORD,
    RETRIES,
    RETRY_OF,
    counted,
    database_location,
    is_journal,
    journal_path,
    lease_duration,
    load_study,
    make_pruner,
    make_sampler,
    needs_retry,
    normalize_rdb_url,
    trial_status,
)

# trial system attribute: {"owner": {...}, "expires": unix time, "boot": boot id, "expires_mono": ...}
LEASE_ATTR = "rnnbench:lease"


# ---------------------------------------------------------------------------- identity


def machine_id() -> str:
    """Names this machine in leases (override for containers that share a hostname)."""
    return os.environ.get("RNNBENCH_MACHINE_ID") or socket.gethostname()


@lru_cache(maxsize=1)
def _process_start() -> float:
    return psutil.Process().create_time()


@lru_cache(maxsize=1)
def boot_id() -> str | None:
    """This boot of this machine (Linux): within it, ``time.monotonic`` is one clock for every
    process, and no NTP step, suspend or VM pause moves it."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def owner_identity(worker: int = 0) -> dict[str, Any]:
    return {"machine": machine_id(), "pid": os.getpid(), "start": _process_start(), "worker": worker}


def owner_is_dead(owner: dict[str, Any] | None) -> bool:
    """True only when the owner is known dead: it ran on this machine and its process is gone."""
    if not owner or owner.get("machine") != machine_id():
        return False
    try:
        return abs(psutil.Process(int(owner["pid"])).create_time() - float(owner["start"])) > 1.0
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return True
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------- locks


class LedgerLock:
    """Mutual exclusion per key among every worker that shares the ledger.

    On PostgreSQL a session-level advisory lock, with three guards: a holder the server stops
    hearing from (SIGSTOP, a VM pause) loses its session after ``idle_session_timeout`` of a lease,
    and the lock with it, instead of blocking every machine; a waiter gives up after
    ``LOCK_WAIT_LEASES`` leases with one line; and the holder checks, before its critical section
    writes what makes a claim (:meth:`fence`), that its session still holds the lock.

    The block gets True while the lock is held; with ``wait=False`` it gets False at once, holding
    nothing, where another worker holds the lock (a waiting worker's recovery then skips the
    study: the holder's claim recovers first)."""

    LOCK_WAIT_LEASES = 5

    def __init__(self, storage_url: str | None, home: Path):
        self.url = storage_url
        self._held: dict[str, Any] = {}  # key -> the connection holding it (PostgreSQL)
        if is_journal(storage_url):
            path = journal_path(storage_url, home)
            self.folder = path.with_name(path.name + ".locks")
            self.engine = None
        else:
            import sqlalchemy  # local: +0.27 s on `import rnnbench.scheduler`; only PostgreSQL needs it

            self.folder = None
            self.engine = sqlalchemy.create_engine(
                normalize_rdb_url(storage_url), pool_size=1, max_overflow=1, pool_pre_ping=True
            )

    @contextmanager
    def __call__(self, key: str, wait: bool = True) -> Iterator[bool]:
        digest = hashlib.sha256(key.encode()).digest()
        if self.engine is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            file_lock = FileLock(str(self.folder / f"{digest.hex()[:16]}.lock"), timeout=-1 if wait else 0)
            try:
                file_lock.acquire()
            except Timeout:
                yield False
                return
            try:
                yield True
            finally:
                file_lock.release()
            return
        import sqlalchemy  # local: as in __init__

        lock_id = int.from_bytes(digest[:8], "big", signed=True)
        try:
            conn = self.engine.connect()
        except Exception as exc:  # it answered when the run started: it went away since
            raise LedgerUnreachable(
                f"the ledger database at {database_location(self.url)}", first_line(exc)
            ) from None
        lease = lease_duration()
        try:
            try:  # PostgreSQL 14+; older servers keep a stopped holder's lock until it dies
                conn.execute(sqlalchemy.text(f"SET idle_session_timeout = {int(lease * 1000)}"))
            except sqlalchemy.exc.ProgrammingError:
                conn.rollback()
            # Session-level advisory lock: the server releases it if this process dies. Waiting in
            # the server's queue (not polling) hands the lock over first come, first served, and a
            # waiter sends no statements while it waits.
            if not wait:
                got = conn.execute(
                    sqlalchemy.text("SELECT pg_try_advisory_lock(:k)"), {"k": lock_id}
                ).scalar()
                conn.commit()
                if not got:
                    yield False
                    return
            else:
                conn.execute(
                    sqlalchemy.text(f"SET lock_timeout = {int(self.LOCK_WAIT_LEASES * lease * 1000)}")
                )
                try:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": lock_id})
                except sqlalchemy.exc.OperationalError as exc:
                    if getattr(exc.orig, "sqlstate", None) != "55P03":  # lock_not_available
                        raise
                    raise LedgerUnreachable(
                        f"the ledger lock {key!r} at {database_location(self.url)}",
                        f"held by another worker for over {self.LOCK_WAIT_LEASES} leases",
                    ) from None
                conn.commit()
            self._held[key] = (conn, lock_id)
            try:
                yield True
            finally:
                self._held.pop(key, None)
                try:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": lock_id})
                    conn.commit()
                except Exception:  # the session is gone (terminated, timed out): so is its lock
                    pass
        finally:
            try:
                conn.close()
            except Exception:
                pass

    def fence(self, key: str) -> None:
        """Raise LockLost unless this process still holds ``key``'s lock (always, on a journal:
        the file lock is the kernel's). Call right before the write that a second holder would
        duplicate."""
        if self.engine is None or key not in self._held:
            return
        import sqlalchemy  # local: as in __init__

        conn, lock_id = self._held[key]
        try:
            held = conn.execute(
                sqlalchemy.text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                    "AND pid = pg_backend_pid() AND ((classid::bigint << 32) | objid::bigint) = :k"
                ),
                {"k": lock_id},
            ).scalar()
        except Exception:
            held = 0  # the session is gone: terminated by the server or an administrator
        if not held:
            raise LockLost(f"the ledger lock {key!r} was lost before its critical section ended")


class LockLost(RuntimeError):
    """This worker's ledger lock was taken from it (its session ended); what it was about to write
    would race another worker's."""


# ---------------------------------------------------------------------------- leases


class Lease:
    """Keeps one trial's claim alive from a daemon thread until stopped."""

    def __init__(self, storage, trial_id: int, owner: dict[str, Any]):
        self.storage, self.trial_id, self.owner = storage, trial_id, owner
        self.duration = lease_duration()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False  # set when the ledger no longer lets us renew (someone recovered it)

    def renew(self) -> None:
        if isinstance(self.storage, BaseHeartbeat) and is_heartbeat_enabled(self.storage):
            self.storage.record_heartbeat(self.trial_id)
        else:
            # the wall clock for other machines; the monotonic one where the judge shares this boot
            value = {
                "owner": self.owner,
                "expires": time.time() + self.duration,
                "boot": boot_id(),
                "expires_mono": time.monotonic() + self.duration,
            }
            self.storage.set_trial_system_attr(self.trial_id, LEASE_ATTR, value)

    def start(self) -> Lease:
        fault("before_first_heartbeat")
        self.renew()
        if isinstance(self.storage, BaseHeartbeat):  # the owner once; the heartbeat row renews
            # after the first heartbeat: a trial with an owner but no heartbeat row is one that
            # fail_stale_trials never sees (a worker killed between the two writes)
            self.storage.set_trial_system_attr(self.trial_id, LEASE_ATTR, {"owner": self.owner})
        self._thread = threading.Thread(target=self._loop, name=f"lease-{self.trial_id}", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.duration / 4):
            try:
                self.renew()
            except optuna.exceptions.UpdateFinishedTrialError:
                self.lost = True
                return
            except Exception:  # a transient database error: the next renewal tries again
                continue

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


_LEASELESS_SINCE: dict[int, float] = {}  # trial id -> when this process first saw it without a lease


def _lease_expired(storage, t: FrozenTrial, now: float, now_mono: float | None = None) -> bool:
    lease = t.system_attrs.get(LEASE_ATTR)
    if isinstance(storage, BaseHeartbeat):
        if lease is not None:
            return False  # judged by fail_stale_trials in the database's clock
    elif lease is not None and "expires" in lease:
        if now_mono is not None and lease.get("boot") and lease["boot"] == boot_id():
            return lease["expires_mono"] < now_mono  # a wall-clock step expires nothing
        return lease["expires"] < now
    # No lease at all: the worker died between its claim and its first renewal (or has not renewed
    # yet). Optuna's datetime_start is the claimer's naive local time: right on one machine (the
    # journal), wrong from another time zone, so across machines the judge times it from when it
    # first saw it lease-less, on its own monotonic clock.
    if isinstance(storage, BaseHeartbeat) or t.datetime_start is None:
        seen = _LEASELESS_SINCE.setdefault(t._trial_id, time.monotonic())
        return time.monotonic() - seen > lease_duration()
    return now - t.datetime_start.timestamp() > lease_duration()


# ---------------------------------------------------------------------------- recovery


def recover(storage, s: optuna.Study, max_retries: int = DEFAULT_MAX_RETRIES) -> int:
    """Fail trials whose worker is gone and queue one copy of each lost or interrupted trial.

    Call under the study's ledger lock. Returns how many copies were queued."""
    return recovered_trials(storage, s, max_retries)[0]


def _worker_gone(storage, t: FrozenTrial, now: float, now_mono: float) -> bool:
    """A running trial whose worker is dead or whose lease has expired: lost."""
    if t.state != TrialState.RUNNING:
        return False
    lease = t.system_attrs.get(LEASE_ATTR) or {}
    return owner_is_dead(lease.get("owner")) or _lease_expired(storage, t, now, now_mono)


def _uncopied_retries(trials: list[FrozenTrial], max_retries: int):
    """(trial, status) of each lost or interrupted trial that has no queued copy yet."""
    copied = {t.user_attrs.get(RETRY_OF) for t in trials}
    for t in trials:
        status = trial_status(t, max_retries)
        if needs_retry(status) and t.number not in copied:
            yield t, status


def recovered_trials(storage, s: optuna.Study, max_retries: int) -> tuple[int, list[FrozenTrial]]:
    """:func:`recover`, and the study's trials as they are after it: read once, and again only
    where recovery wrote (each read of the trials is six statements)."""
    if isinstance(storage, BaseHeartbeat) and is_heartbeat_enabled(storage):
        optuna.storages.fail_stale_trials(s)
    now, now_mono = time.time(), time.monotonic()
    trials = s.get_trials(deepcopy=False)
    failed = 0
    for t in trials:
        if _worker_gone(storage, t, now, now_mono):
            try:
                # the retry decision goes into the ledger now, with the limit in force now
                spent = t.user_attrs.get(RETRIES, 0) >= max_retries
                storage.set_trial_user_attr(t._trial_id, LOST_DECISION, "counted" if spent else "retry")
                storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # its worker told it in the meantime, or another worker recovered it
            failed += 1
    if failed:
        trials = s.get_trials(deepcopy=False)
    queued = 0
    for t, status in _uncopied_retries(trials, max_retries):
        attrs = {RETRY_OF: t.number, RETRIES: t.user_attrs.get(RETRIES, 0) + (status == "lost")}
        if "seed" in t.user_attrs:
            attrs["seed"] = t.user_attrs["seed"]
        s.enqueue_trial(dict(t.params), user_attrs=attrs, skip_if_exists=False)
        queued += 1
    return queued, (s.get_trials(deepcopy=False) if queued else trials)


def recover_study(storage, lock, name: str, max_retries: int = DEFAULT_MAX_RETRIES, wait: bool = True) -> int:
    """:func:`recover` on a study's search and final trials, under its ledger lock. With
    ``wait=False`` a lock another worker holds skips it: that worker's claim recovers first."""
    queued = 0
    with lock(name, wait=wait) as held:
        if not held:
            return 0
        for stage_name in (name, name + FINAL_SUFFIX):
            s = load_study(storage, stage_name)
            if s is not None:
                queued += recover(storage, s, max_retries)
    return queued


def has_room(trials: list[FrozenTrial], budget: int, max_retries: int) -> bool:
    """A new configuration may be sampled: counted + running + queued stays within the budget."""
    done, pending = counted(trials, max_retries)
    return done + pending < budget


def seeds_to_queue(trials: list[FrozenTrial], seeds: list[int]) -> list[int]:
    """Final seeds with no trial yet (every trial of a seed, whatever its state, covers it)."""
    have = {t.user_attrs.get("seed") for t in trials}
    return [seed for seed in seeds if seed not in have]


def final_done(trials: list[FrozenTrial], seeds: list[int], max_retries: int) -> bool:
    wanted = set(seeds)
    finished = {
        t.user_attrs.get("seed")
        for t in trials
        if trial_status(t, max_retries) in ("complete", "pruned", "failed")
    }
    pending = any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
    return wanted <= finished and not pending


# ---------------------------------------------------------------------------- claims


@dataclass
class Claim:
    """A claimed trial: the study's ledger as it was at the claim, the trial, and its lease."""

    ledger: StudyLedger
    trial: optuna.Trial | None = None
    lease: Lease | None = None
    lock_lost: bool = False  # no trial because the lock was lost mid-claim: try again soon


def _claim_under_lock(storage, lock, study: Study, stage: str, led: StudyLedger, s: optuna.Study):
    """The claim's reads and writes; each write that a second lock holder would duplicate (a
    queued seed, a sampled or taken trial) is fenced: it happens only while the lock is ours."""
    lock.fence(study.name)
    _, trials = recovered_trials(storage, s, led.max_retries)
    if stage == "search":
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if not waiting and not has_room(trials, int(led.attrs[BUDGET_ATTR]), led.max_retries):
            return None
        s.sampler = make_sampler(study.experiment, len(trials))
        # a loaded study has Optuna's default pruner (5 start-up trials, no warm-up), not ours
        s.pruner = make_pruner(study.experiment, study.budget)
        lock.fence(study.name)
        return s.ask()
    queue = seeds_to_queue(trials, led.seeds)
    for seed in queue:
        lock.fence(study.name)
        s.enqueue_trial({}, user_attrs={"seed": seed})
    if queue:
        trials = s.get_trials(deepcopy=False)
    if not any(t.state == TrialState.WAITING for t in trials):
        return None
    lock.fence(study.name)
    return s.ask()


def may_have_work(storage, led: StudyLedger, stage: str) -> bool:
    """Whether a claim of ``stage`` under the lock could take, queue or recover a trial, judged
    from a read without the lock. False only where nothing could be done now; a change after the
    read shows in the ledger's version, which waiting workers watch (rnnbench.waiting), and stale
    heartbeats on PostgreSQL are recovered by the waiting path too."""
    if stage == "search":
        trials = led.search_trials
        if has_room(trials, int(led.attrs[BUDGET_ATTR]), led.max_retries):
            return True
    else:
        if led.final is None:
            return True
        trials = led.final_trials
        if seeds_to_queue(trials, led.seeds):
            return True
    now, now_mono = time.time(), time.monotonic()
    if any(t.state == TrialState.WAITING or _worker_gone(storage, t, now, now_mono) for t in trials):
        return True
    return next(_uncopied_retries(trials, led.max_retries), None) is not None


@contextmanager
def claimed(storage, lock, study: Study, stage: str, owner: dict[str, Any]) -> Iterator[Claim]:
    """Under the study's lock: recover lost trials, then take a queued trial or sample a new one
    if the budget has room (``claim.trial`` is None where there is none). The lease lives as long
    as the block, as Optuna's heartbeat thread does: it ends however the block does, and a block
    that raises without a record in the ledger (or raises anything but an interrupt) leaves its
    trial FAILED without one, which recovery queues again.

    A read without the lock comes first: where it shows nothing to take, queue or recover, the
    lock is not taken at all (most claims of a large fleet find a study full)."""
    led = StudyLedger.load(storage, study.name)
    if led is not None and not may_have_work(storage, led, stage):
        yield Claim(led)
        return
    with lock(study.name):
        led = StudyLedger.load(storage, study.name)
        s = led.search if stage == "search" else led.final
        lock_lost = False
        try:
            trial = _claim_under_lock(storage, lock, study, stage, led, s)
        except LockLost:  # another worker may be in here now: leave it to them, try again soon
            trial, lock_lost = None, True
        claim = Claim(
            led, trial, Lease(storage, trial._trial_id, owner).start() if trial else None, lock_lost
        )
    if claim.trial is None:
        yield claim
        return
    try:
        yield claim
    except BaseException as exc:
        claim.lease.stop()  # before failing it: no renewal may race the failure
        if RECORD not in claim.trial.user_attrs or not isinstance(exc, KeyboardInterrupt):
            fail_quietly(storage, claim.trial, led.max_retries)
        raise
    finally:
        claim.lease.stop()
