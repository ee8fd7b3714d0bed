"""The ledger: the Optuna storage as rnnbench's one record of what was tried and what it scored.

This module is its one writer: studies (created with their fingerprint, budget and seeds), each
trial's result (:func:`write_result`: the whole record, then the state that makes it count), and
the readers every other part shares (:class:`StudyLedger`, :func:`summarize`). MLflow, the CLI
table and the report are derived from it (rnnbench.projection, rnnbench.report).
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from rnnbench.errors import ConfigError
from rnnbench.experiment import Experiment, Study
from rnnbench.plugins import metric_bounds
from rnnbench.stats import MIN_SEEDS, mean_ci
from rnnbench.stops import CAP_REASONS, CONVERGED_REASONS
from rnnbench.sweep import (
    COUNTED,
    DEFAULT_MAX_RETRIES,
    FINAL_SUFFIX,
    LOST_DECISION,
    RECORD,
    RETRIES,
    best_trial,
    load_study,
    make_pruner,
    make_sampler,
    pack_history,
    record_of,
    retry_decision,
    study_counts,
    trial_budget,
    trial_status,
)

if TYPE_CHECKING:
    from rnnbench.plan import Plan


# Study-level user attributes of the search study (the ledger's view of a study).
TAGS_ATTR = "tags"  # cell, layers, bidirectional, task, dataset, metric, direction
SEEDS_ATTR = "final_seeds"  # the final seeds this study must end with
BUDGET_ATTR = "trials"  # counted search trials this study must end with
RETRIES_ATTR = "max_retries"
BASELINE_ATTR = "baseline"  # the task's trivial baseline on test
BASELINES_ATTR = "baselines"  # every named baseline of the task on test (Task.baselines)
TRIVIAL = "trivial"  # the one name Task.baselines gives by default: the trivial baseline again
PARENT_ATTR = "mlflow_parent_run_id"
YAML_ATTR = "experiment_yaml"  # the experiment file as run (defaults filled in)
RUN_ATTR = "mlflow_run_id"  # trial user attribute: the MLflow run it was projected to


@dataclass
class StudyLedger:
    """One study as the ledger has it: attributes, search trials and final trials."""

    name: str
    search: optuna.Study
    final: optuna.Study | None
    attrs: dict[str, Any] = field(default_factory=dict)
    search_trials: list[FrozenTrial] = field(default_factory=list)
    final_trials: list[FrozenTrial] = field(default_factory=list)

    @classmethod
    def load(cls, storage, name: str) -> StudyLedger | None:
        search = load_study(storage, name)
        if search is None:
            return None
        final = load_study(storage, name + FINAL_SUFFIX)
        return cls(
            name,
            search,
            final,
            dict(search.user_attrs),
            search.get_trials(deepcopy=False),
            final.get_trials(deepcopy=False) if final else [],
        )

    @property
    def tags(self) -> dict[str, Any]:
        return self.attrs.get(TAGS_ATTR, {"study": self.name})

    @property
    def direction(self) -> str:
        return self.tags.get("direction", self.search.direction.name.lower())

    @property
    def max_retries(self) -> int:
        return int(self.attrs.get(RETRIES_ATTR, DEFAULT_MAX_RETRIES))

    @property
    def seeds(self) -> list[int]:
        return list(self.attrs.get(SEEDS_ATTR, []))

    @property
    def no_search(self) -> bool:
        """A fixed configuration: no search trials, straight to the final seeds."""
        return int(self.attrs.get(BUDGET_ATTR, 1)) == 0

    def status(self, t: FrozenTrial) -> str:
        return trial_status(t, self.max_retries)

    def search_done(self) -> bool:
        c = study_counts(self.search_trials, self.max_retries)
        budget = int(self.attrs.get(BUDGET_ATTR, 0))
        return c["complete"] + c["pruned"] + c["failed"] >= budget and not (c["running"] or c["waiting"])

    def summary(self) -> dict[str, Any]:
        """Per-state counts, best validation value and final test statistics: the numbers the CLI
        prints and the parent run carries, computed in one place."""
        search = study_counts(self.search_trials, self.max_retries)
        final = study_counts(self.final_trials, self.max_retries)
        best = best_trial(self.search_trials, self.direction)
        seeds = sorted(
            (t for t in self.final_trials if t.state == TrialState.COMPLETE), key=lambda t: t.number
        )
        tests: dict[str, list[float]] = {}
        stops = [(record_of(t) or {}).get("stop_reason") for t in seeds]
        for t in seeds:
            for k, v in ((record_of(t) or {}).get("test") or t.user_attrs.get("test", {})).items():
                tests.setdefault(k, []).append(v)
        metric = self.tags.get("metric")
        if best is not None:
            best_valid = best.value
        elif self.no_search and seeds and metric:  # no search: validation of the seeds themselves
            values = [((record_of(t) or {}).get("best_valid") or {}).get(metric) for t in seeds]
            values = [v for v in values if v is not None]
            best_valid = sum(values) / len(values) if values else None
        else:
            best_valid = None
        return {
            "search": search,
            "final": final,
            "best": best,
            "best_valid": best_valid,
            "seeds": [(record_of(t) or {}).get("seed", t.user_attrs.get("seed")) for t in seeds],
            "seed_values": [t.value for t in seeds],
            "tests": tests,
            # final seeds stopped by patience, and those that reached the cap first
            "converged": sum(r in CONVERGED_REASONS for r in stops),
            "at_cap": sum(r in CAP_REASONS for r in stops),
        }


def create_study(plan: Plan, storage, study: Study):
    """The search and final studies of ``study`` in the ledger, with what every reader needs
    (tags, budget, seeds); call under the study's lock. A changed experiment is refused."""
    e = plan.experiment
    direction = direction_of(study)
    s = optuna.create_study(
        study_name=study.name,
        storage=storage,
        sampler=make_sampler(e),
        pruner=make_pruner(e, study.budget),
        direction=direction,
        load_if_exists=True,
    )
    f = optuna.create_study(
        study_name=study.name + FINAL_SUFFIX,
        storage=storage,
        sampler=optuna.samplers.RandomSampler(seed=0),  # only enqueued trials run here
        direction=direction,
        load_if_exists=True,
    )
    metric = primary_metric(study).name
    for ledger, name in ((s, f"valid {metric}"), (f, f"test {metric}")):  # the dashboard's axis labels
        if ledger.metric_names != [name]:
            with warnings.catch_warnings():  # set_metric_names is marked experimental
                warnings.simplefilter("ignore")
                ledger.set_metric_names([name])
    attrs = s.user_attrs
    parts = fingerprint_parts(plan, study)
    check_fingerprint(study, attrs, parts)
    seeds = final_seeds(e)
    stored_seeds = attrs.get(SEEDS_ATTR)
    if stored_seeds and seeds[: len(stored_seeds)] != stored_seeds:
        raise ConfigError(
            f"study {study.name} has final seeds {stored_seeds}; final.seeds can grow (more seeds are "
            "added) but not shrink or change. Rename the experiment (name:) or use another run home."
        )
    wanted = {
        FINGERPRINT_ATTR: parts,
        "search_space": {k: v.model_dump() for k, v in e.search.items()},
        "budget": study.budget.model_dump(),
        TAGS_ATTR: {
            **study_tags(study),
            "metric": primary_metric(study).name,
            "direction": direction,
        },
        BUDGET_ATTR: trial_budget(e, study.budget),
        SEEDS_ATTR: seeds,
        RETRIES_ATTR: plan.max_retries,
        YAML_ATTR: experiment_yaml(e),
    }
    for key, value in wanted.items():
        if attrs.get(key) != value:
            s.set_user_attr(key, value)
    final_attrs = {
        "stage": "final",
        "search_study": study.name,
        "value": f"test {wanted[TAGS_ATTR]['metric']}",
    }
    for key, value in final_attrs.items():  # optuna-dashboard lists these beside the study
        if f.user_attrs.get(key) != value:
            f.set_user_attr(key, value)
    if attrs.get("stage") != "search":
        s.set_user_attr("stage", "search")
    return s, f


