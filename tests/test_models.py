"""Trained models: every final seed's weights are logged as an MLflow model that reloads and
scores what the ledger says; a lost model is logged again by sync; export and registry."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import torch

from rnnbench.exports import best_seed
from rnnbench.ledger import StudyLedger
from rnnbench.models import CARD, WEIGHTS
from rnnbench.sweep import open_storage, record_of, study_names
from tests.helpers import run_cli

EXPERIMENT = """\
name: mdl
cells: [gru]
tasks:
  - {name: sentiment, dataset: synthetic}
  - {name: ner, dataset: synthetic}
  - {name: charlm, dataset: synthetic, options: {seq_len: 16}}
fixed: {hidden_size: 12}
budget: {trials: 0, epochs: 1, steps_per_epoch: 4}
final: {seeds: 2}
"""


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A run home whose experiment ran to the end."""
    root = tmp_path_factory.mktemp("models")
    (root / "mdl.yaml").write_text(EXPERIMENT)
    result = run_cli(["run", "mdl.yaml"], root / "home", root)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "not logged" not in result.stdout + result.stderr
    return root


def _logged_models(home: Path) -> list:
    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name("mdl")
    return mlflow.search_logged_models(experiment_ids=[experiment.experiment_id], output_format="list")


def _final_records(home: Path) -> dict[str, dict]:
    """run id -> (study, ledger record) of every final seed."""
    storage = open_storage(str(home / "optuna.journal"), home)
    out = {}
    for name in study_names(storage, "mdl"):
        led = StudyLedger.load(storage, name)
        for t in led.final_trials:
            out[t.user_attrs["mlflow_run_id"]] = (name, record_of(t))
    return out


def test_every_final_seed_reloads_from_mlflow_and_reproduces_its_test_metric(finished: Path):
    from rnnbench.exports import study_of

    home = finished / "home"
    models, records = _logged_models(home), _final_records(home)
    assert {m.source_run_id for m in models} == set(records)  # one model per final seed, no more
    assert len(models) == 6
    storage = open_storage(str(home / "optuna.journal"), home)
    for logged in models:
        name, record = records[logged.source_run_id]
        study = study_of(storage, name)
        task = study.make_task()
        task.setup()
        serving = mlflow.pytorch.load_model(f"models:/{logged.model_id}")
        model = getattr(serving, "model", serving)  # text tasks wrap the trained model for serving
        with torch.no_grad():
            scores = task.evaluate(model, "test", 7, device=torch.device("cpu"))
        for metric, value in record["test"].items():
            assert scores[metric] == pytest.approx(value, rel=1e-5, abs=1e-7), (name, metric)
        # what a user of the model reads next to it: task, architecture, preprocessing
        info = mlflow.models.get_model_info(f"models:/{logged.model_id}")
        assert info.metadata["study"] == name and info.metadata["architecture"]["cell"] == "gru"
        assert info.signature is not None and info.saved_input_example_info is not None
        card = json.loads(mlflow.artifacts.load_text(f"{logged.artifact_location}/extra_files/{CARD}"))
        assert card["preprocessing"] and card["test"] == record["test"]
        if study.task_entry.name != "charlm":
            assert "vocabulary" in card["preprocessing"]


def test_the_served_model_answers_its_input_example(finished: Path):
    home = finished / "home"
    for logged in _logged_models(home):
        served = mlflow.pyfunc.load_model(f"models:/{logged.model_id}")
        example = served.input_example
        prediction = served.predict(example)
        assert np.all(np.isfinite(np.asarray(prediction)))


def test_sync_logs_a_lost_model_from_the_weights_file_once(finished: Path, tmp_path: Path):
    import shutil

    home = tmp_path / "home"
    shutil.copytree(finished / "home", home)
    models = _logged_models(home)
    lost = models[0]
    mlflow.MlflowClient().delete_logged_model(lost.model_id)
    first = run_cli(["sync", "mdl", "--home", str(home)], home, tmp_path)
    again = run_cli(["sync", "mdl", "--home", str(home)], home, tmp_path)
    assert "1 model(s) logged" in first.stdout, first.stdout + first.stderr
    assert "0 model(s) logged" in again.stdout, again.stdout + again.stderr
    assert {m.source_run_id for m in _logged_models(home)} == {m.source_run_id for m in models}


