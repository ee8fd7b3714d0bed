"""What a run needs before any worker starts: the run home, the plan of studies, and the stores
(the ledger and MLflow) checked and opened in the right order."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rnnbench.experiment import Experiment, Study, expand
from rnnbench.scheduler import LedgerLock
from rnnbench.sizing import count_parameters, hidden_range, search_corners, solve_hidden_size
from rnnbench.sweep import (
    StoreError,
    check_storage_url,
    is_journal,
    lease_duration,
    open_storage,
    trial_budget,
)
from rnnbench.tracking import Tracker, artifact_root_for, check_usable, create_sqlite_store, tracking_uri_for

HOME_ENV = "RNNBENCH_HOME"


def run_home(home: str | Path | None = None) -> Path:
    return Path(home or os.environ.get(HOME_ENV) or "runs").expanduser().resolve()


@dataclass
class Plan:
    experiment: Experiment
    studies: list[Study]
    skipped: list[tuple[str, str]]
    home: Path
    tracking_uri: str
    storage_url: str | None
    max_retries: int = 3
    device: str | None = None  # --device: overrides the experiment's
    threads: int | None = None  # --threads: torch threads per worker


def prepare(
    experiment: Experiment,
    *,
    home=None,
    tracking_uri=None,
    storage_url=None,
    max_retries: int = 3,
    device: str | None = None,
    threads: int | None = None,
) -> Plan:
    studies, skipped = expand(experiment)
    lease_duration()  # a bad RNNBENCH_LEASE_SECONDS is refused here, before any store is opened
    home = run_home(home)

    uri = tracking_uri or tracking_uri_for(home)
    return Plan(experiment, studies, skipped, home, uri, storage_url, max_retries, device, threads)


def open_stores(plan: Plan, *, create: bool = True):
    """(tracker, storage, lock): every store checked before anything is written locally.

    Order matters: URLs and servers first (one line each, exit 2), then the run home, the
    sqlite store (created whole or not at all) and the journal (a torn last record cut off)."""
    check_storage_url(plan.storage_url)
    default_store = plan.tracking_uri == tracking_uri_for(plan.home)
    if not default_store:
        check_usable(plan.tracking_uri)
    storage = None if is_journal(plan.storage_url) else open_storage(plan.storage_url, plan.home)
    try:
        plan.home.mkdir(parents=True, exist_ok=True)
        (plan.home / "locks").mkdir(exist_ok=True)
    except OSError as exc:
        raise StoreError(
            f"run home {plan.home} is not writable ({exc.strerror or exc}): free some space, fix its "
            "permissions, or pass --home / set RNNBENCH_HOME"
        ) from None
    if default_store and create:
        create_sqlite_store(plan.home)
    if storage is None:
        storage = open_storage(plan.storage_url, plan.home)
    lock = LedgerLock(plan.storage_url, plan.home)
    with lock(f"mlflow-experiment:{plan.experiment.name}"):
        artifacts = plan.home / "artifacts" if default_store else artifact_root_for(plan.tracking_uri, plan.home)
        tracker = Tracker(plan.tracking_uri, plan.experiment.name, artifact_root=artifacts)
    return tracker, storage, lock


def dry_run(plan: Plan) -> list[dict[str, Any]]:
    """The plan as rows: study, trials, seeds, parameter-count range over the searched sizes
    (with a parameter budget: the hidden sizes it solves at the search space's extremes)."""
    rows, tasks = [], {}
    e = plan.experiment
    for study in plan.studies:
        key = json.dumps(study.task_entry.model_dump(), sort_keys=True)
        if key not in tasks:
            tasks[key] = study.make_task()
            tasks[key].setup()
        task = tasks[key]
        corners = search_corners(e)
        if study.parameter_budget:
            sizes = [solve_hidden_size(task, study, study.parameter_budget, hp) for hp in corners]
        else:
            sizes = hidden_range(e)
            corners = [corners[0], corners[-1]] if len(sizes) > 1 else corners[:1]
        counts = [count_parameters(task, study, h, hp) for h, hp in zip(sizes, corners)]
        rows.append(
            {
                "study": study.name,
                "trials": trial_budget(e, study.budget),
                "seeds": e.final.seeds,
                "hidden": "-".join(dict.fromkeys(str(s) for s in sizes)),
                "parameters": "-".join(dict.fromkeys(f"{c:,}" for c in counts)),
            }
        )
    return rows


def skipped_lines(skipped: list[tuple[str, str]]) -> list[str]:
    """One line per reason, naming each study it skipped (a causal task refuses every
    bidirectional variant: one reason, many studies)."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in skipped:
        by_reason.setdefault(reason, []).append(name)
    return [
        f"skipped {names[0]}: {reason}"
        if len(names) == 1
        else f"skipped {len(names)} studies ({', '.join(names)}): {reason}"
        for reason, names in by_reason.items()
    ]
