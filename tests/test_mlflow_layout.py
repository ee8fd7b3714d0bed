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
