"""A study's ledger lock held by another worker: a try (``wait=False``) is told at once, holding
nothing, and a waiting worker's recovery skips the study instead of queueing behind the holder.
On the journal here; tests/test_ledger_postgres.py has the server's try-lock."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from rnnbench.experiment import parse
from rnnbench.ledger import create_study
from rnnbench.plan import open_stores, prepare
from rnnbench.scheduler import LedgerLock, recover_study
from tests.helpers import TINY_EXPERIMENT


def test_try_lock_answers_at_once_while_another_holds_it(tmp_path: Path):
    a, b = LedgerLock(None, tmp_path), LedgerLock(None, tmp_path)
    with a("study") as held:
        assert held is True
        started = time.monotonic()
        with b("study", wait=False) as got:
            assert got is False
        assert time.monotonic() - started < 1
    with b("study", wait=False) as got:
        assert got is True
        with a("study", wait=False) as other:  # B holds it now: A is told, not queued
            assert other is False


def test_recovery_skips_a_study_whose_lock_is_held(tmp_path: Path):
    text = TINY_EXPERIMENT.format(
        name="busy", search="", fixed="", trials=1, epochs=1, seeds=1, train_size=64
    )
    plan = prepare(parse(text), home=tmp_path / "home")
    _, storage, lock = open_stores(plan)
    (study,) = plan.studies
    with lock(study.name):
        create_study(plan, storage, study)
    held, release = threading.Event(), threading.Event()

    def holder():
        with LedgerLock(None, plan.home)(study.name):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(10)
        started = time.monotonic()
        assert recover_study(storage, lock, study.name, wait=False) == 0
        assert time.monotonic() - started < 5  # told, not queued behind the holder
    finally:
        release.set()
        thread.join()
    assert recover_study(storage, lock, study.name, wait=False) == 0  # free: it ran, nothing lost
