"""A study's ledger lock held by another worker: a worker does not queue behind it while it has
other studies to claim from, and queues (in the lock, sending nothing) once it has been held for
BUSY_WAIT_S. On the journal here; tests/test_ledger_postgres.py has the server's try-lock."""

from __future__ import annotations

import threading
import time
from datetime import datetime
from pathlib import Path

from rnnbench import workers
from rnnbench.experiment import parse
from rnnbench.ledger import StudyLedger, create_study
from rnnbench.plan import open_stores, prepare
from rnnbench.scheduler import LedgerLock

TWO_STUDIES = """\
name: busy
cells: [gru, rnn]
tasks:
  - name: memory
    options: {problem: adding, seq_len: 8, train_size: 128, valid_size: 64, test_size: 64}
search:
  lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
fixed: {hidden_size: 8}
budget: {trials: 1, epochs: 1}
final: {seeds: 1}
pruner: {name: none}
"""


def _worker(tmp_path: Path):
    plan = prepare(parse(TWO_STUDIES), home=tmp_path / "home")
    stores = open_stores(plan)
    for study in plan.studies:
        with stores[2](study.name):
            create_study(plan, stores[1], study)
    return plan, workers.Worker(plan, 0, {"device": "cpu", "threads": 1}, stores=stores)


def _hold(plan, name: str, seconds: float) -> tuple[threading.Thread, list[datetime]]:
    """Another worker's lock on ``name`` for ``seconds``; the list gets the time it let go."""
    held, released = threading.Event(), []

    def holder():
        with LedgerLock(None, plan.home)(name):
            held.set()
            time.sleep(seconds)
            released.append(datetime.now())

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(10)
    return thread, released


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


def test_a_worker_claims_another_study_while_the_first_ones_lock_is_held(tmp_path: Path):
    plan, worker = _worker(tmp_path)
    first, second = plan.studies  # worker 0 walks them in this order
    holder, released = _hold(plan, first.name, 5.0)
    worker.run()
    holder.join()
    storage = worker.storage
    blocked = StudyLedger.load(storage, first.name)
    free = StudyLedger.load(storage, second.name)
    # the free study's search trial started while the first study's lock was held
    assert free.search_trials[0].datetime_start < released[0]
    assert blocked.search_trials[0].datetime_start >= released[0]
    for led in (blocked, free):  # and both studies ended with their budgets exact
        summary = led.summary()
        assert summary["search"]["complete"] == 1 and len(summary["seeds"]) == 1, summary


def test_a_lock_held_past_busy_wait_is_queued_for(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(workers, "BUSY_WAIT_S", 0.3)
    plan, worker = _worker(tmp_path)
    study = plan.studies[0]
    holder, released = _hold(plan, study.name, 1.5)
    with worker._claimed(study, "search") as claim:
        assert claim.busy and claim.trial is None  # told at once: the worker may claim elsewhere
    time.sleep(0.4)  # held since longer than BUSY_WAIT_S: the next claim queues for it
    with worker._claimed(study, "search") as claim:
        assert released, "the claim returned before the holder let go"
        assert claim.trial is not None and not claim.busy
    holder.join()
