"""``rnnbench run``: validate, prepare stores in the parent, then let workers run the studies.

Each study: search trials (validation only, pruned on the per-epoch primary metric) until its
budget is spent, then its best configuration is retrained with K seeds and scored once on test.
The parent process creates the MLflow store and Optuna journal, recovers trials a killed run left
behind, and only then starts workers, so they never race to create either.
"""

from __future__ import annotations

import gc
import json
import math
import multiprocessing
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rnnbench.errors import ConfigError, TrialFailed
from rnnbench.experiment import Experiment, Study, expand
from rnnbench.progress import Progress, make_progress
from rnnbench.stats import mean_ci
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


class _EpochReporter(Callback):
    """Per-epoch metrics to MLflow (one batched call), progress, and Optuna pruning."""

    def __init__(self, tracker, run_id: str, progress: Progress, primary: str, epochs: int, trial=None):
        self.tracker, self.run_id, self.progress = tracker, run_id, progress
        self.primary, self.epochs, self.trial = primary, epochs, trial

    def on_fit_start(self, info: dict[str, Any]) -> None:
        params = info["parameters"]
        counts = {"params_total": params["total"]}
        if params.get("encoder"):
            counts |= {f"params_encoder_{k}": params["encoder"][k] for k in ("total", "input", "recurrent")}
        self.tracker.log_metrics(self.run_id, counts)
        self.tracker.log_params(self.run_id, {f"data.{k}": v for k, v in info["data"].items()})

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.tracker.log_metrics(self.run_id, metrics, step=epoch)
        value = metrics[f"valid_{self.primary}"]
        self.progress.epoch_ended(epoch, self.epochs, self.primary, value)
        if self.trial is not None:
            import optuna

            self.trial.report(value, epoch)
            if self.trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch} ({self.primary}={value:.4g})")


def prepare(experiment: Experiment, *, home=None, tracking_uri=None, storage_url=None) -> Plan:
    studies, skipped = expand(experiment)
    home = run_home(home)
    from rnnbench.tracking import tracking_uri_for

    return Plan(experiment, studies, skipped, home, tracking_uri or tracking_uri_for(home), storage_url)


def dry_run(plan: Plan) -> list[dict[str, Any]]:
    """The plan as rows: study, trials, seeds, parameter-count range over the searched hidden sizes."""
    from rnnbench.sweep import trial_budget

    rows, tasks = [], {}
    e = plan.experiment
    for study in plan.studies:
        key = json.dumps(study.task_entry.model_dump(), sort_keys=True)
        if key not in tasks:
            tasks[key] = study.make_task()
            tasks[key].setup()
        task = tasks[key]
        sizes = _hidden_range(e)
        counts = [_count_parameters(task, study, h) for h in sizes] if sizes else []
        if e.parameter_budget:
            hidden = solve_hidden_size(task, study, e.parameter_budget)
            sizes, counts = [hidden], [_count_parameters(task, study, hidden)]
        rows.append(
            {
                "study": study.name,
                "trials": trial_budget(e),
                "seeds": e.final.seeds,
                "hidden": "-".join(str(s) for s in sizes),
                "parameters": "-".join(f"{c:,}" for c in counts),
            }
        )
    return rows


def _hidden_range(e: Experiment) -> list[int]:
    spec = e.search.get("hidden_size")
    if spec is None:
        return [int(e.fixed.get("hidden_size", 64))]
    if spec.type == "categorical":
        return [min(spec.choices), max(spec.choices)]
    return [int(spec.low), int(spec.high)]


def _count_parameters(task, study: Study, hidden: int) -> int:
    from rnnbench.encoder import Encoder
    from rnnbench.plugins import get_cell
    from rnnbench.trainer import split_hparams

    hp, cell_hp, task_hp = split_hparams(
        {**study.fixed_hparams, "hidden_size": hidden}, get_cell(study.arch.cell), task
    )
    arch = study.arch
    model = task.build_model(
        lambda n: Encoder(arch.cell, n, hidden, arch.layers, arch.bidirectional, 0.0, **cell_hp),
        {**hp, **task_hp},
    )
    return sum(p.numel() for p in model.parameters())


