"""How an idle worker waits: for a change in the ledger, one cheap read at a time.

A worker with nothing to claim used to re-read every pending study's ledger (a lock, the study,
its trials: some ten statements a study) every 0.5 s: with 80 studies that is thousands of
statements a second per idle worker. Work only ever appears through a ledger write (a trial
finished or failed, a seed queued, a lost trial requeued), so an idle worker instead watches one
cheap *version* of the ledger and looks again only at the studies whose version changed:

- PostgreSQL: one statement, trials per study with their count, last finish and queued count;
- the journal: the file's size and modification time (no statement at all), every study.

A dead worker writes nothing, so leases are watched too: one statement finds whether any running
trial's heartbeat is overdue (PostgreSQL); the journal's recovery is in memory and runs anyway.
Each look is paced with jitter, so a fleet does not wake as one. See benchmarks/ledger_load.py.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

from optuna.storages import RDBStorage

from rnnbench.sweep import FINAL_SUFFIX, lease_duration

POLL_S = 1.0  # between two looks at the version (±50% jitter): about 1 statement a second


class LedgerWatch:
    """Which studies may have work again since the last look."""

    def __init__(self, storage, journal: Path | None):
        self.storage, self.journal = storage, journal
        self.rdb = isinstance(storage, RDBStorage)
        self._names: dict[int, str] = {}
        self._seen: dict[str, tuple] = {}
        self._last_stale_check = 0.0

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
                    "SELECT study_id, count(*), max(datetime_complete), "
                    "sum(CASE WHEN state = 'WAITING' THEN 1 ELSE 0 END) FROM trials GROUP BY study_id "
                    "ORDER BY study_id"  # a study's two stages always in one order
                )
            ).all()
        out: dict[str, tuple] = {}
        for study_id, *version in rows:
            name = self._name(study_id).removesuffix(FINAL_SUFFIX)
            out[name] = (*out.get(name, ()), *map(str, version))
        return out

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
        """Studies with a running trial whose worker may be gone (checked every quarter lease,
        else the empty set): its heartbeat older than a lease, or none yet. None on the journal
        every quarter lease: every study, whose recovery reads nothing but the journal itself."""
        now = time.monotonic()
        if now - self._last_stale_check < lease_duration() / 4:
            return set()
        self._last_stale_check = now
        if not self.rdb:
            return None
        import sqlalchemy

        with self.storage.engine.connect() as conn:
            rows = conn.execute(
                sqlalchemy.text(
                    "SELECT DISTINCT t.study_id FROM trials t "
                    "LEFT JOIN trial_heartbeats h ON h.trial_id = t.trial_id "
                    "WHERE t.state = 'RUNNING' AND (h.heartbeat IS NULL OR "
                    "h.heartbeat < LOCALTIMESTAMP - make_interval(secs => :grace))"
                ),
                {"grace": lease_duration()},
            ).all()
        return {self._name(study_id).removesuffix(FINAL_SUFFIX) for (study_id,) in rows}


def pause(seconds: float = POLL_S) -> None:
    """Sleep ``seconds`` ± 50%, so workers that went idle together look at different times."""
    time.sleep(seconds * random.uniform(0.5, 1.5))
