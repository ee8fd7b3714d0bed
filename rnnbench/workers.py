"""Workers: claim a trial, run it, write its result to the ledger, project it to MLflow; repeat.

One loop (:class:`Worker`) runs in the parent with one worker or in each of N spawned processes
(:func:`run_pool`, which watches them, recovers a dead worker's trial at once and replaces the
worker a few times at most). The ledger is the record (rnnbench.ledger); MLflow is written after
it and best effort (rnnbench.projection): a failed MLflow write costs nothing a sync cannot repair.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.connection
import os
import queue
import random
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import optuna
import torch

from rnnbench.errors import ConfigError, first_line
from rnnbench.experiment import Study
from rnnbench.exports import repair_models
from rnnbench.faults import fault
from rnnbench.interrupts import deferred, stop_once_on_either
from rnnbench.items import save_items
from rnnbench.ledger import (
    BASELINE_ATTR,
    BASELINES_ATTR,
    BUDGET_ATTR,
    StudyLedger,
    decide_retry,
    fail_quietly,
    json_safe,
    remaining_units,
    write_result,
)
from rnnbench.models import log_model, model_card, save_weights
from rnnbench.plan import Plan, open_stores
from rnnbench.progress import Progress, make_progress
from rnnbench.projection import MIRRORED, Projection, best_hparams, project_file
from rnnbench.scheduler import LedgerLock, claimed, final_done, owner_identity, recover, recover_study
from rnnbench.sweep import (
    RECORD,
    is_journal,
    journal_path,
    lease_duration,
    make_sampler,
    suggest,
    trial_budget,
)
from rnnbench.trainer import RunSettings
from rnnbench.trial import HiddenSizes, Outcome, TrialHooks, failed_before_training, now_ms, run_trial
from rnnbench.waiting import LedgerWatch, pause

_STATES = {
    "complete": optuna.trial.TrialState.COMPLETE,
    "pruned": optuna.trial.TrialState.PRUNED,
    "failed": optuna.trial.TrialState.FAIL,
}


def available_cpus() -> int:
    """The CPUs this process may run on: its affinity mask, which Slurm and cgroup cpusets set
    (``os.cpu_count()`` counts the whole machine: 64 on a node where the job got 8)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity API here (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def threads_per_worker(workers: int) -> int:
    """Torch threads per worker: the allowed CPUs shared out, at least one each."""
    return max(1, available_cpus() // max(1, workers))


def sync(projection: Projection, experiment: str, home: Path, warn=print) -> dict[str, Any]:
    """MLflow made to match the ledger: every run, parent and logged model (what was rewritten)."""
    done = projection.sync(experiment)
    return done | {
        "models": repair_models(projection.tracker, projection.storage, experiment, home, warn=warn)
    }


def sync_quietly(projection: Projection, experiment: str, home: Path, say=print) -> None:
    """A sync that may fail (MLflow down): the ledger has everything, a later sync projects it."""
    try:
        sync(projection, experiment, home, warn=say)
    except Exception as exc:
        say(
            f"warning: MLflow not updated ({first_line(exc, 200)}); "
            f"the ledger has every result: run `rnnbench sync {experiment}` once MLflow is back"
        )


class LiveMetrics:
    """A trial's live MLflow metrics, written from a thread: a store that hangs (another worker
    stopped inside an SQLite write holds its lock) never holds training up. What cannot be
    written (MLflow down, a full queue) marks the trial's live view incomplete, and the record's
    projection at the end writes every point instead."""

    def __init__(self, tracker, run_id: str | None, progress: Progress, stale=lambda: False):
        self.tracker, self.run_id, self.progress, self.stale = tracker, run_id, progress, stale
        self.complete = run_id is not None
        self._queue: queue.Queue = queue.Queue(maxsize=64)
        self._thread = threading.Thread(target=self._write, name="live-metrics", daemon=True)
        if run_id is not None:
            self._thread.start()

    def log(self, metrics: dict[str, float], step: int, time_ms: int) -> None:
        if not self.complete:
            return
        try:
            self._queue.put_nowait((metrics, step, time_ms))
        except queue.Full:
            self.complete = False

    def _write(self) -> None:
        while (item := self._queue.get()) is not None:
            if not self.complete:
                continue
            metrics, step, time_ms = item
            if self.stale():  # recovery took the trial: its run shows the lost one, untouched
                self.complete = False
                continue
            try:
                self.tracker.log_metrics(self.run_id, metrics, step=step, timestamp=time_ms)
            except Exception as exc:  # the ledger still gets everything
                self.complete = False
                self.progress.log(f"warning: MLflow write failed ({exc}); `rnnbench sync` repairs it")

    def close(self, timeout: float = 10.0) -> bool:
        """Wait a little for what is queued; True when every point reached MLflow."""
        if self.run_id is None:
            return False
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            self.complete = False
        self._thread.join(timeout)
        return self.complete and not self._thread.is_alive()


class _Hooks(TrialHooks):
    """A trial's news, to MLflow (live), the progress line and the pruner; the end of training
    starts deferring interrupts (``defer``) until its result is in the ledger."""

    def __init__(self, live: LiveMetrics, progress: Progress, trial, defer: ExitStack):
        self.live, self._progress, self.trial, self.defer = live, progress, trial, defer
        self.deferring = False

    def counts(self, counts, time_ms):
        self.live.log(counts, 0, time_ms)

    def epoch(self, epoch, metrics, time_ms):
        self.live.log(metrics, epoch, time_ms)

    def should_prune(self, value, epoch):
        if self.trial is None:  # a final seed
            return False
        self.trial.report(value, epoch)
        return self.trial.should_prune()

    def progress(self, epoch, epochs, primary, value):
        self._progress.epoch_ended(epoch, epochs, primary, value)

    def fit_ended(self):
        if not self.deferring:
            self.deferring = True
            self.defer.enter_context(deferred())


class Worker:
    """Claims trials and final seeds, trains them, writes the ledger, projects to MLflow."""

    def __init__(
        self,
        plan: Plan,
        worker: int,
        settings: dict[str, Any],
        prefix: str = "",
        stores=None,
        workers: int = 1,
        units: int | None = None,
    ):
        self.plan, self.e, self.worker = plan, plan.experiment, worker
        self.settings = RunSettings(**settings)
        if self.settings.threads:  # before any run is created: runs record the thread count
            torch.set_num_threads(self.settings.threads)
        self.tracker, self.storage, self.lock = stores or open_stores(plan, create=False)
        self.projection = Projection(self.tracker, self.storage, self.lock)
        self.journal = is_journal(plan.storage_url)
        self.owner = owner_identity(worker)
        self.owner["home"] = str(plan.home)
        if units is None:  # a resumed run counts only what is left; a pool counts once for all
            units = remaining_units(plan, self.storage)
        self.progress = make_progress(-(-units // workers), prefix)  # this worker's share of the runs
        self._tasks: dict[str, Any] = {}
        self.hidden = HiddenSizes()
        self._last_recovery: dict[str, float] = {}
        # study -> (search budget, final seeds): the ledger's attributes, which the start wrote
        # from this plan (create_study) and each read of a study refreshes
        self._limits = {s.name: (trial_budget(self.e, s.budget), self.e.final.seeds) for s in plan.studies}
        make_sampler(self.e)  # its first build imports scipy.stats (0.6 s): here, not under a lock

    def run(self) -> None:
        """Advance every study until each is done. A study with nothing to claim now (other
        workers hold its last trials) is looked at again only when the ledger says it changed or
        one of its leases may be overdue (see rnnbench.waiting)."""
        # Worker 0 walks the studies in the plan's order (one worker: the order a user reads);
        # every other worker in its own random order. Walking in one order from neighbouring
        # starts, a fleet moved in lockstep and queued on the same few studies' locks.
        studies = list(self.plan.studies)
        if self.worker:
            random.shuffle(studies)
        pending = {study.name: study for study in studies}
        due = set(pending)  # studies to advance now
        journal = journal_path(self.plan.storage_url, self.plan.home) if self.journal else None
        watch = LedgerWatch(self.storage, journal)
        try:
            while pending:
                due |= self._changed(watch, pending)  # every change is seen once, by the next look
                worked = False
                for name in [n for n in pending if n in due]:
                    if watch.outdated():
                        due |= self._changed(watch, pending)
                    state = watch.settled(name, *self._limits[name])  # None: the counts do not suffice
                    if state is None:
                        state = self.advance(pending[name])
                    elif state == "done":
                        self._refresh_parent(pending[name])  # as a claim that finds it done does
                    worked |= state == "worked"
                    if state == "done":
                        del pending[name]
                    if state not in ("worked", "retry"):
                        due.discard(name)
                if worked or not pending:
                    continue
                if due:  # a claim lost its lock: nothing in the ledger will say so, look again
                    pause()
                    continue
                while not due:
                    pause()
                    due |= self._changed(watch, pending)
                    overdue = watch.overdue()
                    overdue = set(pending) if overdue is None else overdue & set(pending)
                    for name in overdue:
                        self._recover_now_and_then(pending[name])
                    due |= overdue
        finally:
            self.progress.close()

    @staticmethod
    def _changed(watch: LedgerWatch, pending: dict[str, Study]) -> set[str]:
        changed = watch.changed()
        return set(pending) if changed is None else changed & set(pending)

    def task(self, study: Study):
        key = json.dumps(study.task_entry.model_dump(), sort_keys=True)
        if key not in self._tasks:
            task = study.make_task()
            task.setup()
            self._tasks[key] = task
        return self._tasks[key]

    def advance(self, study: Study) -> str:
        """One step of a study: run a trial (``worked``), find none free (``waiting``), lose the
        lock mid-claim (``retry``) or find it finished (``done``)."""
        with claimed(self.storage, self.lock, study, "search", self.owner) as claim:
            led = claim.ledger
            self._limits[study.name] = (int(led.attrs.get(BUDGET_ATTR, 0)), len(led.seeds))
            if claim.trial is not None:
                self.run_claimed(study, claim, stage="search")
                return "worked"
        if claim.lock_lost:
            return "retry"
        if not led.search_done():
            self._recover_now_and_then(study)
            return "waiting"
        best = led.summary()["best"]
        if (best is None and not led.no_search) or not led.seeds:
            self._refresh_parent(study)
            return "done"
        with claimed(self.storage, self.lock, study, "final", self.owner) as claim:
            if claim.trial is not None:
                self.run_claimed(study, claim, stage="final", best=best)
                return "worked"
        if claim.lock_lost:
            return "retry"
        led = claim.ledger
        if not final_done(led.final.get_trials(deepcopy=False), led.seeds, led.max_retries):
            self._recover_now_and_then(study)
            return "waiting"
        self._refresh_parent(study)
        return "done"

    def _recover_now_and_then(self, study: Study) -> None:
        """While waiting on other workers' trials, look for dead ones every few seconds."""
        now = time.monotonic()
        if now - self._last_recovery.get(study.name, 0.0) < min(5.0, lease_duration() / 4):
            return
        self._last_recovery[study.name] = now
        # a lock another worker holds is skipped: its claim recovers first, and queueing behind
        # it here would only delay this worker's next claim
        recover_study(self.storage, self.lock, study.name, self.plan.max_retries, wait=False)

    def _refresh_parent(self, study: Study, led: StudyLedger | None = None) -> None:
        led = led or StudyLedger.load(self.storage, study.name)
        missing = [attr for attr in (BASELINE_ATTR, BASELINES_ATTR) if attr not in led.attrs]
        if missing:  # a ledger from before named baselines has the first only: add the second
            values = dict(zip((BASELINE_ATTR, BASELINES_ATTR), self._baseline(study)))
            for attr in missing:
                led.search.set_user_attr(attr, values[attr])
                led.attrs[attr] = led.search.user_attrs[attr]
        try:
            self.projection.refresh_parent(led, verify=False)
        except Exception as exc:  # the ledger has it; the next start or `rnnbench sync` projects it
            self.progress.log(f"warning: MLflow parent run of {study.name} not updated ({exc})")

    def run_claimed(self, study: Study, claim, *, stage: str, best=None) -> None:
        """Run a claimed trial and put its outcome in the ledger, then in MLflow. An interrupt
        from the end of training until the result is in the ledger is held until then."""
        e, trial = self.e, claim.trial
        if stage == "search":
            seed, label = e.sampler.seed, f"trial {trial.number}"
        else:  # the best configuration, or the fixed one when nothing is searched
            seed = int(trial.user_attrs["seed"])
            label = f"seed {seed}"
        self.progress.trial_started(study.name, stage, trial.number, label)
        counted = False
        try:
            with ExitStack() as defer:
                outcome, run_id, live, task = self._train(study, claim, stage, best, seed, label, defer)
                if outcome.status == "interrupted":
                    self._interrupted(study, claim, stage, outcome)
                    raise KeyboardInterrupt
                counted = self._record(study, claim, stage, outcome, label)
        except KeyboardInterrupt:
            if counted:  # held until the result counted: show it in MLflow, then stop
                self._project(study, stage, trial)
            raise
        if not counted:
            return
        fault("after_ledger_write")
        live_complete = live.close() if live is not None else False
        self._project(study, stage, trial, live=live_complete)
        if outcome.model is not None and run_id is not None:
            self._log_model(study, task, outcome.model, outcome.record, run_id)
        if run_id is not None:
            self._log_files(study, outcome.record, run_id)
        self.progress.trial_ended(outcome.status, outcome.detail)

    def _train(self, study: Study, claim, stage: str, best, seed: int, label: str, defer: ExitStack):
        """(outcome, MLflow run id, live metrics, task) of the claimed trial; ``defer`` holds
        interrupts from the end of training on."""
        e, trial = self.e, claim.trial
        budget = study.budget
        epochs = budget.epochs_limit() if stage == "search" else e.final.epochs or budget.epochs_limit()
        record: dict[str, Any] = {"seed": seed, "worker": self.worker}
        if stage == "final" and best is not None:
            record["best_trial"] = best.number
        params: dict[str, Any] = {}
        try:  # a deterministic error here (a sampled embedding over the budget) is this trial's
            # failure, like one in training: not a lost worker, so never retried
            task = self.task(study)
            params = suggest(trial, e) if stage == "search" else best_hparams(best) if best else {}
            hp = self.hidden.hparams(study, task, params)
        except Exception as exc:
            defer.enter_context(deferred())
            record |= {"hparams": {**study.fixed_hparams, **params}, "started_ms": now_ms()}
            return failed_before_training(exc, record), None, None, None
        run_id = self._open_child(study, claim.ledger, stage, trial, label, hp, seed, best)
        live = LiveMetrics(self.tracker, run_id, self.progress, stale=lambda: claim.lease.lost)
        hooks = _Hooks(live, self.progress, trial if stage == "search" else None, defer)
        monitor = self.tracker.system_metrics(run_id) if run_id else None
        shown = (budget.validations() or "?") if stage == "search" or not e.final.epochs else e.final.epochs
        try:
            outcome = run_trial(
                study,
                task,
                hp,
                stage=stage,
                seed=seed,
                epochs=epochs,
                shown_epochs=shown,
                settings=self.settings,
                hooks=hooks,
                record={**record, "hparams": hp},
            )
        finally:
            if monitor is not None:
                monitor.finish()
        return outcome, run_id, live, task

    def _open_child(self, study, led, stage, trial, label, hp, seed, best) -> str | None:
        arch = study.arch
        tags: dict[str, Any] = {"worker": self.worker}
        if stage == "final":
            tags |= {"seed": seed} | ({"best_trial": best.number} if best is not None else {})
        meta = {"seed": seed, "cell": arch.cell, "layers": arch.layers, "bidirectional": arch.bidirectional}
        try:
            return self.projection.open_child(led, stage, trial, tags, {**hp, **meta})
        except Exception as exc:  # MLflow unreachable: train anyway, the ledger is what counts
            self.progress.log(f"warning: no MLflow run for {label} of {study.name} ({exc}); a sync adds it")
            return None

    def _record(self, study: Study, claim, stage: str, outcome: Outcome, label: str) -> bool:
        """The outcome into the ledger (files first, then the record that names them); False
        when it no longer may count: the trial was recovered while this worker stalled."""
        trial = claim.trial
        if claim.lease.lost:
            self._discarded(study, label, "its lease was lost")
            return False
        fault("record_sigterm")
        if outcome.status == "failed":
            decide_retry(trial, stage, outcome.reason, claim.ledger.max_retries)
        number = trial.number
        if outcome.model is not None:  # a full disk stops here, before any record names the file
            outcome.record["weights"] = save_weights(
                self.plan.home, study.name, outcome.record["seed"], outcome.model, number
            )
        if outcome.items is not None:
            outcome.record["items"] = save_items(
                self.plan.home, study.name, outcome.record["seed"], outcome.items, number
            )
        ledger = claim.ledger.search if stage == "search" else claim.ledger.final
        if not write_result(ledger, trial, outcome.record, _STATES[outcome.status], outcome.value):
            self._discarded(study, label, "another worker recovered it")
            return False
        return True

    def _discarded(self, study: Study, label: str, why: str) -> None:
        self.progress.log(
            f"warning: {label} of {study.name} stalled past its lease ({why}); its result is "
            "discarded and its copy runs instead"
        )

    def _interrupted(self, study: Study, claim, stage: str, outcome: Outcome) -> None:
        """An interrupted trial's record, then FAIL and its copy queued, at once."""
        trial, led = claim.trial, claim.ledger
        try:
            trial.set_user_attr(RECORD, json_safe(outcome.record))
        except optuna.exceptions.UpdateFinishedTrialError:
            return  # recovered meanwhile: its copy is queued already
        with self.lock(study.name):
            fail_quietly(self.storage, trial, led.max_retries)
            recover(self.storage, led.search if stage == "search" else led.final, led.max_retries)
        self._project(study, stage, trial)

    def _log_model(self, study: Study, task, model, record: dict[str, Any], run_id: str) -> None:
        """The final seed's MLflow model; best effort (a sync logs it from the weights file)."""
        try:
            log_model(self.tracker, run_id, task, model, model_card(task, study, record))
        except Exception as exc:
            self.progress.log(
                f"warning: model of {study.name} seed {record['seed']} not logged ({first_line(exc, 200)})"
            )

    def _log_files(self, study: Study, record: dict[str, Any], run_id: str) -> None:
        """The final seed's items and weights as its run's artifacts, so the report and export
        need no run home; best effort (a sync logs them from the files)."""
        for kind in MIRRORED:
            if kind not in record:
                continue
            try:
                project_file(self.tracker, run_id, self.plan.home, kind, record[kind])
            except Exception as exc:
                self.progress.log(
                    f"warning: {kind} of {study.name} seed {record['seed']} not logged ({first_line(exc, 200)})"
                )

    def _project(self, study: Study, stage: str, trial, live: bool = False) -> None:
        """The trial's record into MLflow, then the parent; best effort (the ledger has it all)."""
        led = StudyLedger.load(self.storage, study.name)  # after the tell: the parent sees this trial
        try:
            self.projection.project_trial(led, stage, self.storage.get_trial(trial._trial_id), live=live)
        except Exception as exc:
            self.progress.log(
                f"warning: MLflow run of {study.name} not updated ({exc}); `rnnbench sync` repairs it"
            )
        self._refresh_parent(study, led)

    def _baseline(self, study: Study) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """The task's trivial baseline and its named baselines (``Task.baselines``) on test, for
        the report to show beside the architectures; each is ``{}`` where it failed."""
        trivial: dict[str, float] = {}
        named: dict[str, dict[str, float]] = {}
        try:
            task = self.task(study)
            trivial = {k: float(v) for k, v in task.baseline("test").items()}
            named = {
                name: {k: float(v) for k, v in scores.items()}
                for name, scores in task.baselines("test").items()
            }
        except Exception as exc:  # a plugin's baseline must not cost the finished study
            self.progress.log(f"warning: baseline of {study.task_entry.name} failed: {exc}")
        return trivial, named


# ---------------------------------------------------------------------------- the pool


def run_pool(plan: Plan, workers: int, settings: dict[str, Any], storage, projection, say=print) -> None:
    """Start the workers and watch them: a worker that dies (killed, out of memory, a crash
    outside a trial) has its trial recovered at once and is replaced, a few times at most."""
    gpus = torch.cuda.device_count() if settings["device"] in ("auto", "cuda") else 0
    threads = settings.get("threads") or threads_per_worker(workers)
    ctx = multiprocessing.get_context("spawn")  # fork and torch threads do not mix
    respawns_left = 2 * workers

    def launch(w: int, units: int | None = None):
        worker_settings = dict(settings, threads=threads)
        if gpus:
            worker_settings["device"] = f"cuda:{w % gpus}"
        p = ctx.Process(target=worker_main, args=(plan, w, worker_settings, workers, units), daemon=False)
        p.start()
        return p

    procs: dict[int, Any] = {}
    errors: list[int] = []
    try:
        units = remaining_units(plan, storage)  # read every study once, not once per worker
        for w in range(workers):
            procs[w] = launch(w, units)
        while procs:
            ready = multiprocessing.connection.wait([p.sentinel for p in procs.values()])
            for w, p in list(procs.items()):
                if p.sentinel not in ready:
                    continue
                p.join()
                del procs[w]
                if p.exitcode in (0, 130, -2, -15):
                    if p.exitcode != 0:
                        errors.append(p.exitcode)
                    continue
                lost = recover_all(plan, storage)
                sync_quietly(
                    projection, plan.experiment.name, plan.home, say
                )  # it may have died before projecting
                say(f"worker {w} died (exit code {p.exitcode}); {lost} trial(s) queued again")
                if respawns_left > 0 and not errors:
                    respawns_left -= 1
                    procs[w] = launch(w)
                else:
                    errors.append(p.exitcode)
    except KeyboardInterrupt:
        with deferred():  # a second Ctrl-C must not cut the grace short: no worker outlives the run
            stop_workers(procs.values())
        raise
    if {130, -2, -15} & set(errors):
        raise KeyboardInterrupt
    if errors:
        raise ConfigError(f"{len(errors)} worker(s) kept dying (exit codes {errors}); see their output above")


def stop_workers(procs, grace_s: float = 60.0) -> None:
    """Interrupt every worker (SIGTERM: they may ignore SIGINT, see rnnbench.interrupts), give
    each time to write its interrupted trial, and kill what is left: none outlives the run."""
    procs = [p for p in procs if p.is_alive()]
    for p in procs:
        p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def recover_all(plan: Plan, storage) -> int:
    """Recovery of every study now (a worker of ours just died: its owner is known dead)."""
    lock = LedgerLock(plan.storage_url, plan.home)
    return sum(recover_study(storage, lock, study.name, plan.max_retries) for study in plan.studies)


def worker_main(plan: Plan, worker: int, settings: dict[str, Any], workers: int, units: int | None) -> None:
    stop_once_on_either()
    try:
        Worker(plan, worker, settings, prefix=f"[w{worker}] ", workers=workers, units=units).run()
    except KeyboardInterrupt:
        raise SystemExit(130) from None