def test_export_writes_a_self_contained_model_of_the_best_seed_on_validation(finished: Path, tmp_path: Path):
    home = finished / "home"
    out = tmp_path / "exported"
    result = run_cli(["export", "mdl", "sentiment-synthetic/gru-1L-uni", "--out", str(out)], home, tmp_path)
    assert result.returncode == 0, result.stderr
    storage = open_storage(str(home / "optuna.journal"), home)
    best = best_seed(storage, "mdl/sentiment-synthetic/gru-1L-uni")
    assert f"seed {best['seed']}" in result.stdout
    card = json.loads((out / "extra_files" / CARD).read_text())
    assert card["seed"] == best["seed"] and card["preprocessing"]["vocabulary"][:2] == ["<pad>", "<unk>"]
    # the weights load without unpickling code, and equal the model MLflow reloads
    weights = torch.load(out / "extra_files" / WEIGHTS, weights_only=True)
    reloaded = mlflow.pytorch.load_model(str(out)).model.state_dict()
    assert weights.keys() == reloaded.keys() and all(torch.equal(weights[k], reloaded[k]) for k in weights)
    # a second export into the same folder is refused, and the first stays whole
    again = run_cli(["export", "mdl", "sentiment-synthetic/gru-1L-uni", "--out", str(out)], home, tmp_path)
    assert again.returncode == 2 and "not empty" in again.stderr and "Traceback" not in again.stderr
    assert (out / "MLmodel").is_file()


def test_register_puts_each_studys_best_seed_in_the_model_registry(finished: Path, tmp_path: Path):
    import shutil

    home = tmp_path / "home"
    shutil.copytree(finished / "home", home)
    result = run_cli(["register", "mdl", "ner-synthetic/gru-1L-uni", "--home", str(home)], home, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "as mdl.ner-synthetic.gru-1L-uni version 1" in result.stdout
    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    version = mlflow.MlflowClient().get_model_version("mdl.ner-synthetic.gru-1L-uni", "1")
    storage = open_storage(str(home / "optuna.journal"), home)
    best = best_seed(storage, "mdl/ner-synthetic/gru-1L-uni")
    assert version.run_id == _run_of(home, "mdl/ner-synthetic/gru-1L-uni", best["trial"])


def _run_of(home: Path, study: str, trial: int) -> str:
    storage = open_storage(str(home / "optuna.journal"), home)
    led = StudyLedger.load(storage, study)
    return next(t.user_attrs["mlflow_run_id"] for t in led.final_trials if t.number == trial)


def test_a_changed_weights_file_is_refused(finished: Path, tmp_path: Path):
    import shutil

    home = tmp_path / "home"
    shutil.copytree(finished / "home", home)
    storage = open_storage(str(home / "optuna.journal"), home)
    best = best_seed(storage, "mdl/charlm-synthetic/gru-1L-uni")
    path = home / best["weights"]["path"]
    path.write_bytes(path.read_bytes() + b"x")
    result = run_cli(
        ["export", "mdl", "charlm-synthetic/gru-1L-uni", "--out", str(tmp_path / "o")], home, tmp_path
    )
    assert result.returncode == 2 and "changed since the ledger recorded them" in result.stderr


def test_a_model_that_cannot_be_served_is_one_warning_and_the_sync_goes_on(
    finished: Path, tmp_path: Path, monkeypatch
):
    import shutil

    from rnnbench.exports import repair_models
    from rnnbench.tasks.sentiment import SentimentTask
    from rnnbench.tracking import Tracker

    home = tmp_path / "home"
    shutil.copytree(finished / "home", home)
    records = _final_records(home)
    lost = [m for m in _logged_models(home) if records[m.source_run_id][0].startswith("mdl/sentiment")]
    for model in lost:
        mlflow.MlflowClient().delete_logged_model(model.model_id)

    def broken(self, model):
        raise TypeError("forward() missing 1 required positional argument: 'lengths'")

    monkeypatch.setattr(SentimentTask, "serving_model", broken)
    tracker = Tracker(f"sqlite:///{home / 'mlflow.db'}", "mdl", artifact_root=home / "artifacts")
    storage = open_storage(str(home / "optuna.journal"), home)
    warnings: list[str] = []
    assert repair_models(tracker, storage, "mdl", home, warn=warnings.append) == 0
    assert len(warnings) == 1 and "mdl/sentiment-synthetic/gru-1L-uni" in warnings[0]
    assert "'lengths'" in warnings[0]
    monkeypatch.undo()  # the task's own serving form again: the next sync logs what was missing
    assert repair_models(tracker, storage, "mdl", home, warn=warnings.append) == len(lost) == 2


def test_logged_models_ship_the_rnnbench_wheel_their_requirements_name(finished: Path, tmp_path: Path):
    """A checkout's rnnbench is on no index: the model carries its wheel (see rnnbench.portable)."""
    import zipfile

    logged = _logged_models(finished / "home")[0]
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{logged.model_id}", dst_path=str(tmp_path)))
    lines = (local / "requirements.txt").read_text().split()
    assert not any(line.startswith("rnnbench==") for line in lines)
    wheel = next(line for line in lines if Path(line).name.startswith("rnnbench-"))
    assert not Path(wheel).is_absolute() and zipfile.is_zipfile(local / wheel)
    assert "rnnbench/models.py" in zipfile.ZipFile(local / wheel).namelist()
    assert any(line.startswith("torch==") and "+" not in line for line in lines)  # no +cpu
