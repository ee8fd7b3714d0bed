"""One trial or final seed, trained: configuration in, :class:`Outcome` out.

It knows no store. What it learns along the way goes to a :class:`TrialHooks` the caller gives it
(MLflow's live metrics, progress lines, the pruner's verdict), and what it returns is the whole
record the ledger keeps, plus the model and per-item outputs of a final seed for the caller to
save. Writing any of it is rnnbench.workers' job.
"""

from __future__ import annotations

import gc
import json
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch

from rnnbench.errors import TrialFailed
from rnnbench.experiment import BudgetSpec, Study
from rnnbench.faults import fault
from rnnbench.sizing import solve_hidden_size
from rnnbench.trainer import Budget, Callback, RunSettings, Trainer


def now_ms() -> int:
    return int(time.time() * 1000)


class TrialHooks:
    """What a running trial tells its caller; each method is a no-op here."""

    def counts(self, counts: dict[str, float], time_ms: int) -> None:
        """Parameter counts, once, before training."""

    def epoch(self, epoch: int, metrics: dict[str, float], time_ms: int) -> None:
        """One validation's metrics."""

    def should_prune(self, value: float, epoch: int) -> bool:
        """A search trial's primary validation value so far: stop it here?"""
        return False

    def progress(self, epoch: int, epochs: int | str, primary: str, value: float) -> None:
        """For the progress line."""

    def fit_ended(self) -> None:
        """Training is over (finished, pruned or failed): what follows is recording its result."""


@dataclass
class Outcome:
    """How a trial ended: ``status`` is complete, pruned, failed or interrupted; ``record`` is
    what the ledger keeps; ``value`` the number the study optimises (complete only)."""

    status: str
    record: dict[str, Any]
    value: float | None = None
    detail: str = ""
    reason: str | None = None  # failed: the failure reason (out_of_memory, exception, ...)
    model: Any = None  # a complete final seed's model
    items: Any = None  # a complete final seed's per-item outputs
    extra: dict[str, Any] = field(default_factory=dict)


class _Recorder(Callback):
    """Keeps the history the record carries and passes each validation to the hooks."""

    def __init__(self, hooks: TrialHooks, primary: str, epochs: int | str, extra_counts: dict[str, float]):
        self.hooks, self.primary, self.epochs, self.extra_counts = hooks, primary, epochs, extra_counts
        self.history: list[dict[str, Any]] = []
        self.parameters: dict[str, float] = {}
        self.data: dict[str, Any] = {}
        self.started_ms = now_ms()

    def on_fit_start(self, info: dict[str, Any]) -> None:
        params = info["parameters"]
        counts = {"params_total": params["total"], **self.extra_counts}
        if params.get("encoder"):
            counts |= {f"params_encoder_{k}": params["encoder"][k] for k in ("total", "input", "recurrent")}
        self.parameters, self.data = counts, dict(info["data"])
        self.hooks.counts(counts, self.started_ms)

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        entry = {"epoch": epoch, "time_ms": now_ms(), "metrics": {k: float(v) for k, v in metrics.items()}}
        self.history.append(entry)
        self.hooks.epoch(epoch, metrics, entry["time_ms"])
        fault("mid_trial")
        fault("mid_trial_sigstop")
        value = metrics[f"valid_{self.primary}"]
        self.hooks.progress(epoch, self.epochs, self.primary, value)
        if self.hooks.should_prune(value, epoch):
            raise optuna.TrialPruned(f"pruned at epoch {epoch} ({self.primary}={value:.4g})")

    def fields(self) -> dict[str, Any]:
        return {"history": self.history, "parameters": self.parameters, "data": self.data}


class HiddenSizes:
    """The hidden size a study's parameter budget gives each configuration, solved once."""

    def __init__(self):
        self._solved: dict[str, int] = {}

    def hparams(self, study: Study, task, params: dict[str, Any]) -> dict[str, Any]:
        """The trial's whole configuration; under a parameter budget, hidden_size is solved from
        it (so a searched embedding size is paid for out of the same budget)."""
        hp = {**study.fixed_hparams, **params}
        if study.parameter_budget:
            key = json.dumps([study.name, hp], sort_keys=True, default=str)
            if key not in self._solved:
                self._solved[key] = solve_hidden_size(task, study, study.parameter_budget, hp)
            hp["hidden_size"] = self._solved[key]
        return hp