def solve_hidden_size(task, study: Study, target: int) -> int:
    """Largest hidden size whose whole model stays within ``target`` parameters (fair comparisons)."""
    low, high = 1, 4096
    if _count_parameters(task, study, low) > target:
        raise ConfigError(
            f"{study.name}: parameter_budget {target:,} is below the smallest model of this architecture"
        )
    while low < high:
        mid = (low + high + 1) // 2
        if _count_parameters(task, study, mid) <= target:
            low = mid
        else:
            high = mid - 1
    return low


def start(plan: Plan, *, workers: int = 1, device: str | None = None) -> dict[str, Any]:
    """Prepare the stores in this process, then run the studies with ``workers`` processes."""
    from filelock import FileLock, Timeout

    from rnnbench.sweep import Sweep, open_storage
    from rnnbench.tracking import Tracker

    e = plan.experiment
    plan.home.mkdir(parents=True, exist_ok=True)
    (plan.home / "locks").mkdir(exist_ok=True)
    run_lock = FileLock(str(plan.home / "locks" / f"run-{e.name}.lock"))
    try:
        run_lock.acquire(timeout=0)
    except Timeout:
        raise ConfigError(f"experiment {e.name!r} is already running with run home {plan.home}") from None
    try:
        tracker = Tracker(plan.tracking_uri, e.name, artifact_root=plan.home / "artifacts")
        storage = open_storage(plan.storage_url, plan.home)
        sweep = Sweep(e, storage, plan.home)
        recovered = tracker.close_stale_runs()
        for study in plan.studies:
            direction = _direction(study)
            s = sweep.search_study(study, direction)
            sweep.check_fingerprint(study, s)
            recovered += sweep.recover(s) + sweep.recover(sweep.final_study(study, direction))
            if tracker.find_run(study=study.name, stage="study") is None:
                tracker.start_run(
                    study.name.split("/", 1)[1],
                    {
                        **_study_tags(study),
                        "stage": "study",
                        "status": "running",
                        "metric": _primary(study).name,
                        "direction": _direction(study),
                    },
                )
        for name, reason in plan.skipped:
            print(f"skipped {name}: {reason}", flush=True)
        if recovered:
            print(
                f"resuming: {recovered} interrupted run(s) found; their configurations are queued again",
                flush=True,
            )
        settings = {"device": device or e.device, "precision": e.precision, "deterministic": e.deterministic}
        if workers <= 1:
            Worker(plan, 0, settings, tracker=tracker).run()
        else:
            _run_parallel(plan, workers, settings)
        return summarize(plan, tracker, sweep)
    finally:
        run_lock.release()


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
    }


def _primary(study: Study):
    """The study's primary metric, from an instance: a task's options may change it (memory: copy)."""
    return study.make_task().primary_metric


def _direction(study: Study) -> str:
    return _primary(study).direction


def _run_parallel(plan: Plan, workers: int, settings: dict[str, Any]) -> None:
    import torch

    gpus = torch.cuda.device_count() if settings["device"] in ("auto", "cuda") else 0
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = multiprocessing.get_context("spawn")  # fork and torch threads do not mix
    procs = []
    for w in range(workers):
        worker_settings = dict(settings, threads=threads)
        if gpus:
            worker_settings["device"] = f"cuda:{w % gpus}"
        p = ctx.Process(target=_worker_main, args=(plan, w, worker_settings), daemon=False)
        p.start()
        procs.append(p)
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:
            p.join(timeout=60)
        raise
    failed = [p.exitcode for p in procs if p.exitcode not in (0, None)]
    if 130 in failed or -2 in failed:
        raise KeyboardInterrupt
    if failed:
        raise ConfigError(
            f"{len(failed)} worker(s) exited with an error (exit codes {failed}); see their output above"
        )


