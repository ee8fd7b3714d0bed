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
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from rnnbench.errors import LedgerUnreachable, first_line
from rnnbench.sweep import (
    DEFAULT_MAX_RETRIES,
    LOST_DECISION,
    RETRIES,
    RETRY_OF,
    counted,
    database_location,
    is_journal,
    journal_path,
    lease_duration,
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
    import psutil

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
    import psutil

    try:
        return abs(psutil.Process(int(owner["pid"])).create_time() - float(owner["start"])) > 1.0
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return True
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------- locks


class LedgerLock:
    """Mutual exclusion per key among every worker that shares the ledger."""

    def __init__(self, storage_url: str | None, home: Path):
        self.url = storage_url
        if is_journal(storage_url):
            path = journal_path(storage_url, home)
            self.folder = path.with_name(path.name + ".locks")
            self.engine = None
        else:
            import sqlalchemy

            self.folder = None
            self.engine = sqlalchemy.create_engine(
                normalize_rdb_url(storage_url), pool_size=1, max_overflow=1, pool_pre_ping=True
            )

    @contextmanager
    def __call__(self, key: str):
        digest = hashlib.sha256(key.encode()).digest()
        if self.engine is None:
            from filelock import FileLock

            self.folder.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.folder / f"{digest.hex()[:16]}.lock")):
                yield
            return
        import sqlalchemy

        lock_id = int.from_bytes(digest[:8], "big", signed=True)
        try:
            conn = self.engine.connect()
        except Exception as exc:  # it answered when the run started: it went away since
            raise LedgerUnreachable(
                f"the ledger database at {database_location(self.url)}", first_line(exc)
            ) from None
        try:
            # Session-level advisory lock: the server releases it if this process dies.
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": lock_id})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": lock_id})
                conn.commit()
        finally:
            conn.close()


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
        from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

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
        from optuna.storages._heartbeat import BaseHeartbeat

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


def _lease_expired(storage, t: FrozenTrial, now: float, now_mono: float | None = None) -> bool:
    from optuna.storages._heartbeat import BaseHeartbeat

    lease = t.system_attrs.get(LEASE_ATTR)
    if isinstance(storage, BaseHeartbeat):
        if lease is not None:
            return False  # judged by fail_stale_trials in the database's clock
    elif lease is not None and "expires" in lease:
        if now_mono is not None and lease.get("boot") and lease["boot"] == boot_id():
            return lease["expires_mono"] < now_mono  # a wall-clock step expires nothing
        return lease["expires"] < now
    # No lease at all: the worker died between its claim and its first renewal.
    started = t.datetime_start.timestamp() if t.datetime_start else now
    return now - started > lease_duration()


# ---------------------------------------------------------------------------- recovery


def recover(storage, s: optuna.Study, max_retries: int = DEFAULT_MAX_RETRIES) -> int:
    """Fail trials whose worker is gone and queue one copy of each lost or interrupted trial.

    Call under the study's ledger lock. Returns how many copies were queued."""
    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

    if isinstance(storage, BaseHeartbeat) and is_heartbeat_enabled(storage):
        optuna.storages.fail_stale_trials(s)
    now, now_mono = time.time(), time.monotonic()
    for t in s.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        lease = t.system_attrs.get(LEASE_ATTR) or {}
        if owner_is_dead(lease.get("owner")) or _lease_expired(storage, t, now, now_mono):
            try:
                # the retry decision goes into the ledger now, with the limit in force now
                spent = t.user_attrs.get(RETRIES, 0) >= max_retries
                storage.set_trial_user_attr(t._trial_id, LOST_DECISION, "counted" if spent else "retry")
                storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # its worker told it in the meantime, or another worker recovered it
    queued = 0
    trials = s.get_trials(deepcopy=False)
    copied = {t.user_attrs.get(RETRY_OF) for t in trials}
    for t in trials:
        status = trial_status(t, max_retries)
        if needs_retry(status) and t.number not in copied:
            attrs = {RETRY_OF: t.number, RETRIES: t.user_attrs.get(RETRIES, 0) + (status == "lost")}
            if "seed" in t.user_attrs:
                attrs["seed"] = t.user_attrs["seed"]
            s.enqueue_trial(dict(t.params), user_attrs=attrs, skip_if_exists=False)
            queued += 1
    return queued


def recover_study(storage, lock, name: str, max_retries: int = DEFAULT_MAX_RETRIES) -> int:
    """:func:`recover` on a study's search and final trials, under its ledger lock."""
    from rnnbench.sweep import FINAL_SUFFIX, load_study

    queued = 0
    with lock(name):
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
