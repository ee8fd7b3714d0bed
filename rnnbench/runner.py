"""``rnnbench run``: validate, prepare stores in the parent, then let workers run the studies.

Each study: search trials (validation only, pruned on the per-epoch primary metric) until its
budget is spent, then its best configuration is retrained with K seeds and scored once on test.
Every result goes to the ledger (the Optuna storage) first, then to MLflow (a projection of it).
The parent process checks both stores before writing anything, creates what is missing, repairs
the MLflow projection, and only then starts workers; with several workers it watches them and
recovers a dead worker's trial at once.
"""

from __future__ import annotations

import gc
import json
import math
import os
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rnnbench.errors import ConfigError, TrialFailed, first_line
from rnnbench.experiment import Experiment, Study, expand
from rnnbench.progress import Progress, make_progress
from rnnbench.stats import MIN_SEEDS, mean_ci
from rnnbench.trainer import Budget, Callback, RunSettings, Trainer

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


def _now_ms() -> int:
    return int(time.time() * 1000)


class _EpochReporter(Callback):
    """Keeps the trial's history for its ledger record, shows it live in MLflow (one batched
    call per epoch, best effort: the projection repairs it), reports progress, and prunes."""

    def __init__(
        self,
        tracker,
        run_id: str,
        progress: Progress,
        primary: str,
        epochs: int,
        trial=None,
        extra_counts: dict[str, float] | None = None,
    ):
        self.tracker, self.run_id, self.progress = tracker, run_id, progress
        self.primary, self.epochs, self.trial = primary, epochs, trial
        self.extra_counts = extra_counts or {}
        self.history: list[dict[str, Any]] = []
        self.parameters: dict[str, float] = {}
        self.data: dict[str, Any] = {}
        self.started_ms = _now_ms()
        self.live_failed = False

    def _live(self, call, *args, **kwargs) -> None:
        if self.run_id is None:
            self.live_failed = True
            return
        try:
            call(*args, **kwargs)
        except Exception as exc:  # MLflow down mid-trial: the ledger still gets everything
            if not self.live_failed:
                self.progress.log(f"warning: MLflow write failed ({exc}); `rnnbench sync` repairs it")
                self.live_failed = True

    def on_fit_start(self, info: dict[str, Any]) -> None:
        from rnnbench.projection import SUMMARY_STEP

        params = info["parameters"]
        counts = {"params_total": params["total"], **self.extra_counts}
        if params.get("encoder"):
            counts |= {f"params_encoder_{k}": params["encoder"][k] for k in ("total", "input", "recurrent")}
        self.parameters, self.data = counts, dict(info["data"])
        self._live(
            self.tracker.log_metrics, self.run_id, counts, step=SUMMARY_STEP, timestamp=self.started_ms
        )

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        entry = {"epoch": epoch, "time_ms": _now_ms(), "metrics": {k: float(v) for k, v in metrics.items()}}
        self.history.append(entry)
        self._live(self.tracker.log_metrics, self.run_id, metrics, step=epoch, timestamp=entry["time_ms"])
        _fault("mid_trial")
        if self.trial is None:  # a final seed
            _fault("final_oom")
        value = metrics[f"valid_{self.primary}"]
        self.progress.epoch_ended(epoch, self.epochs, self.primary, value)
        if self.trial is not None:
            import optuna

            self.trial.report(value, epoch)
            if self.trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch} ({self.primary}={value:.4g})")


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
    from rnnbench.sweep import lease_duration
    from rnnbench.tracking import tracking_uri_for

    studies, skipped = expand(experiment)
    lease_duration()  # a bad RNNBENCH_LEASE_SECONDS is refused here, before any store is opened
    home = run_home(home)

    uri = tracking_uri or tracking_uri_for(home)
    return Plan(experiment, studies, skipped, home, uri, storage_url, max_retries, device, threads)


