"""MLflow as a projection of the ledger: every MLflow write is derived from the Optuna storage.

A run's identity is its ledger coordinates (study, stage, trial number), carried as tags; the
ledger also remembers the MLflow run id it was given. Projecting a trial writes the same params,
tags, metric points (same step, timestamp and value) and artifacts every time, so projecting
twice is harmless; :meth:`Projection.sync` projects every finished trial whose run is missing or
stale and refreshes every parent run, which repairs whatever a crash left half-done.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from rnnbench.errors import DataError
from rnnbench.ledger import (
    BASELINE_ATTR,
    BASELINES_ATTR,
    PARENT_ATTR,
    RUN_ATTR,
    TRIVIAL,
    YAML_ATTR,
    StudyLedger,
)
from rnnbench.models import read_recorded
from rnnbench.plugins import metric_bounds
from rnnbench.scheduler import final_done
from rnnbench.stats import MIN_SEEDS, mean_ci
from rnnbench.sweep import (
    RETRY_OF,
    failure_of,
    load_study,
    record_of,
    study_names,
)
from rnnbench.tracking import SUMMARY_STEP

_MLFLOW_STATUS = {
    "complete": "FINISHED",
    "pruned": "FINISHED",
    "failed": "FAILED",
    "lost": "KILLED",
    "interrupted": "KILLED",
}


def _study_done(led: StudyLedger) -> bool:
    """Nothing left to run: the search is spent and every final seed has its result."""
    if not led.search_done():
        return False
    runnable = led.summary()["best"] is not None or led.no_search
    return not runnable or not led.seeds or final_done(led.final_trials, led.seeds, led.max_retries)


def parent_name(study_name: str) -> str:
    """A study's MLflow run name: ``<task-label>/<architecture>`` (the experiment is the MLflow
    experiment already; the architecture alone repeats once per task)."""
    return study_name.split("/", 1)[-1]


def child_name(study_name: str, stage: str, number: int, seed: Any) -> str:
    """``<task-label>/<architecture>/trial-<n>`` for a search trial, ``…/seed-<s>`` for a final seed."""
    return f"{parent_name(study_name)}/" + (f"trial-{number}" if stage == "search" else f"seed-{seed}")


def _child_name_of(led: StudyLedger, stage: str, t: FrozenTrial) -> str:
    return child_name(led.name, stage, t.number, (record_of(t) or {}).get("seed", t.user_attrs.get("seed")))


class Projection:
    """Writes the ledger's state into MLflow, idempotently."""

    def __init__(self, tracker, storage, lock):
        self.tracker, self.storage, self.lock = tracker, storage, lock

    # ------------------------------------------------------------------ parent runs

    def parent_id(self, led: StudyLedger, index: dict | None = None, verify: bool = True) -> str:
        """The study's parent run: the one the ledger names, else the one tagged with its
        coordinates, else a new one (under the study's lock, so machines never make two).
        ``verify=False`` trusts the ledger's id (a worker's hot path; a sync verifies)."""
        run_id = led.attrs.get(PARENT_ATTR)
        if run_id and (not verify or self.tracker.get_run(run_id) is not None):
            return run_id
        with self.lock(led.name + "::mlflow-parent"):
            led.attrs = dict(load_study(self.storage, led.name).user_attrs)
            run_id = led.attrs.get(PARENT_ATTR)
            if run_id and self.tracker.get_run(run_id) is not None:
                return run_id
            found = (index if index is not None else self.tracker.runs_by_key()).get(
                (led.name, "study", None)
            )
            if found:
                run_id = found[0].info.run_id
            else:
                tags = {**led.tags, "stage": "study", "status": "running"}
                # the study's run starts with its first trial (now, or in the ledger on a rebuild)
                run_id = self.tracker.start_run(parent_name(led.name), tags, start_time=_first_start(led))
            if led.attrs.get(YAML_ATTR):  # reproducible from MLflow alone
                self.tracker.log_text(run_id, led.attrs[YAML_ATTR], "experiment.yaml")
            led.search.set_user_attr(PARENT_ATTR, run_id)
            led.attrs[PARENT_ATTR] = run_id
            return run_id

    def refresh_parent(self, led: StudyLedger, index: dict | None = None, verify: bool = True) -> None:
        """Study-level numbers on the parent run, recomputed from the ledger every time."""
        run_id = self.parent_id(led, index, verify)
        if not _study_done(led):
            run = self.tracker.get_run(run_id)
            if run is not None and run.info.status != "RUNNING":
                # a finished parent and a snapshot that says otherwise: judge by the ledger now (a
                # sync's snapshot may predate the last trial), never reopen from a stale one
                led = StudyLedger.load(self.storage, led.name) or led
        s = led.summary()
        metrics: dict[str, float] = {
            "trials_complete": s["search"]["complete"],
            "trials_pruned": s["search"]["pruned"],
            "trials_failed": s["search"]["failed"],
            "trials_lost": s["search"]["lost"],
            "trials_interrupted": s["search"]["interrupted"],
            "final_seeds": len(s["seeds"]),
            "final_failed": s["final"]["failed"],
            "final_converged": s["converged"],
            "final_at_cap": s["at_cap"],
        }
        tags: dict[str, Any] = {}
        best = s["best"]
        search_done = led.search_done()
        metrics["best_valid"] = s["best_valid"]
        if best is not None:
            summary = (record_of(best) or {}).get("summary") or best.user_attrs.get("summary", {})
            metrics |= {k: v for k, v in summary.items() if isinstance(v, (int, float))}
            tags["best_trial"] = best.number
            if search_done:  # MLflow params are write-once: only the final best configuration
                self.tracker.log_params(run_id, {f"best.{k}": v for k, v in best_hparams(best).items()})
        for name, values in s["tests"].items():
            # no interval from 2 seeds; none past what the metric can take
            bounds = metric_bounds(led.tags.get("task"), name)
            mean, low, high = mean_ci(values, min_n=MIN_SEEDS, bounds=bounds)
            metrics |= {
                f"test_{name}_mean": mean,
                f"test_{name}_ci95_low": low,
                f"test_{name}_ci95_high": high,
            }
        metrics |= {f"baseline_test_{k}": v for k, v in led.attrs.get(BASELINE_ATTR, {}).items()}
        metrics |= {
            f"baseline_{name}_test_{k}": v
            for name, scores in led.attrs.get(BASELINES_ATTR, {}).items()
            if name != TRIVIAL  # the default's one name: already logged just above
            for k, v in scores.items()
        }
        metrics = {k: float(v) for k, v in metrics.items() if v is not None and not math.isnan(float(v))}
        runnable = best is not None or led.no_search
        done = _study_done(led)
        if not done:
            tags["status"] = "running"
        else:
            tags["status"] = "complete" if runnable else "no_completed_trial"
        if led.seeds:
            tags["final_seeds"] = ",".join(str(seed) for seed in led.seeds)
        run = self.tracker.get_run(run_id)
        logged = run.data.metrics if run is not None else {}
        # only what changed: a refresh that finds nothing new adds no point to any chart
        name = parent_name(led.name)
        renamed = name if run is not None and run.data.tags.get("mlflow.runName") != name else None
        # stamped with the ledger's last event, not the clock: two refreshes of one ledger state
        # write the same points, and an older state never looks newer than what is logged
        stamp = _last_end(led) or _first_start(led)
        self.tracker.log_batch(
            run_id,
            {k: v for k, v in metrics.items() if logged.get(k) != v},
            tags,
            timestamp=stamp,
            run_name=renamed,
        )
        if done and run is not None and run.info.status == "RUNNING":
            self.tracker.end_run(run_id, "FINISHED", end_time=_last_end(led))
        elif not done and run is not None and run.info.status != "RUNNING":
            self.tracker.reopen(run_id)  # e.g. final seeds added to a finished study

    # ------------------------------------------------------------------ child runs

    def open_child(self, led: StudyLedger, stage: str, trial, tags: dict, params: dict) -> str:
        """The MLflow run of a trial that starts now; its id goes into the ledger at once."""
        run_id = self.tracker.start_run(
            child_name(led.name, stage, trial.number, tags.get("seed")),
            {**led.tags, **tags, "stage": stage, "trial": trial.number, "status": "running"},
            self.parent_id(led, verify=False),
        )
        trial.set_user_attr(RUN_ATTR, run_id)
        self.tracker.log_params(run_id, params)
        return run_id

    def project_trial(
        self, led: StudyLedger, stage: str, t: FrozenTrial, index: dict | None = None, live: bool = False
    ) -> str:
        """Write a finished trial's ledger record to its MLflow run (creating it if missing).

        ``live=True``: its worker already logged the params and every epoch to this run (the
        same points), so only what the end adds is written."""
        status = led.status(t)
        record = record_of(t) or {}
        run_id = self._child_id(led, stage, t, index)
        reason, message = failure_of(t, status)
        seed = record.get("seed", t.user_attrs.get("seed"))
        tags: dict[str, Any] = {
            **led.tags,
            "stage": stage,
            "trial": t.number,
            "status": status,
            "projected": status,
        }
        for key, value in (
            ("seed", seed),
            ("failure_reason", reason),
            ("failure_message", (message or "")[:500] or None),
            ("worker", record.get("worker")),
            ("stop_reason", record.get("stop_reason")),
            ("best_trial", record.get("best_trial")),
            ("retry_of", t.user_attrs.get(RETRY_OF)),
        ):
            if value is not None:
                tags[key] = value
        started = record.get("started_ms") or _ms(t.datetime_start)
        finished = record.get("finished_ms") or _ms(t.datetime_complete)
        if not live:
            hparams = record.get("hparams") or dict(t.params)
            params = {**hparams, **_meta_params(led.tags, seed)}
            self.tracker.log_params(run_id, params)
            if record.get("parameters"):
                self.tracker.log_metrics(run_id, record["parameters"], step=SUMMARY_STEP, timestamp=started)
            for entry in record.get("history", []):
                self.tracker.log_metrics(
                    run_id, entry["metrics"], step=entry["epoch"], timestamp=entry["time_ms"]
                )
        for filename, text in (record.get("artifacts") or {}).items():
            self.tracker.log_text(run_id, text, filename)
        if record.get("data"):
            self._log_dataset(led, run_id, record["data"])
        final_metrics = {f"best_valid_{k}": v for k, v in (record.get("best_valid") or {}).items()}
        counts = record.get("parameters") or {}  # logged at the start: once is enough
        final_metrics |= {k: v for k, v in (record.get("summary") or {}).items() if k not in counts}
        final_metrics |= {f"test_{k}": v for k, v in (record.get("test") or {}).items()}
        # one batch, tags included: "projected" lands with the metrics or not at all. Step 0, beside
        # the parameter counts: one value per run (a bar in MLflow's charts, not a one-dot line);
        # the per-epoch series start at step 1.
        self.tracker.log_batch(
            run_id, final_metrics, tags, timestamp=finished, step=SUMMARY_STEP,
            run_name=child_name(led.name, stage, t.number, seed),  # stores named before the task label
        )  # fmt: skip
        self.tracker.end_run(run_id, _MLFLOW_STATUS[status], end_time=finished)
        return run_id

    def _log_dataset(self, led: StudyLedger, run_id: str, describe: dict[str, Any]) -> None:
        task, dataset = led.tags.get("task", "?"), led.tags.get("dataset", "?")
        source = describe.get("data_path") or (
            "synthetic: generated in code by the task"
            if dataset == "synthetic"
            else f"rnnbench dataset {dataset}"
        )
        self.tracker.log_dataset(run_id, f"{task}-{dataset}", str(source), describe, "train")

    def _child_id(self, led: StudyLedger, stage: str, t: FrozenTrial, index: dict | None) -> str:
        run_id = t.user_attrs.get(RUN_ATTR)
        if run_id and self.tracker.get_run(run_id) is not None:
            return run_id
        found = (index if index is not None else self.tracker.runs_by_key()).get(
            (led.name, stage, str(t.number))
        )
        if found:  # the worker died after creating the run, before the ledger learnt its id
            return found[0].info.run_id
        return self.tracker.start_run(
            _child_name_of(led, stage, t),
            {**led.tags, "stage": stage, "trial": t.number, "status": "running"},
            self.parent_id(led, index),
            start_time=_ms(t.datetime_start),
        )

    # ------------------------------------------------------------------ repair

    def sync(self, experiment: str) -> dict[str, int]:
        """Make MLflow agree with the ledger: project what is missing or stale, drop duplicates,
        refresh every parent. Safe to run at any time, from any machine, as often as wanted."""
        index = self.tracker.runs_by_key()
        done = {"projected": 0, "duplicates": 0, "parents": 0}
        for name in study_names(self.storage, experiment):
            led = StudyLedger.load(self.storage, name)
            if led is None or not (led.search_trials or led.final_trials):
                continue  # not started: its run starts with its first trial
            for stage, trials in (("search", led.search_trials), ("final", led.final_trials)):
                for t in trials:
                    if t.state in (TrialState.RUNNING, TrialState.WAITING):
                        continue  # a live worker's, or not started
                    runs = index.get((name, stage, str(t.number)), [])
                    keep = t.user_attrs.get(RUN_ATTR)
                    if len(runs) > 1:  # two runs for one trial: keep the ledger's (or the first)
                        ids = [r.info.run_id for r in runs]
                        keep = keep if keep in ids else ids[0]
                        for r in runs:
                            if r.info.run_id != keep:
                                self.tracker.delete_run(r.info.run_id)
                                done["duplicates"] += 1
                        runs = [r for r in runs if r.info.run_id == keep]
                    status = led.status(t)
                    fresh = (
                        runs
                        and runs[0].data.tags.get("rnnbench.projected") == status
                        and runs[0].info.status == _MLFLOW_STATUS[status]
                    )
                    if not fresh:
                        self.project_trial(led, stage, t, index)
                        done["projected"] += 1
                    elif runs[0].info.run_name != (named := _child_name_of(led, stage, t)):
                        self.tracker.rename(runs[0].info.run_id, named)  # a store named before
            self.refresh_parent(led, index)
            done["parents"] += 1
        return done


