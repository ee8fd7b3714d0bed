"""Per-item outcomes from training to the report: every final seed writes its valid and test items
beside its weights, the ledger names the file, MLflow mirrors it (a sync restores it), and the
report collects them into one long frame aligned across seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from rnnbench.items import ARTIFACT_PATH, items_path, load_items, save_items
from rnnbench.ledger import StudyLedger
from rnnbench.sweep import open_storage, record_of, study_names
from rnnbench.tracking import tracking_uri_for
from tests.helpers import run_cli

EXPERIMENT = """\
name: itm
cells: [gru, lstm]
tasks:
  - {name: sentiment, dataset: synthetic}
fixed: {hidden_size: 8}
budget: {trials: 0, epochs: 1, steps_per_epoch: 3}
final: {seeds: 2}
"""


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """The run home of a finished experiment: two architectures, two final seeds each."""
    root = tmp_path_factory.mktemp("items")
    (root / "itm.yaml").write_text(EXPERIMENT)
    result = run_cli(["run", "itm.yaml"], root / "home", root)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "not logged" not in result.stdout + result.stderr
    return root / "home"


def _final_seeds(home: Path) -> list[tuple[str, dict]]:
    """(study, ledger record) of every final seed, run id included."""
    storage = open_storage(str(home / "optuna.journal"), home)
    out = []
    for name in study_names(storage, "itm"):
        for t in StudyLedger.load(storage, name).final_trials:
            out.append((name, record_of(t) | {"run_id": t.user_attrs["mlflow_run_id"], "trial": t.number}))
    return out


def _client(home: Path) -> MlflowClient:
    return MlflowClient(tracking_uri_for(home))


def _has_items(client: MlflowClient, run_id: str) -> bool:
    return any(f.path == ARTIFACT_PATH for f in client.list_artifacts(run_id, "items"))


def _local_artifact(client: MlflowClient, run_id: str) -> Path:
    """The artifact's file in the run home's file artifact store."""
    uri = client.get_run(run_id).info.artifact_uri
    return Path(uri.removeprefix("file://")) / ARTIFACT_PATH


def test_every_final_seed_names_its_items_file_and_mlflow_has_it(finished: Path):
    seeds = _final_seeds(finished)
    assert len(seeds) == 4 and all(r["status"] == "complete" for _, r in seeds)
    client = _client(finished)
    for study, record in seeds:
        ref = record["items"]
        path = items_path(finished, study, record["seed"], record["trial"])  # one file per trial
        assert Path(ref["path"]) == path.relative_to(finished)
        frame = load_items(finished, ref)  # checks the sha256 the record keeps
        assert len(frame) == ref["rows"] and list(frame.columns[:2]) == ["split", "item"]
        assert set(frame["split"]) == {"valid", "test"} and frame["item"].dtype == np.int32
        assert "items_time_s" in record["summary"]
        assert _has_items(client, record["run_id"])


def test_collected_items_are_aligned_across_seeds_and_give_back_the_test_metrics(finished: Path):
    from rnnbench.report.collect import collect, load_saved_items, save
    from rnnbench.tasks.sentiment import SentimentTask

    data = collect(_client(finished), "itm")
    items, finals = data.items, data.runs[data.runs["stage"] == "final"]
    assert set(items["run_id"]) == set(finals["run_id"]) and items.attrs["missing"] == []
    assert list(items.columns[:3]) == ["run_id", "split", "item"]
    for split, group in items.groupby("split"):
        numbers = {run_id: tuple(g["item"]) for run_id, g in group.groupby("run_id")}
        assert len(set(numbers.values())) == 1, split  # one benchmark: every seed scored the same items
    task = SentimentTask("synthetic")
    task.setup()
    by_run = {r["run_id"]: r for _, r in _final_seeds(finished)}
    for run_id, group in items[items["split"] == "test"].groupby("run_id"):
        sums = {c: np.asarray(group[c].sum()) for c in group.columns if c.startswith("c_")}
        scores = task.metrics_from_sums(sums)
        assert float(scores["accuracy"]) == pytest.approx(by_run[run_id]["test"]["accuracy"])
    out = finished.parent / "report"
    assert out / "items.parquet" in save(data, out)
    assert len(load_saved_items(out)) == len(items)


@pytest.mark.slow  # two more syncs of the finished run: about 10 s
def test_sync_restores_a_deleted_artifact_and_warns_once_for_a_missing_file(finished: Path, tmp_path: Path):
    client = _client(finished)
    (_, restored), (_, lost) = _final_seeds(finished)[:2]
    kept = (finished / lost["items"]["path"]).read_bytes()
    for record in (restored, lost):
        _local_artifact(client, record["run_id"]).unlink()
    (finished / lost["items"]["path"]).unlink()
    try:
        result = run_cli(["sync", "itm", "--home", str(finished)], finished, tmp_path)
        assert result.returncode == 0, result.stderr
        assert _has_items(client, restored["run_id"]) and not _has_items(client, lost["run_id"])
        assert result.stderr.count("per-item outcomes not logged") == 1, result.stderr
    finally:  # the module's other tests share this run home
        (finished / lost["items"]["path"]).write_bytes(kept)
    again = run_cli(["sync", "itm", "--home", str(finished)], finished, tmp_path)
    assert again.returncode == 0 and "per-item" not in again.stderr
    assert _has_items(client, lost["run_id"])


def test_a_store_without_items_gives_an_empty_frame_naming_the_runs(tmp_path: Path):
    from rnnbench.report.collect import collect_items

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("old", artifact_location=(tmp_path / "artifacts").as_uri())
    ids = [client.create_run(experiment).info.run_id for _ in range(2)]
    runs = pd.DataFrame({"run_id": ids, "stage": "final", "status": "complete"})
    items = collect_items(client, runs)
    assert items.empty and list(items.columns) == ["run_id", "split", "item"]
    assert items.attrs["missing"] == ids
    assert collect_items(client, runs.iloc[:0]).attrs["missing"] == []


def test_an_sst2_sized_items_file_is_small(tmp_path: Path):
    """872 valid and 1,821 test sentences, two classes: the confusion one-hot columns compress well."""
    from rnnbench.items import item_frame

    rng = np.random.default_rng(0)

    def split(n: int) -> pd.DataFrame:
        truth, guess = rng.integers(0, 2, n), rng.integers(0, 2, n)
        cells = np.eye(4, dtype=np.int32)[truth * 2 + guess]
        return pd.DataFrame(cells, columns=["c_0_0", "c_0_1", "c_1_0", "c_1_1"])

    frame = item_frame({"valid": split(872), "test": split(1821)})
    ref = save_items(tmp_path, "x/sentiment-sst2/lstm-1L-uni", 0, frame)
    size = (tmp_path / ref["path"]).stat().st_size
    assert ref["rows"] == 2693 and size < 20_000, size
    pd.testing.assert_frame_equal(load_items(tmp_path, ref), frame)
