"""Trained models: a final seed's weights kept beside the ledger, logged as MLflow models, exported.

The weights file is written before the trial's ledger record names it, so a record never points at
a missing file. The MLflow model is a projection of that file: logged when the seed ends, and
logged again by ``rnnbench sync`` wherever it is missing (a crash in between, a lost store).
Logged or exported, a model carries wheels of the code its pickle needs (rnnbench, plugins) and
pinned requirements that name them, so MLflow installs and serves it anywhere (rnnbench.portable).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from rnnbench.errors import DataError, first_line

MODELS_DIR = "models"  # under the run home
CARD = "rnnbench_model.json"  # task, architecture, hyperparameters, metrics, preprocessing
WEIGHTS = "state_dict.pt"  # the same weights, loadable with torch.load(..., weights_only=True)


def logged_model_name(study_name: str, seed: Any) -> str:
    """``<task-label>_<architecture>_seed-<s>``: a logged model a person can tell apart in MLflow's
    Models list (MLflow's model names allow no ``/``, ``.`` or ``:``)."""
    label = study_name.split("/", 1)[-1].replace("/", "_")
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{label}_seed-{seed}")


def weights_path(home: Path, study_name: str, seed: int, trial: int | None = None) -> Path:
    """``models/<experiment>/<task label>/<architecture>/seed-<s>.trial-<n>.pt``: one folder per
    part of the study name, so no experiment can reach another's weights, and one file per trial,
    so a seed's rerun never overwrites the file a recorded trial names (records keep the path they
    were written to, so weights saved under an older layout, ``seed-<s>.pt``, still load)."""
    parts = [_folder_name(part) for part in study_name.split("/")]
    name = f"seed-{seed}" if trial is None else f"seed-{seed}.trial-{trial}"
    return Path(home).joinpath(MODELS_DIR, *parts, f"{name}.pt")


def _folder_name(part: str) -> str:
    """``part`` itself when it is a plain name; otherwise made safe and suffixed with a hash of the
    original, so no part is '.' or '..' and two parts never share a folder ('a+b' and 'a_b')."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", part)
    if safe == part and part.strip("."):
        return part
    return f"{safe.replace('.', '_')}-{hashlib.sha256(part.encode()).hexdigest()[:8]}"


def save_weights(
    home: Path, study_name: str, seed: int, model: torch.nn.Module, trial: int | None = None
) -> dict[str, str]:
    """Write ``model``'s weights atomically; returns what the ledger record keeps: path and sha256."""
    path = weights_path(home, study_name, seed, trial)
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
    data = buffer.getvalue()
    write_atomically(path, data)
    return {"path": path.relative_to(home).as_posix(), "sha256": hashlib.sha256(data).hexdigest()}


def write_atomically(path: Path, data: bytes) -> None:
    """``data`` at ``path``, whole or not at all: a crash never leaves half a file a record names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_recorded(home: Path, ref: dict[str, Any], what: str, fetch=None) -> bytes:
    """The run-home file a ledger record names (``path``, ``sha256``), checked: DataError when it
    is missing or changed since the record was written. ``fetch``: where the run home lacks it,
    its copy from elsewhere (the MLflow run's artifact), checked the same way."""
    path = Path(home) / ref["path"]
    try:
        data = path.read_bytes()
    except OSError as exc:
        if fetch is None:
            raise DataError(f"{what} {path} cannot be read ({exc.strerror or exc})") from None
        data = fetch()
    if hashlib.sha256(data).hexdigest() != ref["sha256"]:
        raise DataError(f"{what} {path} changed since the ledger recorded them (sha256 differs)")
    return data


def load_weights(home: Path, weights: dict[str, str], fetch=None) -> dict[str, torch.Tensor]:
    data = read_recorded(home, weights, "weights", fetch)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def rebuild(task, study, record: dict[str, Any], home: Path, fetch=None) -> torch.nn.Module:
    """The final seed's model from its ledger record and weights file (``task`` set up; ``fetch``:
    see :func:`read_recorded`)."""
    from rnnbench.trainer import build_model

    model = build_model(task, study.arch, record["hparams"])
    model.load_state_dict(load_weights(home, record["weights"], fetch))
    return model.eval()


def model_card(task, study, record: dict[str, Any]) -> dict[str, Any]:
    """Everything but the weights a user needs to run the model and know what it is."""
    arch = study.arch
    return {
        "study": study.name,
        "task": study.task_entry.name,
        "dataset": study.task_entry.dataset,
        "task_options": task.options.model_dump(mode="json") if hasattr(task, "options") else {},
        "architecture": {"cell": arch.cell, "layers": arch.layers, "bidirectional": arch.bidirectional},
        "hparams": record["hparams"],
        "seed": record.get("seed"),
        "test": record.get("test"),
        "best_valid": record.get("best_valid"),
        "weights_sha256": record["weights"]["sha256"],
        "preprocessing": task.export_state(),
    }


def _requirements(task, serving: torch.nn.Module, *, strict: bool):
    """Pinned here so MLflow need not infer them (a subprocess that reloads the model, seconds),
    with wheels of the packages no index has (rnnbench from a checkout, plugins): see portable."""
    from rnnbench.portable import requirements_for

    return requirements_for(serving, type(task), wheel_dir=Path("extra_files"), strict=strict)


def _signature(example: torch.Tensor, output: torch.Tensor):
    """Tensor specs with the batch axis free and, since a recurrent model reads any length, the
    time axis (axis 1) free too, in the output as well where it follows the input's."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    def spec(t: torch.Tensor, free_time: bool) -> TensorSpec:
        shape = [-1, *t.shape[1:]]
        if free_time and t.dim() >= 2:
            shape[1] = -1
        return TensorSpec(t.numpy().dtype, tuple(shape))

    follows = output.dim() >= 3 and output.shape[1] == example.shape[1]
    return ModelSignature(Schema([spec(example, True)]), Schema([spec(output, follows)]))


def serve(task, model: torch.nn.Module) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """(serving module, example input, its output): what a logged model is made of. The contract
    check calls it too, so a task whose serving form is broken is named before a run."""
    serving = task.serving_model(model).eval()
    example = task.serving_example()
    with torch.no_grad():
        output = serving(example)
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"serving_model(model) must return one tensor, got {type(output).__name__}")
    return serving, example, output


_NOTED: set[str] = set()


def _flavor_args(
    task, model: torch.nn.Module, card: dict[str, Any], workdir: Path, *, strict: bool = True
) -> dict[str, Any]:
    serving, example, output = serve(task, model)
    requirements = _requirements(task, serving, strict=strict)
    for note in set(requirements.notes) - _NOTED:  # once per process, not once per seed
        _NOTED.add(note)
        logging.getLogger(__name__).warning("warning: logged models do not install elsewhere: %s", note)
    card_path = workdir / CARD
    card_path.write_text(json.dumps(card, indent=1, default=str))
    weights_file = workdir / WEIGHTS
    torch.save(model.state_dict(), weights_file)
    return {
        "signature": _signature(example, output),
        "input_example": example.numpy(),
        # the wheels go in extra_files/ too: requirements.txt names them relative to the model
        "extra_files": [str(card_path), str(weights_file), *map(str, requirements.wheels)],
        "pip_requirements": requirements.lines,
        "metadata": {k: card[k] for k in ("study", "task", "dataset", "architecture", "seed")},
        # pickle: torch.export cannot trace packed variable-length batches (data-dependent shapes)
        "serialization_format": "pickle",
    }, serving


class _WithoutPickleNotice(logging.Filter):
    """MLflow warns on every pickled model it saves (one line per final seed, 119 in the reference
    run). rnnbench pickles on purpose (see _flavor_args) and says so in the README, once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "by Pickle or CloudPickle" not in record.getMessage()


def _quiet_pickle_notice() -> None:
    log = logging.getLogger("mlflow.pytorch")
    if not any(isinstance(f, _WithoutPickleNotice) for f in log.filters):
        log.addFilter(_WithoutPickleNotice())


def log_model(tracker, run_id: str, task, model: torch.nn.Module, card: dict[str, Any]) -> str:
    """Log ``model`` as the run's MLflow model (pytorch flavour, signature, input example, card).
    MLflow links the run's metrics at the model's step to it: the summary step, where the counts,
    the best validation scores and the test scores are (the run is projected first)."""
    import mlflow
    import mlflow.pytorch

    from rnnbench.projection import SUMMARY_STEP

    _quiet_pickle_notice()
    mlflow.set_tracking_uri(tracker.uri)
    mlflow.set_experiment(experiment_id=tracker.experiment_id)  # logged models go to the active one
    with tempfile.TemporaryDirectory() as tmp:
        # not strict: a wheel that cannot be built costs the model its portability, not its log
        args, serving = _flavor_args(task, model, card, Path(tmp), strict=False)
        name = logged_model_name(card["study"], card["seed"])
        info = mlflow.pytorch.log_model(serving, name=name, run_id=run_id, step=SUMMARY_STEP, **args)
    return info.model_id


def save_model(path: Path, task, model: torch.nn.Module, card: dict[str, Any]) -> None:
    """A self-contained MLflow model directory at ``path`` (what ``rnnbench export`` writes)."""
    import mlflow.pytorch

    _quiet_pickle_notice()
    with tempfile.TemporaryDirectory() as tmp:
        args, serving = _flavor_args(task, model, card, Path(tmp))
        mlflow.pytorch.save_model(serving, str(path), **args)


def runs_with_models(tracker) -> set[str]:
    """Run ids that already have their logged model (one query for the whole experiment)."""
    import mlflow

    mlflow.set_tracking_uri(tracker.uri)
    # every logged model of the experiment is a final seed's (named after it, or "model" before)
    models = mlflow.search_logged_models(experiment_ids=[tracker.experiment_id], output_format="list")
    return {m.source_run_id for m in models if m.source_run_id}


def repair_models(tracker, storage, experiment: str, home: Path, warn=print) -> int:
    """Log the model of every finished final seed whose run lacks one and whose weights are in
    this run home (a worker killed between its ledger write and its model log, or a lost store).
    Returns how many were logged. A model that cannot be logged (a task whose serving form is
    broken) is one warning, once per study, and never stops the sync or the report.
    The seeds' per-item outcomes, the other run-home file MLflow mirrors, are repaired first."""
    from rnnbench.experiment import expand, parse
    from rnnbench.ledger import YAML_ATTR, StudyLedger
    from rnnbench.projection import repair_files
    from rnnbench.sweep import record_of, study_names

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
    from rnnbench.ledger import StudyLedger
    from rnnbench.sweep import record_of

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
    from rnnbench.experiment import expand, parse
    from rnnbench.ledger import YAML_ATTR, StudyLedger

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
        from rnnbench.projection import mirrored_path

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
    import mlflow

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