# The run-home files a final seed's record names, mirrored as artifacts of its MLflow run (on a
# tracking server: its artifact store), so the report, export and serving work from any machine,
# also after the run home is gone (a Slurm job's $TMPDIR): record key -> (folder, file name).
MIRRORED = {"items": ("items", "items.parquet"), "weights": ("weights", "weights.pt")}


def mirrored_path(kind: str) -> str:
    folder, name = MIRRORED[kind]
    return f"{folder}/{name}"


def project_file(tracker, run_id: str, home: Path, kind: str, ref: dict[str, Any]) -> bool:
    """A final seed's ``kind`` file (items, weights) as its run's artifact. True when logged; False
    when the run has it already, so projecting twice is harmless. Raises DataError when the run
    home's file is missing or changed."""
    if tracker.has_artifact(run_id, mirrored_path(kind)):
        return False
    data = read_recorded(home, ref, kind)
    folder, name = MIRRORED[kind]
    with tempfile.TemporaryDirectory() as tmp:  # the artifact's name, not the run home's
        path = Path(tmp) / name
        path.write_bytes(data)
        tracker.log_file(run_id, path, folder)
    return True


def project_items(tracker, run_id: str, home: Path, ref: dict[str, Any]) -> bool:
    """:func:`project_file` of a final seed's per-item outcomes (see rnnbench.items)."""
    return project_file(tracker, run_id, home, "items", ref)


