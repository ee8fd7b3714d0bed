"""The three views of one experiment, for the fault tests: the ledger (Optuna), MLflow, and the
report's tidy table. After any fault they must agree exactly."""

from __future__ import annotations

import time
from collections import Counter

from rnnbench.ledger import StudyLedger
from rnnbench.sweep import study_names


def ledger_view(storage, experiment: str) -> dict[tuple, tuple]:
    """(study, stage, trial number) -> (status, primary value or None) for every finished trial."""
    out = {}
    for name in study_names(storage, experiment):
        led = StudyLedger.load(storage, name)
        for stage, trials in (("search", led.search_trials), ("final", led.final_trials)):
            for t in trials:
                status = led.status(t)
                if status in ("running", "waiting"):
                    continue
                out[(name, stage, t.number)] = (status, round(t.value, 9) if t.value is not None else None)
    return out


def wait_for_lost_trial(storage_url, home, experiment: str, timeout: float) -> None:
    """Return once a trial of ``experiment`` counts as lost in the ledger (another worker found its
    lease expired), for a stall that must outlast its recovery however slow the machine is."""
    from rnnbench.sweep import open_storage

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(
            status == "lost"
            for status, _ in ledger_view(open_storage(storage_url, home), experiment).values()
        ):
            return
        time.sleep(0.5)
    raise TimeoutError(f"no trial of {experiment} was recovered as lost within {timeout} s")


def mlflow_view(client, experiment: str) -> dict[tuple, tuple]:
    exp = client.get_experiment_by_name(experiment)
    out, seen = {}, Counter()
    for run in client.search_runs([exp.experiment_id], max_results=5000):
        tags, metrics = run.data.tags, run.data.metrics
        stage = tags.get("rnnbench.stage")
        if stage not in ("search", "final"):
            continue
        key = (tags["rnnbench.study"], stage, int(tags["rnnbench.trial"]))
        seen[key] += 1
        metric = _metric(client, exp.experiment_id, tags["rnnbench.study"])
        name = f"best_valid_{metric}" if stage == "search" else f"test_{metric}"
        status = tags["rnnbench.status"]
        value = metrics.get(name) if status == "complete" else None
        out[key] = (status, round(value, 9) if value is not None else None)
    assert max(seen.values(), default=1) == 1, f"a trial has two MLflow runs: {seen.most_common(3)}"
    return out


_METRICS: dict[str, str] = {}


def _metric(client, experiment_id: str, study: str) -> str:
    if study not in _METRICS:
        runs = client.search_runs(
            [experiment_id], f"tags.`rnnbench.study` = '{study}' and tags.`rnnbench.stage` = 'study'"
        )
        _METRICS[study] = runs[0].data.tags["rnnbench.metric"]
    return _METRICS[study]


def report_view(client, experiment: str) -> dict[tuple, tuple]:
    from rnnbench.report.collect import collect

    df = collect(client, experiment).runs
    out = {}
    for row in df[df["stage"].isin(["search", "final"])].itertuples():
        metric = _metric(client, client.get_experiment_by_name(experiment).experiment_id, row.study)
        name = f"best_valid_{metric}" if row.stage == "search" else f"test_{metric}"
        value = getattr(row, name, None) if row.status == "complete" else None
        out[(row.study, row.stage, int(row.trial))] = (
            row.status,
            round(float(value), 9) if value is not None else None,
        )
    return out


def parents_agree(client, storage, experiment: str) -> None:
    """Each parent run carries the ledger's counts and seeds."""
    exp = client.get_experiment_by_name(experiment)
    for name in study_names(storage, experiment):
        s = StudyLedger.load(storage, name).summary()
        runs = client.search_runs(
            [exp.experiment_id], f"tags.`rnnbench.study` = '{name}' and tags.`rnnbench.stage` = 'study'"
        )
        assert len(runs) == 1, f"{name}: {len(runs)} parent runs"
        m = runs[0].data.metrics
        for state in ("complete", "pruned", "failed", "lost"):
            assert m[f"trials_{state}"] == s["search"][state], (name, state)
        assert m["final_seeds"] == len(s["seeds"]), name
        assert runs[0].info.status == "FINISHED", name