# Raise when a change alters what a trial measures: studies stored under another version are
# refused on resume instead of silently mixing numbers measured two ways.
PROTOCOL_VERSION = 2  # 2: charlm evaluates one stream; final seeds apart from the search seed


FINGERPRINT_ATTR = "fingerprint_parts"


FINAL_SEED_BASE = 10_000  # final seeds: FINAL_SEED_BASE + i, never the search's sampler.seed


def stored_max_retries(storage, study: Study) -> int | None:
    """The --max-retries a study last ran with (None: a new study)."""
    s = load_study(storage, study.name)
    value = s.user_attrs.get(RETRIES_ATTR) if s is not None else None
    return None if value is None else int(value)


def experiment_yaml(e: Experiment) -> str:
    """The experiment as run, every default filled in: what reproduces it from MLflow alone."""
    return yaml.safe_dump(e.model_dump(mode="json"), sort_keys=False)


def final_seeds(e: Experiment) -> list[int]:
    """K seeds disjoint from the search seed: final seed i must not replay the winning trial."""
    seeds, candidate = [], FINAL_SEED_BASE
    while len(seeds) < e.final.seeds:
        if candidate != e.sampler.seed:
            seeds.append(candidate)
        candidate += 1
    return seeds


def fingerprint_parts(plan: Plan, study: Study) -> dict[str, str]:
    """What must not change under a resumed study, one short hash per key, so a refusal can say
    which key changed. final.seeds is not here: it may grow (see create_study)."""
    e = plan.experiment
    task = study.make_task()
    resolved = task.options.model_dump() if hasattr(task, "options") else {}
    parts = {
        "protocol": PROTOCOL_VERSION,
        "search": {k: v.model_dump() for k, v in sorted(e.search.items())},
        "fixed": study.fixed_hparams,
        "budget": study.budget.model_dump(),
        "sampler": e.sampler.model_dump(),
        "pruner": e.pruner.model_dump(),
        # the budget has its own key; architectures only picks which studies exist (leaving both
        # out keeps older studies' task hash)
        "task": {
            **study.task_entry.model_dump(exclude={"parameter_budget", "budget", "margin", "architectures"}),
            "resolved_options": resolved,
        },
        "parameter_budget": study.parameter_budget,
        "final.epochs": e.final.epochs,
        "precision": e.precision,
        "deterministic": e.deterministic,
        "device": plan.device or e.device,
    }
    return {
        k: hashlib.sha256(json.dumps(v, sort_keys=True, default=str).encode()).hexdigest()[:12]
        for k, v in parts.items()
    }