def repair_files(tracker, storage, experiment: str, home: Path, warn=print, index: dict | None = None) -> int:
    """Log the mirrored files (items, weights) of every finished final seed whose run lacks them (a
    worker killed before logging them, a deleted artifact, a rebuilt store); returns how many were
    logged. Files this run home lacks (copied without them, or another machine's) are one warning
    per kind, never an error."""
    index = tracker.runs_by_key() if index is None else index
    logged, unreadable = 0, {kind: [] for kind in MIRRORED}
    for name in study_names(storage, experiment):
        led = StudyLedger.load(storage, name)
        for t in led.final_trials if led is not None else ():
            record = record_of(t) or {}
            runs = index.get((name, "final", str(t.number)), [])
            if record.get("status") != "complete" or not runs:
                continue
            for kind in MIRRORED:
                if kind not in record:
                    continue
                try:
                    logged += project_file(tracker, runs[0].info.run_id, home, kind, record[kind])
                except DataError as exc:
                    unreadable[kind].append(str(exc))
    consequence = {
        "items": "paired statistics leave those seeds out",
        "weights": "export those seeds from the run home that has them",
    }
    for kind, errors in unreadable.items():
        if errors:
            more = f" and {len(errors) - 1} more" if len(errors) > 1 else ""
            warn(f"warning: {kind} not logged to MLflow: {errors[0]}{more}; {consequence[kind]}")
    return logged


def best_hparams(t: FrozenTrial) -> dict[str, Any]:
    """The configuration a trial trained (searched values and, from its record, the rest)."""
    return (record_of(t) or {}).get("hparams") or dict(t.params)


def _meta_params(tags: dict[str, Any], seed) -> dict[str, Any]:
    out = {k: tags[k] for k in ("cell", "layers", "bidirectional") if k in tags}
    if seed is not None:
        out["seed"] = seed
    return out


def _first_start(led: StudyLedger) -> int | None:
    starts = [_ms(t.datetime_start) for t in (*led.search_trials, *led.final_trials) if t.datetime_start]
    return min(starts) if starts else None


def _last_end(led: StudyLedger) -> int | None:
    ends = [_ms(t.datetime_complete) for t in (*led.search_trials, *led.final_trials) if t.datetime_complete]
    return max(ends) if ends else None


def _ms(when) -> int | None:
    return int(when.timestamp() * 1000) if when is not None else None
