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
import tempfile
from pathlib import Path
from typing import Any

import torch

from rnnbench.errors import DataError
from rnnbench.portable import requirements_for
from rnnbench.tracking import SUMMARY_STEP

# mlflow is imported where used: +2-3 s on `import rnnbench.models`, which `rnnbench check` and
# `rnnbench run --dry-run` import (through the trainer) without logging a model.

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