def check_fingerprint(study: Study, attrs: dict[str, Any], parts: dict[str, str]) -> None:
    advice = "Rename the experiment (name:) or use another run home."
    stored = attrs.get(FINGERPRINT_ATTR)
    if stored is None and "fingerprint" in attrs:
        raise ConfigError(
            f"study {study.name} was run by an earlier rnnbench whose measurement protocol differs "
            f"(e.g. charlm evaluation, final seeds); resuming it would mix two protocols. {advice}"
        )
    if stored is None:
        return
    changed = [k for k in parts if stored.get(k) != parts[k]]
    if changed:
        raise ConfigError(
            f"study {study.name} already exists with a different {', '.join(changed)}; mixing them "
            f"would make its trials incomparable. {advice}"
        )


def study_tags(study: Study) -> dict[str, Any]:
    """What identifies a study on its MLflow runs (the study run and each trial's)."""
    arch = study.arch
    return {
        "study": study.name,
        "cell": arch.cell,
        "layers": arch.layers,
        "bidirectional": arch.bidirectional,
        "task": study.task_entry.name,
        "dataset": study.task_entry.dataset,
        # a report-time choice (verdicts), so not part of the fingerprint
        **({"margin": study.task_entry.margin} if study.task_entry.margin is not None else {}),
    }


