"""``rnnbench run``: validate, prepare the stores in this process, then let workers run the studies.

Each study: search trials (validation only, pruned on the per-validation primary metric) until
its budget is spent, then its best configuration is retrained with K seeds and scored once on
test. The parts, in the order a run uses them:

- rnnbench.plan: the run home, the plan of studies, the stores opened and checked;
- rnnbench.ledger: the studies in the ledger (fingerprint, budget, seeds), results, summaries;
- rnnbench.scheduler: claims, leases and recovery of dead workers' trials;
- rnnbench.trial: one trial trained, its outcome returned (no store);
- rnnbench.workers: the loop claim -> trial -> ledger -> MLflow, and the process pool;
- rnnbench.projection: MLflow as a projection of the ledger.

This module only sequences them; what it has to say goes to ``say`` (the CLI prints it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from filelock import FileLock, Timeout

from rnnbench.errors import ConfigError
from rnnbench.experiment import Experiment, check_device
from rnnbench.ledger import create_study, experiment_yaml, stored_max_retries, summarize
from rnnbench.plan import Plan, dry_run, open_stores, prepare, run_home, skipped_lines
from rnnbench.preflight import check_experiment
from rnnbench.projection import Projection
from rnnbench.scheduler import recover
from rnnbench.workers import Worker, run_pool, sync_quietly

__all__ = ["Plan", "dry_run", "plan_checked", "prepare", "run_home", "skipped_lines", "start"]


def plan_checked(experiment: Experiment, *, device: str | None = None, **stores) -> tuple[Plan, Any]:
    """The plan of ``experiment`` and its pre-flight (every dataset loaded and every model run
    once, tiny), both before any store exists: bad input is refused with nothing written.
    ``stores``: :func:`rnnbench.plan.prepare`'s keywords (home, tracking_uri, ...)."""
    if device is not None:
        check_device(device)
    plan = prepare(experiment, device=device, **stores)
    return plan, check_experiment(experiment, plan.studies, device=device)


def _quiet(line: str) -> None:
    """The default ``say``: library callers (rnnbench.api) get results, not lines."""


def start(
    plan: Plan, *, workers: int = 1, verbose: bool = False, say: Callable[[str], None] = _quiet
) -> dict[str, Any]:
    """Prepare the stores in this process, then run the studies with ``workers`` processes (in
    this one for 1); ``verbose``: also name the studies the experiment's ``skip_invalid`` skipped
    (asked for, so not news on every run). Returns :func:`rnnbench.ledger.summarize`'s rows."""
    e = plan.experiment
    tracker, storage, lock = open_stores(plan)
    run_lock = FileLock(str(plan.home / "locks" / f"run-{e.name}.lock"))
    try:
        run_lock.acquire(timeout=0)
    except Timeout:
        raise ConfigError(f"experiment {e.name!r} is already running with run home {plan.home}") from None
    try:
        projection = Projection(tracker, storage, lock)
        tracker.describe_experiment(experiment_yaml(e))
        requeued, limits = 0, set()
        for study in plan.studies:
            with lock(study.name):
                if (before := stored_max_retries(storage, study)) not in (None, plan.max_retries):
                    limits.add(before)
                s, f = create_study(plan, storage, study)
                requeued += recover(storage, s, plan.max_retries) + recover(storage, f, plan.max_retries)
        if limits:
            say(
                f"note: --max-retries is {plan.max_retries} now, it was {', '.join(map(str, sorted(limits)))}: "
                "trials already lost keep the decision made then; the new limit applies from now on"
            )
        repaired = projection.sync(e.name)
        for line in skipped_lines(plan.skipped) if verbose else ():
            say(line)
        if requeued:
            say(f"resuming: {requeued} interrupted or lost trial(s) queued again")
        if repaired["projected"] or repaired["duplicates"]:
            say(
                f"repaired MLflow from the ledger: {repaired['projected']} run(s) rewritten, "
                f"{repaired['duplicates']} duplicate(s) removed"
            )
        settings = {
            "device": plan.device or e.device,
            "precision": e.precision,
            "deterministic": e.deterministic,
        }
        if plan.threads:
            settings["threads"] = plan.threads
        if workers <= 1:
            Worker(plan, 0, settings, stores=(tracker, storage, lock)).run()
        else:
            run_pool(plan, workers, settings, storage, projection, say)
        sync_quietly(
            projection, e.name, plan.home, say
        )  # what a worker could not project (MLflow down, a kill)
        return summarize(plan, storage)
    finally:
        run_lock.release()
