"""A study's trained models as a person uses them: the best seed (chosen on validation) rebuilt
from the ledger and its weights, exported as a self-contained MLflow model folder, registered in
the Model Registry, and the logged models a lost MLflow store lacks, repaired."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from rnnbench.errors import DataError, first_line
from rnnbench.experiment import expand, parse
from rnnbench.ledger import YAML_ATTR, StudyLedger
from rnnbench.models import load_weights, log_model, model_card, runs_with_models, save_model
from rnnbench.projection import mirrored_path, repair_files
from rnnbench.sweep import record_of, study_names
from rnnbench.trainer import build_model


def rebuild(task, study, record: dict[str, Any], home: Path, fetch=None) -> torch.nn.Module:
    """The final seed's model from its ledger record and weights file (``task`` set up; ``fetch``:
    see :func:`read_recorded`)."""

    model = build_model(task, study.arch, record["hparams"])
    model.load_state_dict(load_weights(home, record["weights"], fetch))
    return model.eval()


def repair_models(tracker, storage, experiment: str, home: Path, warn=print) -> int:
    """Log the model of every finished final seed whose run lacks one and whose weights are in
    this run home (a worker killed between its ledger write and its model log, or a lost store).
    Returns how many were logged. A model that cannot be logged (a task whose serving form is
    broken) is one warning, once per study, and never stops the sync or the report.
    The seeds' per-item outcomes, the other run-home file MLflow mirrors, are repaired first."""

    have, index = runs_with_models(tracker), tracker.runs_by_key()
    repair_files(tracker, storage, experiment, home, warn, index)
    studies, tasks, logged = None, {}, 0
    for name in study_names(storage, experiment):
        led = StudyLedger.load(storage, name)
        if led is None:
            continue
        for t in led.final_trials:
            record = record_of(t) or {}
            runs = index.get((name, "final", str(t.number)), [])
            if record.get("status") != "complete" or "weights" not in record or not runs:
                continue
            if runs[0].info.run_id in have or not (Path(home) / record["weights"]["path"]).is_file():
                continue
            if studies is None:
                studies = {s.name: s for s in expand(parse(led.attrs[YAML_ATTR]))[0]}
            study = studies[name]
            key = json.dumps(study.task_entry.model_dump(), sort_keys=True)
            if key not in tasks:
                tasks[key] = study.make_task()
                tasks[key].setup()
            task = tasks[key]
            try:
                model = rebuild(task, study, record, home)
                card = model_card(task, study, record)
                log_model(tracker, runs[0].info.run_id, task, model, card)
            except DataError:
                raise
            except Exception as exc:
                warn(
                    f"warning: models of {name} not logged ({first_line(exc, 200)}); its scores are all in MLflow"
                )
                break
            logged += 1
    return logged


def best_seed(storage, study_name: str) -> dict[str, Any]:
    """The final seed of ``study_name`` best on *validation* (never chosen on test), with weights.
    Returns its ledger record plus ``trial`` (number) and ``study`` (name)."""

    led = StudyLedger.load(storage, study_name)
    if led is None:
        raise DataError(f"the ledger has no study {study_name!r}")
    primary, sign = None, 1.0 if led.direction == "minimize" else -1.0
    candidates = []
    for t in led.final_trials:
        record = record_of(t) or {}
        if record.get("status") == "complete" and "weights" in record:
            primary = primary or next(iter(record["test"]))
            candidates.append((sign * record["best_valid"].get(primary, float("inf")), t.number, record))
    if not candidates:
        raise DataError(f"{study_name} has no finished final seed with saved weights (run it to the end)")
    _, number, record = min(candidates, key=lambda c: c[:2])
    return record | {"trial": number, "study": study_name}


def study_of(storage, study_name: str):
    """The Study object of ``study_name``, rebuilt from the experiment file its ledger keeps."""

    led = StudyLedger.load(storage, study_name)
    studies = {s.name: s for s in expand(parse(led.attrs[YAML_ATTR]))[0]}
    return studies[study_name]


def export(storage, study_name: str, home: Path, out: Path, tracker=None) -> dict[str, Any]:
    """Write the best seed of ``study_name`` as a self-contained MLflow model directory. Its
    weights come from the run home, or where the home lacks them (gone with a Slurm job's
    $TMPDIR, another machine's) from the seed's MLflow run via ``tracker``."""
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not empty: choose a new folder for the model")
    record = best_seed(storage, study_name)
    study = study_of(storage, study_name)
    task = study.make_task()
    task.setup()
    try:
        model = rebuild(task, study, record, home, _weights_from_mlflow(tracker, study_name, record))
    except DataError as exc:
        if tracker is not None:
            raise
        raise DataError(f"{exc}; pass --tracking-uri of the MLflow store the run logged to") from None
    # Built beside ``out`` and renamed into place: a failure half-way leaves no half a model there.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_model(staging / "model", task, model, model_card(task, study, record))
        if out.exists():
            out.rmdir()  # the empty folder checked above
        (staging / "model").rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record


def _weights_from_mlflow(tracker, study_name: str, record: dict[str, Any]):
    """A fetch of the final seed's weights from its MLflow run's artifact (None without a tracker)."""
    if tracker is None:
        return None

    def fetch() -> bytes:

        runs = tracker.runs_by_key().get((study_name, "final", str(record["trial"])), [])
        if not runs:
            raise DataError(
                f"{study_name}: the run home has no weights for seed {record['seed']} and MLflow has "
                "no run for it: pass the run home (--home) or run `rnnbench sync` there"
            )
        try:
            return tracker.read_artifact(runs[0].info.run_id, mirrored_path("weights"))
        except Exception as exc:
            raise DataError(
                f"{study_name}: the weights of seed {record['seed']} are neither in the run home nor in "
                f"its MLflow run ({first_line(exc, 120)})"
            ) from None

    return fetch


def register(tracker, storage, study_name: str, home: Path) -> tuple[str, str]:
    """Register the best seed's logged model as ``<study name with / as .>``; (name, version)."""
    import mlflow  # local: +2-3 s on `import rnnbench.exports`, which `rnnbench run --dry-run` imports

    record = best_seed(storage, study_name)
    run = tracker.runs_by_key().get((study_name, "final", str(record["trial"])), [])
    if not run:
        raise DataError(f"{study_name}: the best seed has no MLflow run yet; run `rnnbench sync` first")
    mlflow.set_tracking_uri(tracker.uri)
    models = mlflow.search_logged_models(
        experiment_ids=[tracker.experiment_id],
        filter_string=f"source_run_id = '{run[0].info.run_id}'",
        output_format="list",
    )
    if not models:
        raise DataError(f"{study_name}: the best seed's model is not logged; run `rnnbench sync` first")
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", study_name.replace("/", "."))
    version = mlflow.register_model(f"models:/{models[0].model_id}", name)
    return name, str(version.version)