def primary_metric(study: Study):
    """The study's primary metric, from an instance: a task's options may change it (memory: copy)."""
    return study.make_task().primary_metric


def direction_of(study: Study) -> str:
    return primary_metric(study).direction


def json_safe(value: Any) -> Any:
    """Plain JSON for the ledger: NaN/inf become None (JSON has neither), numpy scalars floats."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return number if math.isfinite(number) else None


def remaining_units(plan: Plan, storage) -> int:
    """Search trials and final seeds the ledger still lacks, over every study of the plan (what
    the progress line counts down; all of them on a first run)."""
    left = 0
    for study in plan.studies:
        budget, seeds = trial_budget(plan.experiment, study.budget), plan.experiment.final.seeds
        led = StudyLedger.load(storage, study.name)
        if led is not None:
            search = study_counts(led.search_trials, plan.max_retries)
            final = study_counts(led.final_trials, plan.max_retries)
            budget -= sum(search[k] for k in COUNTED)
            seeds -= sum(final[k] for k in COUNTED)
        left += max(budget, 0) + max(seeds, 0)
    return left


def summarize(plan: Plan, storage) -> dict[str, Any]:
    """Per study, from the ledger: trials by state, best validation value, final seeds (what the
    CLI prints; the parent runs and the report carry the same numbers, computed the same way)."""
    rows = []
    for study in plan.studies:
        led = StudyLedger.load(storage, study.name)
        s = led.summary()
        bounds = metric_bounds(study.task_entry.name, led.tags.get("metric", ""))
        mean, low, high = mean_ci(s["seed_values"], min_n=MIN_SEEDS, bounds=bounds)
        rows.append(
            {
                "study": study.name,
                **{k: s["search"][k] for k in ("complete", "pruned", "failed", "lost", "interrupted")},
                "best_valid": s["best_valid"] if s["best_valid"] is not None else math.nan,
                "seeds": len(s["seeds"]),
                "converged": s["converged"],
                "at_cap": s["at_cap"],
                "test_mean": mean,
                "test_ci95": (low, high),
                "seed_values": s["seed_values"],
                "metric": led.tags.get("metric", primary_metric(study).name),
                "direction": led.tags.get("direction", direction_of(study)),
            }
        )
    return {"studies": rows, "home": str(plan.home), "tracking_uri": plan.tracking_uri}


def write_result(ledger: optuna.Study, trial, record: dict[str, Any], state: TrialState, value=None) -> bool:
    """A finished trial into the ledger, in two writes: its whole record (JSON-safe), then the
    state that makes it count. False when recovery failed the trial meanwhile (its worker stalled
    past its lease): nothing is written, the result is discarded and the trial's copy runs."""
    try:
        trial.set_user_attr(RECORD, pack_history(json_safe(record)))
        if state == TrialState.COMPLETE:
            ledger.tell(trial, value)
        else:
            ledger.tell(trial, state=state)
    except (optuna.exceptions.UpdateFinishedTrialError, ValueError, RuntimeError):
        return False  # Optuna's answers to writing a finished trial
    return True


def decide_retry(trial, stage: str, reason: str, max_retries: int) -> None:
    """A final seed's transient failure (out of memory) is retried within the retry limit: the
    decision goes into the ledger now, before the tell, with the limit in force now."""
    decision = retry_decision(stage, reason, int(trial.user_attrs.get(RETRIES, 0)), max_retries)
    if decision is not None:
        try:
            trial.set_user_attr(LOST_DECISION, decision)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # recovered by another worker meanwhile: its copy runs, this result is discarded


def fail_quietly(storage, trial, max_retries: int) -> None:
    """FAIL a trial whose worker cannot finish it: lost, and queued again while its
    configuration has retries left (decided now, with the limit in force now)."""
    try:
        spent = int(trial.user_attrs.get(RETRIES, 0)) >= max_retries
        storage.set_trial_user_attr(trial._trial_id, LOST_DECISION, "counted" if spent else "retry")
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except Exception:
        pass  # already finished, or the ledger is gone: its lease expires instead
