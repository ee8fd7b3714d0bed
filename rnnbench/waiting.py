"""How an idle worker waits: for a change in the ledger, one cheap read at a time.

A worker with nothing to claim used to re-read every pending study's ledger (a lock, the study,
its trials: some ten statements a study) every 0.5 s: with 80 studies that is thousands of
statements a second per idle worker. Work only ever appears through a ledger write (a trial
finished or failed, a seed queued, a lost trial requeued), so an idle worker instead watches one
cheap *version* of the ledger and looks again only at the studies whose version changed:

- PostgreSQL: one statement, trials per study with their count, last finish and count per state;
- the journal: the file's size and modification time (no statement at all), every study.

The same statement counts each study's running, failed and overdue trials, so a worker skips,
without reading it, a study whose every trial is taken by a live worker, and drops one that is
finished (``settled``): in a busy fleet almost every study changes between two looks, and reading
each in full to find it taken, or finished, was most of the ledger's work at 128 workers.

A dead worker writes nothing, so leases are watched too: the same statement counts the running
trials whose heartbeat is overdue (PostgreSQL); the journal's recovery is in memory and runs anyway.
Each look is paced with jitter, so a fleet does not wake as one. See benchmarks/ledger_load.py.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from optuna.storages import RDBStorage

from rnnbench.sweep import FINAL_SUFFIX, lease_duration

POLL_S = 1.0  # between two looks at the version (±50% jitter): about 1 statement a second
# a running trial whose worker may be gone: its heartbeat older than a lease, or none yet
_OVERDUE = (
    "t.state = 'RUNNING' AND (h.heartbeat IS NULL OR "
    "h.heartbeat < LOCALTIMESTAMP - make_interval(secs => :grace))"
)


@dataclass(frozen=True)
class StageCounts:
    """One stage's trials at a look: all of them, and those running, queued, failed, overdue."""

    total: int = 0
    running: int = 0
    waiting: int = 0
    failed: int = 0
    overdue: int = 0

    @property
    def settled(self) -> bool:
        """Nothing for a claim to take or recover: no queued, failed or overdue trial."""
        return not (self.waiting or self.failed or self.overdue)


class LedgerWatch:
    """Which studies may have work again since the last look."""

    def __init__(self, storage, journal: Path | None):
        self.storage, self.journal = storage, journal
        self.rdb = isinstance(storage, RDBStorage)
        self._names: dict[int, str] = {}
        self._seen: dict[str, tuple] = {}
        self._counts: dict[str, dict[str, StageCounts]] = {}  # study -> stage -> counts, last look
        self._last_stale_check = 0.0
        self._looked_at = -math.inf  # monotonic time of the last look's counts

    def versions(self) -> dict[str, tuple]:
        """Study name (search and final stages alike, by their search name) -> version."""
        if not self.rdb:
            try:
                stat = os.stat(self.journal)
            except OSError:
                return {}
            return {"*": (stat.st_size, stat.st_mtime_ns)}
        import sqlalchemy

        with self.storage.engine.connect() as conn:
            rows = conn.execute(
                sqlalchemy.text(
                    "SELECT t.study_id, count(*), max(t.datetime_complete), "
                    "sum(CASE WHEN t.state = 'WAITING' THEN 1 ELSE 0 END), "
                    f"sum(CASE WHEN {_OVERDUE} THEN 1 ELSE 0 END), "
                    "sum(CASE WHEN t.state = 'RUNNING' THEN 1 ELSE 0 END), "
                    "sum(CASE WHEN t.state = 'FAIL' THEN 1 ELSE 0 END) "
                    "FROM trials t LEFT JOIN trial_heartbeats h ON h.trial_id = t.trial_id "
                    "GROUP BY t.study_id ORDER BY t.study_id"  # a study's two stages always in one order
                ),
                {"grace": lease_duration()},
            ).all()
        out: dict[str, tuple] = {}
        self._counts, self._looked_at = {}, time.monotonic()
        for study_id, total, finished, waiting, overdue, running, failed in rows:
            full_name = self._name(study_id)
            name = full_name.removesuffix(FINAL_SUFFIX)
            # every state change changes a count (the last finish alone misses a trial that
            # finished earlier but committed later than the last one seen); an overdue trial
            # changes it too: its study is looked at (and recovered)
            version = (total, finished, waiting, overdue, running, failed)
            out[name] = (*out.get(name, ()), *map(str, version))
            stage = "final" if full_name != name else "search"
            counts = StageCounts(total, running, waiting, failed, overdue)
            self._counts.setdefault(name, {})[stage] = counts
        return out

    def outdated(self) -> bool:
        """The counts are older than a look's pace: a worker part-way through a long pass of
        claims (each seconds, under load) looks again instead of judging from a minutes-old one."""
        return self.rdb and time.monotonic() - self._looked_at > POLL_S

    def settled(self, name: str, budget: int, seeds: int) -> str | None:
        """What the last look says of a study without reading it: ``busy`` (every trial its
        current stage may run is taken by a live worker, so a claim would find nothing), ``done``
        (both stages full and finished), or None where a claim must read it (and always on the
        journal, which has no counts). Budget and seeds are the study's ledger attributes."""
        stages = self._counts.get(name)
        if stages is None:
            return None
        search = stages.get("search", StageCounts())
        if not search.settled or search.total < budget:
            return None
        if search.running:
            return "busy"
        final = stages.get("final")
        if final is None or not final.settled or final.total < seeds:
            return None
        return "busy" if final.running else "done"

    def _name(self, study_id: int) -> str:
        if study_id not in self._names:
            self._names[study_id] = self.storage.get_study_name_from_id(study_id)
        return self._names[study_id]

    def changed(self) -> set[str] | None:
        """Studies whose version changed since the last call (None: every study may have)."""
        now = self.versions()
        if not self.rdb:
            changed = now != self._seen
            self._seen = now
            return None if changed else set()
        names = {name for name, version in now.items() if self._seen.get(name) != version}
        self._seen = now
        return names

    def overdue(self) -> set[str] | None:
        """Studies with a running trial whose worker may be gone (every quarter lease, else the
        empty set): its heartbeat older than a lease, or none yet, as the last look counted them.
        None on the journal every quarter lease: every study, whose recovery reads nothing but
        the journal itself."""
        now = time.monotonic()
        if now - self._last_stale_check < lease_duration() / 4:
            return set()
        self._last_stale_check = now
        if not self.rdb:
            return None
        return {name for name, stages in self._counts.items() if any(c.overdue for c in stages.values())}


def pause(seconds: float = POLL_S) -> None:
    """Sleep ``seconds`` ± 50%, so workers that went idle together look at different times."""
    time.sleep(seconds * random.uniform(0.5, 1.5))