def _worker_main(plan: Plan, worker: int, settings: dict[str, Any]) -> None:
    try:
        Worker(plan, worker, settings, prefix=f"[w{worker}] ").run()
    except KeyboardInterrupt:
        raise SystemExit(130) from None


class Worker:
    """Runs claimed trials and final seeds until every study is done."""

    def __init__(self, plan: Plan, worker: int, settings: dict[str, Any], prefix: str = "", tracker=None):
        from rnnbench.sweep import Sweep, open_storage, trial_budget
        from rnnbench.tracking import Tracker

        self.plan, self.e, self.worker = plan, plan.experiment, worker
        self.settings = RunSettings(**settings)
        self.tracker = tracker or Tracker(plan.tracking_uri, self.e.name)
        self.sweep = Sweep(self.e, open_storage(plan.storage_url, plan.home), plan.home, worker)
        units = len(plan.studies) * (trial_budget(self.e) + self.e.final.seeds)
        self.progress = make_progress(units, prefix)
        self._tasks: dict[str, Any] = {}
        self._hidden: dict[str, int] = {}

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
        hp = {**study.fixed_hparams, **params}
        if self.e.parameter_budget:
            if study.name not in self._hidden:
                self._hidden[study.name] = solve_hidden_size(task, study, self.e.parameter_budget)
            hp["hidden_size"] = self._hidden[study.name]
        return hp

    def _advance(self, study: Study) -> str:
        from optuna.trial import TrialState

        from rnnbench.sweep import counted

        direction = _direction(study)
        s = self.sweep.search_study(study, direction)
        trial = self.sweep.claim_search_trial(study, s)
        if trial is not None:
            self._run_trial(study, s, trial, stage="search")
            return "worked"
        done, running = counted(s.get_trials(deepcopy=False))
        if running:
            return "waiting"
        if self.e.final.seeds == 0 or not any(
            t.state == TrialState.COMPLETE for t in s.get_trials(deepcopy=False)
        ):
            self._finish_parent(study, s, None)
            return "done"
        f = self.sweep.final_study(study, direction)
        self.sweep.ensure_final_seeds(study, f, self.e.final.seeds)
        trial = self.sweep.claim_final_trial(study, f)
        if trial is not None:
            self._run_trial(study, f, trial, stage="final", best=s.best_trial)
            return "worked"
        if any(t.state == TrialState.RUNNING for t in f.get_trials(deepcopy=False)):
            return "waiting"
        self._finish_parent(study, s, f)
        return "done"

    def _run_trial(self, study: Study, s, trial, *, stage: str, best=None) -> None:
        import optuna

        from rnnbench.sweep import suggest

        task = self._task(study)
        primary = task.primary_metric.name
        e, arch = self.e, study.arch
        if stage == "search":
            hp = self._hparams(study, task, suggest(trial, e))
            seed, label = e.sampler.seed, f"trial {trial.number}"
            budget = Budget(
                epochs=e.budget.epochs,
                steps_per_epoch=e.budget.steps_per_epoch,
                max_minutes=e.budget.max_minutes_per_trial,
                patience=e.budget.patience,
            )
        else:
            hp = self._hparams(study, task, dict(best.params))
            seed = int(trial.user_attrs["seed"])
            label = f"seed {seed}"
            budget = Budget(
                epochs=e.final.epochs or e.budget.epochs,
                steps_per_epoch=e.budget.steps_per_epoch,
                max_minutes=e.budget.max_minutes_per_trial,
                patience=e.budget.patience,
            )
        parent = self.tracker.find_run(study=study.name, stage="study")
        tags = {
            **_study_tags(study),
            "stage": stage,
            "trial": trial.number,
            "status": "running",
            "worker": self.worker,
        }
        if stage == "final":
            tags |= {"seed": seed, "best_trial": best.number}
        run_name = f"trial-{trial.number}" if stage == "search" else f"final-seed-{seed}"
        run_id = self.tracker.start_run(run_name, tags, parent.info.run_id if parent else None)
        trial.set_user_attr("mlflow_run_id", run_id)
        self.tracker.log_params(
            run_id,
            {
                **hp,
                "seed": seed,
                "cell": arch.cell,
                "layers": arch.layers,
                "bidirectional": arch.bidirectional,
            },
        )
        self.progress.trial_started(study.name, stage, trial.number, label)
        reporter = _EpochReporter(
            self.tracker, run_id, self.progress, primary, budget.epochs, trial if stage == "search" else None
        )
        trainer = Trainer(budget, self.settings)
        failed = True
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
            if result.stop_reason == "max_minutes":
                raise TrialFailed(
                    "time_limit", f"over its limit of {e.budget.max_minutes_per_trial} minutes per trial"
                )
            failed = False
        except optuna.TrialPruned as exc:
            failed = False
            s.tell(trial, state=optuna.trial.TrialState.PRUNED)
            self._end(run_id, "pruned", str(exc))
            return
        except KeyboardInterrupt:
            self.sweep.mark_interrupted(s, trial._trial_id, trial.number, trial.params, trial.user_attrs)
            self.tracker.set_tags(run_id, {"status": "interrupted", "failure_reason": "interrupted"})
            self.tracker.end_run(run_id, "KILLED")
            raise
        except Exception as exc:  # one bad configuration or plugin must not stop the sweep
            reason, message = _failure(exc)
            trial.set_user_attr("failure_reason", reason)
            trial.set_user_attr("failure_message", message[:500])
            s.tell(trial, state=optuna.trial.TrialState.FAIL)
            self.tracker.log_text(run_id, traceback.format_exc(), "traceback.txt")
            self._end(run_id, "failed", message, reason)
            return
        finally:
            _release_memory(failed)
        value = result.best_valid[primary] if stage == "search" else result.test[primary]
        summary = {
            **result.summary,
            "params_total": result.parameters["total"],
            "best_epoch": result.best_epoch,
        }
        trial.set_user_attr("summary", summary)
        if stage == "final":
            trial.set_user_attr("test", result.test)
        s.tell(trial, value)
        metrics = {f"best_valid_{k}": v for k, v in result.best_valid.items()} | summary
        if result.test:
            metrics |= {f"test_{k}": v for k, v in result.test.items()}
        self.tracker.log_metrics(run_id, metrics, step=result.best_epoch)
        for filename, text in result.artifacts.items():
            self.tracker.log_text(run_id, text, filename)
        self.tracker.set_tags(run_id, {"status": "complete", "stop_reason": result.stop_reason})
        self.tracker.end_run(run_id, "FINISHED")
        self.progress.trial_ended("complete", f"{primary}={value:.4g}")

    def _end(self, run_id: str, status: str, detail: str, reason: str | None = None) -> None:
        tags = {"status": status}
        if reason:
            tags["failure_reason"] = reason
            tags["failure_message"] = detail[:500]
        self.tracker.set_tags(run_id, tags)
        self.tracker.end_run(run_id, "FAILED" if status == "failed" else "FINISHED")
        self.progress.trial_ended(status, detail)

    def _finish_parent(self, study: Study, s, f) -> None:
        """Study-level results on the parent run: best validation, test mean and 95% CI over seeds."""
        from optuna.trial import TrialState

        parent = self.tracker.find_run(study=study.name, stage="study")
        if parent is None or parent.info.status != "RUNNING":
            return
        trials = s.get_trials(deepcopy=False)
        states = [t for t in trials if not t.user_attrs.get("interrupted")]
        metrics: dict[str, float] = {
            "trials_complete": sum(t.state == TrialState.COMPLETE for t in states),
            "trials_pruned": sum(t.state == TrialState.PRUNED for t in states),
            "trials_failed": sum(t.state == TrialState.FAIL for t in states),
        }
        tags: dict[str, Any] = {"status": "complete"}
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if complete:
            best = s.best_trial
            metrics["best_valid"] = best.value
            metrics |= {
                k: v for k, v in best.user_attrs.get("summary", {}).items() if isinstance(v, (int, float))
            }
            tags["best_trial"] = best.number
            self.tracker.log_params(parent.info.run_id, {f"best.{k}": v for k, v in best.params.items()})
        else:
            tags["status"] = "no_completed_trial"
        if f is not None:
            seeds = [t for t in f.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
            metrics["final_seeds"] = len(seeds)
            names = sorted({k for t in seeds for k in t.user_attrs.get("test", {})})
            for name in names:
                mean, low, high = mean_ci(
                    [t.user_attrs["test"][name] for t in seeds if name in t.user_attrs["test"]]
                )
                metrics |= {
                    f"test_{name}_mean": mean,
                    f"test_{name}_ci95_low": low,
                    f"test_{name}_ci95_high": high,
                }
        metrics |= {f"baseline_test_{k}": v for k, v in self._baseline(study).items()}
        metrics = {k: float(v) for k, v in metrics.items() if v is not None and not math.isnan(float(v))}
        self.tracker.log_metrics(parent.info.run_id, metrics)
        self.tracker.set_tags(parent.info.run_id, tags)
        self.tracker.end_run(parent.info.run_id, "FINISHED")

    def _baseline(self, study: Study) -> dict[str, float]:
        """The task's trivial baseline on test, for the report to show beside the architectures."""
        try:
            return dict(self._task(study).baseline("test"))
        except Exception as exc:  # a plugin's baseline must not cost the finished study
            self.progress.log(f"warning: baseline of {study.task_entry.name} failed: {exc}")
            return {}


def _failure(exc: BaseException) -> tuple[str, str]:
    import torch

    if isinstance(exc, TrialFailed):
        return exc.reason, str(exc)
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "out_of_memory", f"out of memory: {str(exc).splitlines()[0] if str(exc) else ''}"
    return "exception", f"{type(exc).__name__}: {exc}"


def _release_memory(failed: bool) -> None:
    """Give a trial's memory back before the next one. A full gc pass costs ~0.5 s with MLflow
    loaded, so it runs only where it pays: after a failure (cycles through the traceback) or on GPU."""
    import torch

    if failed or torch.cuda.is_available():
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def summarize(plan: Plan, tracker, sweep) -> dict[str, Any]:
    """Per study: counted trials by state and final seeds (what the CLI prints at the end)."""
    from optuna.trial import TrialState

    rows = []
    for study in plan.studies:
        direction = _direction(study)
        trials = sweep.search_study(study, direction).get_trials(deepcopy=False)
        finals = sweep.final_study(study, direction).get_trials(deepcopy=False)
        seeds = [t for t in finals if t.state == TrialState.COMPLETE]
        primary = _primary(study).name
        mean, low, high = mean_ci([t.value for t in seeds])
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        rows.append(
            {
                "study": study.name,
                "complete": len(complete),
                "pruned": sum(t.state == TrialState.PRUNED for t in trials),
                "failed": sum(
                    t.state == TrialState.FAIL and not t.user_attrs.get("interrupted") for t in trials
                ),
                "interrupted": sum(bool(t.user_attrs.get("interrupted")) for t in trials),
                "best_valid": min(t.value for t in complete)
                if complete and direction == "minimize"
                else (max(t.value for t in complete) if complete else math.nan),
                "seeds": len(seeds),
                "test_mean": mean,
                "test_ci95": (low, high),
                "metric": primary,
            }
        )
    return {"studies": rows, "home": str(plan.home), "tracking_uri": plan.tracking_uri}
