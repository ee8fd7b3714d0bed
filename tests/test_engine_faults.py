"""Faults of the run engine under real processes: a worker stalled past its lease (SIGSTOP, then
SIGCONT), an interrupt between the end of training and the ledger write, a record of any length,
and a changed --max-retries on resume. Each ends with the ledger, MLflow and the budgets exact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from functools import partial
from pathlib import Path

import pytest

from tests.helpers import run_cli, stopped_child, write_tiny_experiment
from tests.ledger_checks import wait_for_lost_trial

# test_run's tiny experiment with hidden_size fixed (lr alone searched), one final seed, 256 sequences
_write = partial(write_tiny_experiment, seeds=1, train_size=256, hidden_size=8)


def _ledger(home: Path, name: str):
    from mlflow.tracking import MlflowClient

    from rnnbench.sweep import open_storage
    from rnnbench.tracking import tracking_uri_for
    from tests.ledger_checks import ledger_view, mlflow_view

    storage = open_storage(None, home)
    ledger = ledger_view(storage, name)
    assert mlflow_view(MlflowClient(tracking_uri_for(home)), name) == ledger
    return Counter((stage, status) for (_, stage, _), (status, _) in ledger.items())


@pytest.mark.slow  # about 40 s: three leases of a stopped worker, then the rest of the run
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_a_worker_stalled_past_its_lease_is_discarded_with_one_warning(tmp_path: Path):
    """Fault 1: SIGSTOP a worker mid-trial for three leases; the other recovers its trial and runs
    the copy; after SIGCONT the stalled worker's late result is discarded with one line, the run
    goes on and ends with the budget exact."""
    home, path = tmp_path / "home", _write(tmp_path, "stall", trials=4, epochs=8, train_size=2048)
    env = {**os.environ, "RNNBENCH_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env["RNNBENCH_LEASE_SECONDS"] = "4"
    env["RNNBENCH_FAULT"] = f"mid_trial_sigstop:{tmp_path / 'once'}"  # the first worker after an epoch
    proc = subprocess.Popen(
        [sys.executable, "-m", "rnnbench.cli", "run", str(path), "--workers", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        stalled = stopped_child(proc.pid, timeout=120)
        wait_for_lost_trial(None, home, "stall", timeout=240)  # the other worker found its lease expired
        os.kill(stalled, signal.SIGCONT)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    warnings = [line for line in out.splitlines() if "stalled past its lease" in line]
    assert len(warnings) == 1, out[-4000:]
    counts = _ledger(home, "stall")
    # the stalled trial counts as lost and its copy ran: the budget is exact
    assert counts == Counter({("search", "complete"): 4, ("search", "lost"): 1, ("final", "complete"): 1}), (
        counts
    )
    print(f"\nstalled worker: {dict(counts)}; {warnings}")


def test_an_interrupt_after_training_is_held_until_the_result_counts(tmp_path: Path):
    """Fault 8: SIGTERM lands between the end of training and the ledger write (injected there); the
    trial's result is recorded and counted, then the run stops; the resume finishes the budget
    without running that configuration again."""
    home, path = tmp_path / "home", _write(tmp_path, "late", trials=3)
    first = run_cli(["run", str(path)], home, RNNBENCH_FAULT=f"record_sigterm:{tmp_path / 'once'}")
    assert first.returncode == 130, first.stdout + first.stderr
    counts = _ledger(home, "late")
    assert counts == Counter({("search", "complete"): 1}), counts  # counted, nothing interrupted
    second = run_cli(["run", str(path)], home)
    assert second.returncode == 0, second.stdout + second.stderr
    counts = _ledger(home, "late")
    assert counts == Counter({("search", "complete"): 3, ("final", "complete"): 1}), counts


def test_a_record_of_any_length_is_a_modest_ledger_entry(tmp_path: Path):
    """Fault 6: 4,000 validations of 15 metrics: the history is stored compressed and reads back."""
    import json

    from rnnbench.sweep import HISTORY_Z, RECORD, pack_history, record_of

    history = [
        {
            "epoch": e,
            "time_ms": 1_700_000_000_000 + e,
            "metrics": {f"m{k}": 1.0 / (e + k + 1) for k in range(15)},
        }
        for e in range(1, 4001)
    ]
    record = {"status": "complete", "history": history}
    packed = pack_history(record)
    assert len(json.dumps(record)) > 1_500_000 and HISTORY_Z in packed and "history" not in packed
    assert len(json.dumps(packed)) < len(json.dumps(record)) / 3

    class Frozen:  # what record_of reads: a trial's user attributes
        user_attrs = {RECORD: packed}

    assert record_of(Frozen)["history"] == history
    assert pack_history({"history": history[:3]}) == {"history": history[:3]}  # short: as it is


@pytest.mark.slow  # two whole runs: the default suite stays under 10 minutes
def test_a_changed_max_retries_is_one_line_and_changes_no_decision(tmp_path: Path):
    """Fault 5: a resume with another --max-retries says so once; lost trials keep their decision."""
    home, path = tmp_path / "home", _write(tmp_path, "retries", trials=2)
    assert run_cli(["run", str(path)], home).returncode == 0
    again = run_cli(["run", str(path), "--max-retries", "1"], home)
    assert again.returncode == 0, again.stdout + again.stderr
    notes = [line for line in again.stdout.splitlines() if "--max-retries" in line]
    assert notes == [
        "note: --max-retries is 1 now, it was 3: trials already lost keep the decision made then; "
        "the new limit applies from now on"
    ], again.stdout
    assert _ledger(home, "retries") == Counter({("search", "complete"): 2, ("final", "complete"): 1})


@pytest.mark.slow  # a run, then export twice: the default suite stays under 10 minutes
def test_export_works_with_the_run_home_deleted(tmp_path: Path):
    """Fault 12: a run home that vanishes after the run (Slurm's $TMPDIR) takes no weights with
    it: they are artifacts of the seeds' MLflow runs, beside the store, and `export` reads them."""
    import shutil

    home, path = tmp_path / "scratch" / "home", _write(tmp_path, "slurm", trials=1, seeds=2)
    stores = [
        "--storage",
        str(tmp_path / "ledger.journal"),
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    run = run_cli(["run", str(path), *stores], home)
    assert run.returncode == 0, run.stdout + run.stderr
    assert list((tmp_path / "mlflow-artifacts").rglob("weights.pt"))  # beside the store, not in the home
    shutil.rmtree(tmp_path / "scratch")
    out = tmp_path / "model"
    exported = run_cli(["export", "slurm", "memory-synthetic/gru-1L-uni", "--out", str(out), *stores], home)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert (out / "MLmodel").is_file() and not home.exists()
    missing = run_cli(["export", "slurm", "memory-synthetic/gru-1L-uni", "--out", str(tmp_path / "m2"),
                       "--storage", str(tmp_path / "ledger.journal")], home)  # fmt: skip
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr


@pytest.mark.slow  # a whole run: the default suite stays under 10 minutes
def test_a_sync_from_a_stale_snapshot_neither_reopens_nor_outdates_the_parent(tmp_path: Path):
    """Fault 11: a refresh from a ledger snapshot taken before the last seed finished (a slow
    `sync` beside a worker) leaves the finished parent finished, and the points it writes are
    stamped with that older ledger state, so they never become the parent's latest values."""
    import dataclasses

    from rnnbench.experiment import load
    from rnnbench.ledger import StudyLedger
    from rnnbench.plan import open_stores, prepare
    from rnnbench.projection import Projection

    home, path = tmp_path / "home", _write(tmp_path, "stale", trials=1, seeds=2)
    assert run_cli(["run", str(path)], home).returncode == 0
    plan = prepare(load(str(path)), home=home)
    tracker, storage, lock = open_stores(plan, create=False)
    name = plan.studies[0].name
    fresh = StudyLedger.load(storage, name)
    stale = dataclasses.replace(fresh, final_trials=fresh.final_trials[:1])  # before the 2nd seed ended
    parent = Projection(tracker, storage, lock).parent_id(fresh)
    before = tracker.client.get_run(parent)
    Projection(tracker, storage, lock).refresh_parent(stale)
    after = tracker.client.get_run(parent)
    assert after.info.status == before.info.status == "FINISHED"
    assert after.data.metrics == before.data.metrics  # the latest values are still the fresh ones
    assert after.data.metrics["final_seeds"] == 2


@pytest.mark.slow  # a whole run (~15 s): the default suite stays under 10 minutes
def test_a_claim_that_lost_its_lock_is_tried_again_without_a_ledger_change(tmp_path: Path, monkeypatch):
    """A claim whose ledger lock was lost mid-way (fenced: the server ended its session) takes no
    trial and changes nothing in the ledger, so a worker waiting for a change would wait forever:
    it looks again by itself, and the run ends with the budget exact."""
    import threading

    from rnnbench import runner
    from rnnbench.experiment import parse
    from rnnbench.plan import prepare
    from rnnbench.scheduler import LedgerLock, LockLost

    path = _write(tmp_path, "fenced", trials=1)
    losses, real_fence = [3], LedgerLock.fence

    def fence(self, key):
        if losses[0]:  # the first three fences find the lock gone
            losses[0] -= 1
            raise LockLost(f"the ledger lock {key!r} was lost (test)")
        real_fence(self, key)

    monkeypatch.setattr(LedgerLock, "fence", fence)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # an hour's lease: the idle worker's look for overdue leases (every quarter lease) cannot mask it
    monkeypatch.setenv("RNNBENCH_LEASE_SECONDS", "3600")
    plan = prepare(parse(path.read_text()), home=tmp_path / "home")
    run = threading.Thread(target=runner.start, args=(plan,), daemon=True)
    run.start()
    run.join(timeout=120)
    assert not run.is_alive(), "the worker waited for a ledger change that never came"
    assert losses == [0]
    counts = _ledger(tmp_path / "home", "fenced")
    assert counts == Counter({("search", "complete"): 1, ("final", "complete"): 1}), counts