def dry_run(plan: Plan) -> list[dict[str, Any]]:
    """The plan as rows: study, trials, seeds, parameter-count range over the searched sizes
    (with a parameter budget: the hidden sizes it solves at the search space's extremes)."""
    from rnnbench.sweep import trial_budget

    rows, tasks = [], {}
    e = plan.experiment
    for study in plan.studies:
        key = json.dumps(study.task_entry.model_dump(), sort_keys=True)
        if key not in tasks:
            tasks[key] = study.make_task()
            tasks[key].setup()
        task = tasks[key]
        corners = _search_corners(e)
        if study.parameter_budget:
            sizes = [solve_hidden_size(task, study, study.parameter_budget, hp) for hp in corners]
        else:
            sizes = _hidden_range(e)
            corners = [corners[0], corners[-1]] if len(sizes) > 1 else corners[:1]
        counts = [_count_parameters(task, study, h, hp) for h, hp in zip(sizes, corners)]
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


def _search_corners(e: Experiment) -> list[dict[str, Any]]:
    """Searched numeric hyperparameters all at their low, then all at their high end."""
    low, high = {}, {}
    for name, p in e.search.items():
        if name == "hidden_size":
            continue
        if p.type == "categorical":
            numeric = [c for c in p.choices if isinstance(c, (int, float)) and not isinstance(c, bool)]
            if numeric:
                low[name], high[name] = min(numeric), max(numeric)
            else:
                low[name] = high[name] = p.choices[0]
        else:
            low[name], high[name] = p.low, p.high
    return [low, high]


def _hidden_range(e: Experiment) -> list[int]:
    spec = e.search.get("hidden_size")
    if spec is None:
        return [int(e.fixed.get("hidden_size", 64))]
    if spec.type == "categorical":
        return [min(spec.choices), max(spec.choices)]
    return [int(spec.low), int(spec.high)]


def _count_parameters(task, study: Study, hidden: int, hparams: dict[str, Any] | None = None) -> int:
    """Parameters of the whole model a trial with these hyperparameters trains."""
    from rnnbench.trainer import build_model

    model = build_model(task, study.arch, {**study.fixed_hparams, **(hparams or {}), "hidden_size": hidden})
    return sum(p.numel() for p in model.parameters())


def solve_hidden_size(task, study: Study, target: int, hparams: dict[str, Any] | None = None) -> int:
    """Largest hidden size whose whole model, with *these* hyperparameters (a searched embedding
    size counts too), stays within ``target`` parameters: fair comparisons at equal size."""
    low, high = 1, 4096
    if _count_parameters(task, study, low, hparams) > target:
        raise ConfigError(
            f"{study.name}: parameter_budget {target:,} is below the smallest model of this architecture"
            + (f" with {hparams}" if hparams else "")
        )
    while low < high:
        mid = (low + high + 1) // 2
        if _count_parameters(task, study, mid, hparams) <= target:
            low = mid
        else:
            high = mid - 1
    return low


def open_stores(plan: Plan, *, create: bool = True):
    """(tracker, storage, lock): every store checked before anything is written locally.

    Order matters: URLs and servers first (one line each, exit 2), then the run home, the
    sqlite store (created whole or not at all) and the journal (a torn last record cut off)."""
    from rnnbench.scheduler import LedgerLock
    from rnnbench.sweep import StoreError, check_storage_url, is_journal, open_storage
    from rnnbench.tracking import Tracker, check_usable, create_sqlite_store, tracking_uri_for

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
        tracker = Tracker(plan.tracking_uri, plan.experiment.name, artifact_root=plan.home / "artifacts")
    return tracker, storage, lock


