"""Optuna: storages, samplers, pruners, trial claims, and recovery of interrupted trials.

Budget rule: a study is done when its *counted* trials reach ``budget.trials``. Completed, pruned
and failed trials count (each is one configuration tried: a configuration that diverges or runs
out of memory has had its chance). Trials cut off by a kill or Ctrl-C do not count: they are
marked failed with ``interrupted=True`` and their exact configuration is queued again.
Claims happen under a file lock, so N workers on one machine run exactly the budget.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from filelock import FileLock
from optuna.trial import TrialState

from rnnbench.errors import ConfigError
from rnnbench.experiment import CategoricalParam, Experiment, FloatParam, IntParam, Study

optuna.logging.set_verbosity(optuna.logging.WARNING)

INTERRUPTED = "interrupted"
FINAL_SUFFIX = "::final"


def open_storage(url: str | None, home: Path) -> optuna.storages.BaseStorage:
    """The embedded JournalStorage file (safe for processes on one machine), or an RDB URL."""
    if url is None or url.startswith("journal:") or "://" not in url:
        path = Path(url.removeprefix("journal:")) if url else home / "optuna.journal"
        path.parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite"):
        raise ConfigError(
            "SQLite is not safe for parallel Optuna workers: use the default journal file or PostgreSQL"
        )
    from optuna.storages import RDBStorage, RetryFailedTrialCallback

    # Heartbeats let workers on other machines see a dead worker's trial and retry it.
    return RDBStorage(
        url,
        heartbeat_interval=60,
        grace_period=180,
        failed_trial_callback=RetryFailedTrialCallback(max_retry=3),
    )


class _AskTellGridSampler(optuna.samplers.GridSampler):
    """GridSampler without its end-of-grid ``study.stop()``, which raises outside ``optimize``
    (rnnbench asks and tells); the trial budget already stops at the number of grid points."""

    def after_trial(self, study, trial, state, values) -> None:
        return None


def make_sampler(
    experiment: Experiment, worker: int = 0, trials_so_far: int = 0
) -> optuna.samplers.BaseSampler:
    """A sampler seeded from the study's trial count: each ask draws a fresh point (a sampler
    rebuilt with a fixed seed proposes its first point again every time), a resumed run proposes
    what an uninterrupted one would, and every architecture starts from the same random points.
    Workers get distinct streams."""
    spec = experiment.sampler
    seed = spec.seed + trials_so_far + 1_000_003 * worker
    if spec.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.name == "grid":
        space = {k: p.choices for k, p in experiment.search.items() if isinstance(p, CategoricalParam)}
        # one seed for every ask and worker: it shuffles the grid, and trial n takes point n of it
        return _AskTellGridSampler(space, seed=spec.seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(experiment: Experiment) -> optuna.pruners.BasePruner:
    spec = experiment.pruner
    if spec.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=spec.warmup_epochs)
    if spec.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=experiment.budget.epochs)
    return optuna.pruners.NopPruner()


def trial_budget(experiment: Experiment) -> int:
    """Trials per study; a grid has at most as many points as it has combinations."""
    if experiment.sampler.name == "grid" and experiment.search:
        size = 1
        for p in experiment.search.values():
            size *= len(p.choices)
        return min(experiment.budget.trials, size)
    return experiment.budget.trials


def suggest(trial: optuna.Trial, experiment: Experiment) -> dict[str, Any]:
    params = {}
    for name, p in experiment.search.items():
        if isinstance(p, IntParam):
            params[name] = trial.suggest_int(name, p.low, p.high, log=p.log, step=p.step)
        elif isinstance(p, FloatParam):
            params[name] = trial.suggest_float(name, p.low, p.high, log=p.log)
        else:
            params[name] = trial.suggest_categorical(name, p.choices)
    return params


def counted(trials) -> tuple[int, int]:
    """(trials that count toward the budget, trials running now)."""
    done = running = 0
    for t in trials:
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            done += 1
        elif t.state == TrialState.FAIL and not t.user_attrs.get(INTERRUPTED):
            done += 1
        elif t.state == TrialState.RUNNING:
            running += 1
    return done, running


class Sweep:
    """Optuna-side state of one experiment: a search study and a final study per Study."""

    def __init__(
        self, experiment: Experiment, storage: optuna.storages.BaseStorage, home: Path, worker: int = 0
    ):
        self.experiment, self.storage, self.home, self.worker = experiment, storage, home, worker
        (home / "locks").mkdir(parents=True, exist_ok=True)

    @contextmanager
    def lock(self, study: Study):
        # hashlib, not hash(): the lock name must be the same in every worker process
        key = hashlib.sha256(study.name.encode()).hexdigest()[:16]
        with FileLock(str(self.home / "locks" / f"{key}.lock")):
            yield

    def search_study(self, study: Study, direction: str) -> optuna.Study:
        s = optuna.create_study(
            study_name=study.name,
            storage=self.storage,
            sampler=make_sampler(self.experiment, self.worker),
            pruner=make_pruner(self.experiment),
            direction=direction,
            load_if_exists=True,
        )
        return s

    def final_study(self, study: Study, direction: str) -> optuna.Study:
        return optuna.create_study(
            study_name=study.name + FINAL_SUFFIX,
            storage=self.storage,
            sampler=optuna.samplers.RandomSampler(seed=0),  # only enqueued trials run here
            direction=direction,
            load_if_exists=True,
        )

    def check_fingerprint(self, study: Study, s: optuna.Study) -> None:
        """A resumed study must have the same space and budget, or results would be mixed."""
        expected, found = study.fingerprint(), s.user_attrs.get("fingerprint")
        if found is None:
            s.set_user_attr("fingerprint", expected)
            s.set_user_attr("search_space", {k: v.model_dump() for k, v in self.experiment.search.items()})
            s.set_user_attr("budget", self.experiment.budget.model_dump())
        elif found != expected:
            raise ConfigError(
                f"study {study.name} already exists with a different search space, budget, sampler, "
                f"task or fixed hyperparameters (stored {s.user_attrs.get('budget')}); mixing them would "
                "make its trials incomparable. Rename the experiment (name:) or use another run home."
            )

    def claim_search_trial(self, study: Study, s: optuna.Study) -> optuna.Trial | None:
        with self.lock(study):
            trials = s.get_trials(deepcopy=False)
            done, running = counted(trials)
            if done + running >= trial_budget(self.experiment):
                return None
            s.sampler = make_sampler(self.experiment, self.worker, len(trials))
            return s.ask()

    def claim_final_trial(self, study: Study, f: optuna.Study) -> optuna.Trial | None:
        with self.lock(study):
            if not any(t.state == TrialState.WAITING for t in f.get_trials(deepcopy=False)):
                return None
            return f.ask()

    def ensure_final_seeds(self, study: Study, f: optuna.Study, seeds: int) -> None:
        """Queue one final trial per seed, once (idempotent under the lock)."""
        with self.lock(study):
            have = {
                t.user_attrs.get("seed")
                for t in f.get_trials(deepcopy=False)
                if not t.user_attrs.get(INTERRUPTED)
            }
            for seed in range(seeds):
                if seed not in have:
                    f.enqueue_trial({}, user_attrs={"seed": seed})

    def mark_interrupted(
        self, s: optuna.Study, trial_id: int, number: int, params: dict, attrs: dict
    ) -> None:
        """Fail an interrupted trial without counting it, and queue its configuration again."""
        retry_attrs = {"retry_of": number}
        if "seed" in attrs:
            retry_attrs["seed"] = attrs["seed"]
        self.storage.set_trial_user_attr(trial_id, INTERRUPTED, True)
        s.enqueue_trial(params, user_attrs=retry_attrs, skip_if_exists=False)
        self.storage.set_trial_state_values(trial_id, TrialState.FAIL)

    def recover(self, s: optuna.Study) -> int:
        """Trials left RUNNING by a killed process (called before any worker starts)."""
        stale = [t for t in s.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
        for t in stale:
            self.mark_interrupted(s, t._trial_id, t.number, t.params, t.user_attrs)
        return len(stale)