def trainer_budget(spec: BudgetSpec, epochs: int) -> Budget:
    improvement, relative = spec.improvement()
    return Budget(
        epochs=epochs,
        max_steps=spec.max_steps,
        eval_every=spec.eval_every,
        steps_per_epoch=spec.steps_per_epoch,
        max_minutes=spec.max_minutes_per_trial,
        patience=spec.patience,
        min_improvement=improvement,
        min_improvement_relative=relative,
    )


def run_trial(
    study: Study,
    task,
    hp: dict[str, Any],
    *,
    stage: str,
    seed: int,
    epochs: int,
    shown_epochs: int | str,
    settings: RunSettings,
    hooks: TrialHooks,
    record: dict[str, Any],
) -> Outcome:
    """Train ``hp`` on ``task`` (set up) with ``seed``; a final seed is also scored on test.
    ``record`` holds what the caller already knows (hparams, seed, worker, ...). A Ctrl-C in
    training returns an ``interrupted`` outcome (the caller re-raises after recording it)."""
    primary = task.primary_metric.name
    target = {"params_target": study.parameter_budget} if study.parameter_budget else {}
    recorder = _Recorder(hooks, primary, shown_epochs, target)
    record = {**record, "started_ms": recorder.started_ms}
    trainer = Trainer(trainer_budget(study.budget, epochs), settings)
    failed = True
    try:
        result = trainer.fit(
            task,
            study.arch,
            hp,
            seed=seed,
            evaluate_test=stage == "final",
            callbacks=[recorder],
            setup_done=True,
        )
        hooks.fit_ended()
        if stage == "final":
            fault("final_oom")
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
        outcome = Outcome("complete", record, value, f"{primary}={value:.4g}")
        if stage == "final":
            outcome.model, outcome.items = result.model, result.items
    except optuna.TrialPruned as exc:
        hooks.fit_ended()
        failed = False
        record |= {"status": "pruned", "stop_reason": "pruned", "failure_message": str(exc)}
        outcome = Outcome("pruned", record, detail=str(exc))
    except KeyboardInterrupt:
        record |= {"status": "interrupted"}
        outcome = Outcome("interrupted", record)
    except Exception as exc:  # one bad configuration or plugin must not stop the sweep
        hooks.fit_ended()
        reason, message = failure(exc)
        record |= failed_fields(reason, message)
        outcome = Outcome("failed", record, detail=message, reason=reason)
    finally:
        release_memory(failed)
    outcome.record |= {**recorder.fields(), "finished_ms": now_ms()}
    return outcome


def failed_before_training(exc: Exception, record: dict[str, Any]) -> Outcome:
    """A trial that failed before training (task set-up, sampling, sizing): its record, as any
    other failed trial's; call inside the ``except``."""
    reason, message = failure(exc)
    record = {
        **record,
        **failed_fields(reason, message),
        "history": [],
        "parameters": {},
        "data": {},
        "finished_ms": now_ms(),
    }
    return Outcome("failed", record, detail=message, reason=reason)


def failure(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, TrialFailed):
        return exc.reason, str(exc)
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "out_of_memory", f"out of memory: {str(exc).splitlines()[0] if str(exc) else ''}"
    return "exception", f"{type(exc).__name__}: {exc}"


def failed_fields(reason: str, message: str) -> dict[str, Any]:
    """A failed trial's record fields; called inside the ``except`` (the traceback is its)."""
    return {
        "status": "failed",
        "failure_reason": reason,
        "failure_message": message[:500],
        "artifacts": {"traceback.txt": traceback.format_exc()},
    }


def release_memory(failed: bool) -> None:
    """Give a trial's memory back before the next one. A full gc pass costs ~0.5 s with MLflow
    loaded, so it runs only where it pays: after a failure (cycles through the traceback) or on GPU."""
    if failed or torch.cuda.is_available():
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