def start(plan: Plan, *, workers: int = 1, verbose: bool = False) -> dict[str, Any]:
    """Prepare the stores in this process, then run the studies with ``workers`` processes;
    ``verbose``: also name the studies the experiment's ``skip_invalid`` skipped (asked for, so
    not news on every run)."""
    from filelock import FileLock, Timeout

    from rnnbench.projection import Projection
    from rnnbench.scheduler import recover

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
        requeued = 0
        for study in plan.studies:
            with lock(study.name):
                s, f = create_study(plan, storage, study)
                requeued += recover(storage, s, plan.max_retries) + recover(storage, f, plan.max_retries)
        repaired = projection.sync(e.name)
        for line in skipped_lines(plan.skipped) if verbose else ():
            print(line, flush=True)
        if requeued:
            print(f"resuming: {requeued} interrupted or lost trial(s) queued again", flush=True)
        if repaired["projected"] or repaired["duplicates"]:
            print(
                f"repaired MLflow from the ledger: {repaired['projected']} run(s) rewritten, "
                f"{repaired['duplicates']} duplicate(s) removed",
                flush=True,
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
            _run_parallel(plan, workers, settings, storage, projection)
        _sync_quietly(projection, e.name, plan.home)  # what a worker could not project (MLflow down, a kill)
        return summarize(plan, storage)
    finally:
        run_lock.release()


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


def _sync_quietly(projection, experiment: str, home: Path) -> None:
    """A sync that may fail (MLflow down): the ledger has everything, a later sync projects it."""
    from rnnbench.models import repair_models

    try:
        projection.sync(experiment)
        repair_models(
            projection.tracker,
            projection.storage,
            experiment,
            home,
            warn=lambda line: print(line, flush=True),
        )
    except Exception as exc:
        print(
            f"warning: MLflow not updated ({first_line(exc, 200)}); "
            f"the ledger has every result: run `rnnbench sync {experiment}` once MLflow is back",
            flush=True,
        )


def create_study(plan: Plan, storage, study: Study):
    """The search and final studies of ``study`` in the ledger, with what every reader needs
    (tags, budget, seeds); call under the study's lock. A changed experiment is refused."""
    import optuna

    from rnnbench.projection import BUDGET_ATTR, RETRIES_ATTR, SEEDS_ATTR, TAGS_ATTR, YAML_ATTR
    from rnnbench.sweep import FINAL_SUFFIX, make_pruner, make_sampler, trial_budget

    e = plan.experiment
    direction = _direction(study)
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
    metric = _primary(study).name
    for ledger, name in ((s, f"valid {metric}"), (f, f"test {metric}")):  # the dashboard's axis labels
        if ledger.metric_names != [name]:
            with warnings.catch_warnings():  # set_metric_names is marked experimental
                warnings.simplefilter("ignore")
                ledger.set_metric_names([name])
    attrs = s.user_attrs
    parts = fingerprint_parts(plan, study)
    _check_fingerprint(study, attrs, parts)
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
            **_study_tags(study),
            "metric": _primary(study).name,
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


def experiment_yaml(e: Experiment) -> str:
    """The experiment as run, every default filled in: what reproduces it from MLflow alone."""
    import yaml

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
    import hashlib

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


def _check_fingerprint(study: Study, attrs: dict[str, Any], parts: dict[str, str]) -> None:
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


def _study_tags(study: Study) -> dict[str, Any]:
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


def _primary(study: Study):
    """The study's primary metric, from an instance: a task's options may change it (memory: copy)."""
    return study.make_task().primary_metric


def _direction(study: Study) -> str:
    return _primary(study).direction


def _run_parallel(plan: Plan, workers: int, settings: dict[str, Any], storage, projection) -> None:
    """Start the workers and watch them: a worker that dies (killed, out of memory, a crash
    outside a trial) has its trial recovered at once and is replaced, a few times at most."""
    import multiprocessing.connection

    import torch

    gpus = torch.cuda.device_count() if settings["device"] in ("auto", "cuda") else 0
    threads = settings.get("threads") or threads_per_worker(workers)
    ctx = multiprocessing.get_context("spawn")  # fork and torch threads do not mix
    respawns_left = 2 * workers

    def launch(w: int):
        worker_settings = dict(settings, threads=threads)
        if gpus:
            worker_settings["device"] = f"cuda:{w % gpus}"
        p = ctx.Process(target=_worker_main, args=(plan, w, worker_settings, workers), daemon=False)
        p.start()
        return p

    procs = {w: launch(w) for w in range(workers)}
    errors: list[int] = []
    try:
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
                lost = _recover_all(plan, storage)
                _sync_quietly(
                    projection, plan.experiment.name, plan.home
                )  # it may have died before projecting
                print(
                    f"worker {w} died (exit code {p.exitcode}); {lost} trial(s) queued again",
                    flush=True,
                )
                if respawns_left > 0 and not errors:
                    respawns_left -= 1
                    procs[w] = launch(w)
                else:
                    errors.append(p.exitcode)
    except KeyboardInterrupt:
        _stop_workers(procs.values())
        raise
    if {130, -2, -15} & set(errors):
        raise KeyboardInterrupt
    if errors:
        raise ConfigError(f"{len(errors)} worker(s) kept dying (exit codes {errors}); see their output above")


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


def remaining_units(plan: Plan, storage) -> int:
    """Search trials and final seeds the ledger still lacks, over every study of the plan (what
    the progress line counts down; all of them on a first run)."""
    from rnnbench.projection import StudyLedger
    from rnnbench.sweep import COUNTED, study_counts, trial_budget

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


def _stop_workers(procs, grace_s: float = 60.0) -> None:
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


def _recover_all(plan: Plan, storage) -> int:
    """Recovery of every study now (a worker of ours just died: its owner is known dead)."""
    from rnnbench.scheduler import LedgerLock, recover_study

    lock = LedgerLock(plan.storage_url, plan.home)
    return sum(recover_study(storage, lock, study.name, plan.max_retries) for study in plan.studies)


def _worker_main(plan: Plan, worker: int, settings: dict[str, Any], workers: int) -> None:
    from rnnbench.interrupts import stop_once_on_either

    stop_once_on_either()
    try:
        Worker(plan, worker, settings, prefix=f"[w{worker}] ", workers=workers).run()
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def _fault(point: str) -> None:
    """Test-only fault injection: RNNBENCH_FAULT=<point>[:<once file>][,...] SIGKILLs this
    process at ``point`` (``mid_trial``: after a trial's first epoch; ``after_ledger_write``:
    between the ledger write and the MLflow write; ``sqlite_store_built``: before a new MLflow
    store is renamed into place); with a once file only the first process dies. A point whose
    name ends in ``_oom`` raises torch's out-of-memory error instead (``final_oom``: after a final
    seed's first epoch)."""
    for spec in filter(None, os.environ.get("RNNBENCH_FAULT", "").split(",")):
        name, _, once_file = spec.partition(":")
        if name != point:
            continue
        if once_file:  # only the first process to get here dies
            try:
                os.close(os.open(once_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        if name.endswith("_oom"):
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory (injected by RNNBENCH_FAULT)")
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


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
    ):
        from rnnbench.projection import Projection
        from rnnbench.scheduler import owner_identity

        self.plan, self.e, self.worker = plan, plan.experiment, worker
        self.settings = RunSettings(**settings)
        if self.settings.threads:  # before any run is created: runs record the thread count
            import torch

            torch.set_num_threads(self.settings.threads)
        self.tracker, self.storage, self.lock = stores or open_stores(plan, create=False)
        self.projection = Projection(self.tracker, self.storage, self.lock)
        self.owner = owner_identity(worker)
        self.owner["home"] = str(plan.home)
        units = remaining_units(plan, self.storage)  # a resumed run counts only what is left
        self.progress = make_progress(-(-units // workers), prefix)  # this worker's share of the runs
        self._tasks: dict[str, Any] = {}
        self._hidden: dict[str, int] = {}
        self._last_recovery: dict[str, float] = {}

    def run(self) -> None:
        pending = list(self.plan.studies)
        try:
            while pending:
                worked = False
                for study in list(pending):
                    state = self._advance(study)
                    worked |= state == "worked"
                    if state == "done":
                        pending.remove(study)
                if pending and not worked:
                    time.sleep(0.5)  # other workers hold the remaining trials
        finally:
            self.progress.close()

    def _task(self, study: Study):
        key = json.dumps(study.task_entry.model_dump(), sort_keys=True)
        if key not in self._tasks:
            task = study.make_task()
            task.setup()
            self._tasks[key] = task
        return self._tasks[key]

    def _hparams(self, study: Study, task, params: dict[str, Any]) -> dict[str, Any]:
        """The trial's whole configuration; under a parameter budget, hidden_size is solved from
        it (so a searched embedding size is paid for out of the same budget)."""
        hp = {**study.fixed_hparams, **params}
        if study.parameter_budget:
            key = json.dumps([study.name, hp], sort_keys=True, default=str)
            if key not in self._hidden:
                self._hidden[key] = solve_hidden_size(task, study, study.parameter_budget, hp)
            hp["hidden_size"] = self._hidden[key]
        return hp

    def _claim(self, study: Study, stage: str):
        """Under the study's lock: recover lost trials, then take a queued trial or sample a new
        one if the budget has room. Returns (ledger view, trial or None)."""
        from optuna.trial import TrialState

        from rnnbench.projection import StudyLedger
        from rnnbench.scheduler import Lease, has_room, recover, seeds_to_queue
        from rnnbench.sweep import make_pruner, make_sampler

        with self.lock(study.name):
            led = StudyLedger.load(self.storage, study.name)
            s = led.search if stage == "search" else led.final
            recover(self.storage, s, led.max_retries)
            trials = s.get_trials(deepcopy=False)
            if stage == "search":
                waiting = any(t.state == TrialState.WAITING for t in trials)
                if not waiting and not has_room(trials, int(led.attrs["trials"]), led.max_retries):
                    return led, None
                s.sampler = make_sampler(self.e, len(trials))
                # a loaded study has Optuna's default pruner (5 start-up trials, no warm-up), not ours
                s.pruner = make_pruner(self.e, study.budget)
            else:
                for seed in seeds_to_queue(trials, led.seeds):
                    s.enqueue_trial({}, user_attrs={"seed": seed})
                if not any(t.state == TrialState.WAITING for t in s.get_trials(deepcopy=False)):
                    return led, None
            trial = s.ask()
            self._lease = Lease(self.storage, trial._trial_id, self.owner).start()
            return led, trial

    def _advance(self, study: Study) -> str:
        led, trial = self._claim(study, "search")
        if trial is not None:
            self._run_claimed(study, led, trial, stage="search")
            return "worked"
        if not led.search_done():
            self._recover_now_and_then(study)
            return "waiting"
        best = led.summary()["best"]
        if (best is None and not led.no_search) or not led.seeds:
            self._refresh_parent(study)
            return "done"
        led, trial = self._claim(study, "final")
        if trial is not None:
            self._run_claimed(study, led, trial, stage="final", best=best)
            return "worked"
        from rnnbench.scheduler import final_done

        if not final_done(led.final.get_trials(deepcopy=False), led.seeds, led.max_retries):
            self._recover_now_and_then(study)
            return "waiting"
        self._refresh_parent(study)
        return "done"

    def _recover_now_and_then(self, study: Study) -> None:
        """While waiting on other workers' trials, look for dead ones every few seconds."""
        from rnnbench.scheduler import recover_study
        from rnnbench.sweep import lease_duration

        now = time.monotonic()
        if now - self._last_recovery.get(study.name, 0.0) < min(5.0, lease_duration() / 4):
            return
        self._last_recovery[study.name] = now
        recover_study(self.storage, self.lock, study.name, self.plan.max_retries)

    def _refresh_parent(self, study: Study, led=None) -> None:
        from rnnbench.projection import BASELINE_ATTR, BASELINES_ATTR, StudyLedger

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

    def _run_claimed(self, study: Study, led, trial, *, stage: str, best=None) -> None:
        """Run a claimed trial; whatever happens, its lease ends and the ledger learns the outcome
        (an unexpected error outside training fails it without a record: it is lost, and queued
        again by recovery)."""
        from rnnbench.sweep import RECORD

        try:
            self._run_trial(study, led, trial, stage=stage, best=best)
        except BaseException as exc:
            self._lease.stop()  # before failing it: no renewal may race the failure
            if RECORD not in trial.user_attrs or not isinstance(exc, KeyboardInterrupt):
                self._fail_quietly(trial)
            raise
        finally:
            self._lease.stop()

    def _fail_quietly(self, trial) -> None:
        import optuna

        try:
            self.storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        except Exception:
            pass  # already finished, or the ledger is gone: its lease expires instead

    def _run_trial(self, study: Study, led, trial, *, stage: str, best=None) -> None:
        import optuna

        from rnnbench.projection import best_hparams
        from rnnbench.sweep import suggest

        e, arch, budget_spec = self.e, study.arch, study.budget
        if stage == "search":
            seed, label = e.sampler.seed, f"trial {trial.number}"
            epochs = budget_spec.epochs_limit()
        else:  # the best configuration, or the fixed one when nothing is searched
            seed = int(trial.user_attrs["seed"])
            label, epochs = f"seed {seed}", e.final.epochs or budget_spec.epochs_limit()
        params: dict[str, Any] = {}
        started_ms = _now_ms()
        try:  # a deterministic error here (a sampled embedding over the budget) is this trial's
            # failure, like one in training: not a lost worker, so never retried
            task = self._task(study)
            params = (
                suggest(trial, e) if stage == "search" else best_hparams(best) if best is not None else {}
            )
            hp = self._hparams(study, task, params)
            primary = task.primary_metric.name
        except Exception as exc:
            self._fail_before_training(
                study,
                led,
                trial,
                stage,
                exc,
                label,
                started_ms,
                {"hparams": {**study.fixed_hparams, **params}, "seed": seed},
            )
            return
        improvement, relative = budget_spec.improvement()
        budget = Budget(
            epochs=epochs,
            max_steps=budget_spec.max_steps,
            eval_every=budget_spec.eval_every,
            steps_per_epoch=budget_spec.steps_per_epoch,
            max_minutes=budget_spec.max_minutes_per_trial,
            patience=budget_spec.patience,
            min_improvement=improvement,
            min_improvement_relative=relative,
        )
        tags: dict[str, Any] = {"worker": self.worker}
        if stage == "final":
            tags |= {"seed": seed} | ({"best_trial": best.number} if best is not None else {})
        meta = {"seed": seed, "cell": arch.cell, "layers": arch.layers, "bidirectional": arch.bidirectional}
        try:
            run_id = self.projection.open_child(led, stage, trial, tags, {**hp, **meta})
        except Exception as exc:  # MLflow unreachable: train anyway, the ledger is what counts
            self.progress.log(f"warning: no MLflow run for {label} of {study.name} ({exc}); a sync adds it")
            run_id = None
        self.progress.trial_started(study.name, stage, trial.number, label)
        target = {"params_target": study.parameter_budget} if study.parameter_budget else {}
        reporter = _EpochReporter(
            self.tracker,
            run_id,
            self.progress,
            primary,
            (budget_spec.validations() or "?") if stage == "search" or not e.final.epochs else e.final.epochs,
            trial if stage == "search" else None,
            extra_counts=target,
        )
        record: dict[str, Any] = {
            "hparams": hp,
            "seed": seed,
            "worker": self.worker,
            "started_ms": reporter.started_ms,
        }
        if stage == "final" and best is not None:
            record["best_trial"] = best.number
        trainer = Trainer(budget, self.settings)
        failed, value, state, model, items = True, None, optuna.trial.TrialState.COMPLETE, None, None
        monitor = self.tracker.system_metrics(run_id) if run_id else None
        try:
            result = trainer.fit(
                task,
                arch,
                hp,
                seed=seed,
                evaluate_test=stage == "final",
                callbacks=[reporter],
                setup_done=True,
            )
            failed = False
            value = result.best_valid[primary] if stage == "search" else result.test[primary]
            summary = {
                **result.summary,
                "params_total": result.parameters["total"],
                **target,
                "best_epoch": result.best_epoch,
            }
            record |= {
                "status": "complete",
                "best_valid": result.best_valid,
                "test": result.test,
                "summary": summary,
                "best_epoch": result.best_epoch,
                "stop_reason": result.stop_reason,
                "artifacts": result.artifacts,
            }
            model = result.model if stage == "final" else None
            items = result.items if stage == "final" else None
            detail = f"{primary}={value:.4g}"
        except optuna.TrialPruned as exc:
            failed, state, detail = False, optuna.trial.TrialState.PRUNED, str(exc)
            record |= {"status": "pruned", "stop_reason": "pruned", "failure_message": str(exc)}
        except KeyboardInterrupt:
            record |= {"status": "interrupted"}
            self._write_record(trial, record, reporter)
            with self.lock(study.name):
                self._fail_quietly(trial)
                from rnnbench.scheduler import recover

                recover(self.storage, led.search if stage == "search" else led.final, led.max_retries)
            self._project(study, stage, trial)
            raise
        except Exception as exc:  # one bad configuration or plugin must not stop the sweep
            reason, message = _failure(exc)
            state, detail = optuna.trial.TrialState.FAIL, message
            record |= _failed_fields(reason, message)
            self._decide_retry(trial, stage, reason, led)
        finally:
            if monitor is not None:
                monitor.finish()
            _release_memory(failed)
        if model is not None:  # the file before the record that names it; a full disk stops here
            from rnnbench.models import save_weights

            record["weights"] = save_weights(self.plan.home, study.name, seed, model)
        if items is not None:  # likewise: the file first, then the record naming it
            from rnnbench.items import save_items

            record["items"] = save_items(self.plan.home, study.name, seed, items)
        # The ledger first, in two writes: the whole record, then the state that makes it count.
        self._write_record(trial, record, reporter)
        if not self._tell(study, led, stage, trial, state, value, label):
            return
        _fault("after_ledger_write")
        self._project(study, stage, trial, live=not reporter.live_failed)
        if model is not None and run_id is not None:
            self._log_model(study, task, model, record, run_id)
        if "items" in record and run_id is not None:
            self._log_items(study, record, run_id)
        status = record["status"]
        self.progress.trial_ended(status, detail)

    def _tell(self, study: Study, led, stage: str, trial, state, value, label: str) -> bool:
        """The state change that makes a recorded trial count; False when recovery failed the
        trial meanwhile (its lease expired): the result is discarded, its copy runs instead."""
        import optuna

        ledger = led.search if stage == "search" else led.final
        try:
            if state == optuna.trial.TrialState.COMPLETE:
                ledger.tell(trial, value)
            else:
                ledger.tell(trial, state=state)
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError, RuntimeError) as exc:
            self.progress.log(
                f"warning: {label} of {study.name} was recovered by another worker while it ran "
                f"(its lease expired: {exc}); its result is discarded and its copy runs instead"
            )
            return False
        return True

    def _decide_retry(self, trial, stage: str, reason: str, led) -> None:
        """A final seed's transient failure (out of memory) is retried within the retry limit:
        the decision goes into the ledger now, before the tell, with the limit in force now."""
        import optuna

        from rnnbench.sweep import LOST_DECISION, RETRIES, retry_decision

        decision = retry_decision(stage, reason, int(trial.user_attrs.get(RETRIES, 0)), led.max_retries)
        if decision is not None:
            try:
                trial.set_user_attr(LOST_DECISION, decision)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # recovered by another worker meanwhile: its copy runs, this result is discarded

    def _fail_before_training(
        self,
        study: Study,
        led,
        trial,
        stage: str,
        exc: Exception,
        label: str,
        started_ms: int,
        record: dict[str, Any],
    ) -> None:
        """A trial that failed before training (task set-up, sampling, sizing): its record and a
        FAIL, once, as any other failed trial; the sweep goes on."""
        import optuna

        from rnnbench.sweep import RECORD

        reason, message = _failure(exc)
        record |= {
            "worker": self.worker,
            "started_ms": started_ms,
            **_failed_fields(reason, message),
            "history": [],
            "parameters": {},
            "data": {},
            "finished_ms": _now_ms(),
        }
        self.progress.trial_started(study.name, stage, trial.number, label)
        self._decide_retry(trial, stage, reason, led)
        trial.set_user_attr(RECORD, _json_safe(record))
        if not self._tell(study, led, stage, trial, optuna.trial.TrialState.FAIL, None, label):
            return
        self._project(study, stage, trial)
        self.progress.trial_ended("failed", message)

    def _log_model(self, study: Study, task, model, record: dict[str, Any], run_id: str) -> None:
        """The final seed's MLflow model; best effort (a sync logs it from the weights file)."""
        from rnnbench.models import log_model, model_card

        try:
            card = model_card(task, study, record)
            log_model(self.tracker, run_id, task, model, card)
        except Exception as exc:
            self.progress.log(
                f"warning: model of {study.name} seed {record['seed']} not logged ({first_line(exc, 200)})"
            )

    def _log_items(self, study: Study, record: dict[str, Any], run_id: str) -> None:
        """The final seed's items as its run's artifact; best effort (a sync logs it from the file)."""
        from rnnbench.projection import project_items

        try:
            project_items(self.tracker, run_id, self.plan.home, record["items"])
        except Exception as exc:
            self.progress.log(
                f"warning: items of {study.name} seed {record['seed']} not logged ({first_line(exc, 200)})"
            )

    def _write_record(self, trial, record: dict[str, Any], reporter: _EpochReporter) -> None:
        from rnnbench.sweep import RECORD

        record |= {
            "history": reporter.history,
            "parameters": reporter.parameters,
            "data": reporter.data,
            "finished_ms": _now_ms(),
        }
        trial.set_user_attr(RECORD, _json_safe(record))

    def _project(self, study: Study, stage: str, trial, live: bool = False) -> None:
        """The trial's record into MLflow, then the parent; best effort (the ledger has it all)."""
        from rnnbench.projection import StudyLedger

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
            task = self._task(study)
            trivial = {k: float(v) for k, v in task.baseline("test").items()}
            named = {
                name: {k: float(v) for k, v in scores.items()}
                for name, scores in task.baselines("test").items()
            }
        except Exception as exc:  # a plugin's baseline must not cost the finished study
            self.progress.log(f"warning: baseline of {study.task_entry.name} failed: {exc}")
        return trivial, named


def _json_safe(value: Any) -> Any:
    """Plain JSON for the ledger: NaN/inf become None (JSON has neither), numpy scalars floats."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return number if math.isfinite(number) else None


def _failure(exc: BaseException) -> tuple[str, str]:
    import torch

    if isinstance(exc, TrialFailed):
        return exc.reason, str(exc)
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "out_of_memory", f"out of memory: {str(exc).splitlines()[0] if str(exc) else ''}"
    return "exception", f"{type(exc).__name__}: {exc}"


def _failed_fields(reason: str, message: str) -> dict[str, Any]:
    """A failed trial's record fields; called inside the ``except`` (the traceback is its)."""
    return {
        "status": "failed",
        "failure_reason": reason,
        "failure_message": message[:500],
        "artifacts": {"traceback.txt": traceback.format_exc()},
    }


def _release_memory(failed: bool) -> None:
    """Give a trial's memory back before the next one. A full gc pass costs ~0.5 s with MLflow
    loaded, so it runs only where it pays: after a failure (cycles through the traceback) or on GPU."""
    import torch

    if failed or torch.cuda.is_available():
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def summarize(plan: Plan, storage) -> dict[str, Any]:
    """Per study, from the ledger: trials by state, best validation value, final seeds (what the
    CLI prints; the parent runs and the report carry the same numbers, computed the same way)."""
    from rnnbench.plugins import metric_bounds
    from rnnbench.projection import StudyLedger

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
                "metric": led.tags.get("metric", _primary(study).name),
                "direction": led.tags.get("direction", _direction(study)),
            }
        )
    return {"studies": rows, "home": str(plan.home), "tracking_uri": plan.tracking_uri}
