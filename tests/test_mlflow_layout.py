"""What a user finds in the MLflow UI: experiment kind and description, the experiment file on each
study run, datasets, source tags and system metrics on trial runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

EXPERIMENT = """\
name: layout
cells: [gru]
tasks:
  - name: memory
    options: {problem: adding, seq_len: 20, train_size: 8192, valid_size: 64, test_size: 64}
fixed: {hidden_size: 16}
budget: {trials: 0, epochs: 3}
final: {seeds: 1}
"""


def test_mlflow_shows_experiment_datasets_source_and_system_metrics(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    from rnnbench.tracking import tracking_uri_for

    path = tmp_path / "layout.yaml"
    path.write_text(EXPERIMENT)
    home = tmp_path / "home"
    env = {**os.environ, "RNNBENCH_HOME": str(home), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "rnnbench.cli", "run", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    client = MlflowClient(tracking_uri_for(home))
    exp = client.get_experiment_by_name("layout")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # not the GenAI view
    note = exp.tags["mlflow.note.content"]
    assert "final:" in note and "seeds: 1" in note

    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags["rnnbench.stage"] == "study")
    text = client.download_artifacts(parent.info.run_id, "experiment.yaml", str(tmp_path / "dl"))
    as_run = yaml.safe_load(Path(text).read_text())
    assert as_run["budget"]["epochs"] == 3 and as_run["pruner"]["name"] == "median"  # defaults filled in

    child = client.get_run(next(r for r in runs if r.data.tags["rnnbench.stage"] == "final").info.run_id)
    assert child.data.tags["mlflow.source.name"] == "rnnbench"
    inputs = child.inputs.dataset_inputs
    assert [i.dataset.name for i in inputs] == ["memory-synthetic"]
    assert '"train_size": 8192' in inputs[0].dataset.profile or "8192" in inputs[0].dataset.profile
    assert any(k.startswith("system/") for k in child.data.metrics), sorted(child.data.metrics)

    # one-off values are one point each at step 0 (MLflow draws a bar); the series start at step 1
    def steps(key: str) -> list[int]:
        return [m.step for m in client.get_metric_history(child.info.run_id, key)]

    for key in (
        "params_total",
        "best_epoch",
        "train_tokens_per_s_median",
        "train_memory_mib_peak",
        "test_mse",
    ):
        assert steps(key) == [0], key  # one value each, at step 0
    assert steps("train_tokens_per_s") == [1, 2, 3] and steps("valid_mse") == [1, 2, 3]
    # the logged model carries the run's test and best-validation scores
    import mlflow

    mlflow.set_tracking_uri(tracking_uri_for(home))
    (model,) = mlflow.search_logged_models(experiment_ids=[exp.experiment_id], output_format="list")
    linked = {m.key for m in model.metrics or []}
    assert {"test_mse", "best_valid_mse", "params_total"} <= linked, sorted(linked)

    # names a person tells apart: the task entry before the architecture, the seed after it
    assert parent.info.run_name == "memory-synthetic/gru-1L-uni"
    assert child.info.run_name == "memory-synthetic/gru-1L-uni/seed-10000"
    assert model.name == "memory-synthetic_gru-1L-uni_seed-10000"
    # a store written before these names: `rnnbench sync` renames (the names are a projection)
    client.set_tag(parent.info.run_id, "mlflow.runName", "gru-1L-uni")
    client.set_tag(child.info.run_id, "mlflow.runName", "gru-1L-uni/seed-10000")
    synced = subprocess.run(
        [sys.executable, "-m", "rnnbench.cli", "sync", "layout"], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert synced.returncode == 0, synced.stderr
    assert client.get_run(parent.info.run_id).info.run_name == "memory-synthetic/gru-1L-uni"
    assert client.get_run(child.info.run_id).info.run_name == "memory-synthetic/gru-1L-uni/seed-10000"


def test_a_trial_shorter_than_the_sampling_interval_still_has_system_metrics(tmp_path: Path):
    """MLflow publishes system metrics once per interval (1 s) and drops an unfinished one: every
    smoke trial ran shorter than that and showed an empty System metrics tab."""
    import time

    from rnnbench.tracking import Tracker, tracking_uri_for

    tracker = Tracker(tracking_uri_for(tmp_path), "short", tmp_path / "artifacts")
    run_id = tracker.start_run("seed-0", {"stage": "final", "status": "running"})
    monitor = tracker.system_metrics(run_id)
    assert monitor is not None
    end = time.monotonic() + 0.4
    while time.monotonic() < end:  # a busy core, as a trial keeps one
        pass
    monitor.finish()
    metrics = tracker.client.get_run(run_id).data.metrics
    # a real reading: psutil's first one in a thread is 0.0 whatever the load
    assert metrics.get("system/cpu_utilization_percentage", 0) > 0, sorted(metrics)
