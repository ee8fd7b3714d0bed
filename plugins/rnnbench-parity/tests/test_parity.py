"""The parity plugin: right data, a batch-size-independent score, a model that learns, and a run
through `rnnbench run` and `rnnbench report` once installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rnnbench.encoder import Encoder
from rnnbench.plugins import DISABLE_ENV, Registered, Registry

rnnbench_parity = pytest.importorskip(
    "rnnbench_parity", reason="install the plugin first: pip install -e plugins/rnnbench-parity"
)
ParityTask, parity_data = rnnbench_parity.ParityTask, rnnbench_parity.parity_data


def installed() -> bool:
    return "parity" in Registry(load_entry_points=True).tasks


needs_install = pytest.mark.skipif(
    not installed(), reason="the entry point needs an install: pip install -e plugins/rnnbench-parity"
)


def small(**options) -> ParityTask:
    task = ParityTask("synthetic", **{"train_size": 512, "valid_size": 100, "test_size": 100, **options})
    task.setup()
    return task


def test_labels_are_the_parity_of_the_real_bits():
    bits, lengths, labels = parity_data(np.random.default_rng(0), 300, 3, 9)
    assert bits.shape == (300, 9) and int(lengths.min()) >= 3 and int(lengths.max()) <= 9
    for row, n, label in zip(bits, lengths, labels):
        assert int(row[:n].sum()) % 2 == int(label) and int(row[n:].sum()) == 0
    assert 0.4 < float(labels.double().mean()) < 0.6


def test_splits_are_fixed_per_seed_and_differ_from_each_other():
    a, b, c = small(), small(), small(seed=1)
    assert torch.equal(a._data["valid"][0], b._data["valid"][0])
    assert not torch.equal(a._data["valid"][0][:100], a._data["test"][0][:100])
    assert not torch.equal(a._data["train"][0][:100], c._data["train"][0][:100])


def test_batches_pad_with_zeros_and_keep_lengths_on_the_cpu():
    task = small()
    batch = next(
        task.batches("train", 16, device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    )
    assert batch.inputs.shape[0] == 16 and batch.inputs.shape[2] == 2 and batch.lengths.device.type == "cpu"
    for row, n in zip(batch.inputs, batch.lengths):
        assert torch.all(row[:n].sum(-1) == 1) and torch.all(row[n:] == 0)
    assert batch.tokens == int(batch.lengths.sum())


def test_evaluate_does_not_depend_on_the_batch_size_or_padding():
    task = small()
    torch.manual_seed(0)
    model = task.build_model(lambda n: Encoder("gru", n, 8, 1, True), {"dropout": 0.0}).eval()
    scores = [task.evaluate(model, "valid", bs, device=torch.device("cpu")) for bs in (1, 7, 100)]
    for other in scores[1:]:
        assert other["accuracy"] == scores[0]["accuracy"]
        assert other["cross_entropy"] == pytest.approx(scores[0]["cross_entropy"], rel=1e-6)


def test_baseline_is_chance_and_uses_the_metric_names():
    task = small()
    baseline = task.baseline("test")
    assert set(baseline) == {m.name for m in task.metrics}
    assert abs(baseline["accuracy"] - 0.5) < 0.1 and baseline["cross_entropy"] == pytest.approx(
        np.log(2), abs=0.01
    )


def test_a_gru_learns_short_parity():
    task = small(min_len=2, max_len=6, train_size=2000)
    torch.manual_seed(0)
    model = task.build_model(lambda n: Encoder("gru", n, 16), {"dropout": 0.0})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    cpu, generator = torch.device("cpu"), torch.Generator().manual_seed(0)
    for _ in range(6):  # epochs of 63 steps
        for batch in task.batches("train", 32, device=cpu, generator=generator):
            loss, _ = task.training_loss(model, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    scores = task.evaluate(model.eval(), "valid", 64, device=cpu)
    assert scores["accuracy"] > 0.9 > task.baseline("valid")["accuracy"] + 0.3


def test_meets_the_task_contract():
    from rnnbench.preflight import check_task

    check_task(Registered("parity", ParityTask, "rnnbench-parity 0.1.0"))


def test_items_add_up_to_the_metrics_at_any_batch_size():
    from rnnbench.testing import check_item_outcomes

    task = small()
    torch.manual_seed(0)
    model = task.build_model(lambda n: Encoder("gru", n, 8), {})
    items = check_item_outcomes(task, model, batch_sizes=(1, 7))
    assert list(items.columns) == ["correct", "nll", "n"] and len(items) == 100


def test_the_served_model_is_the_trained_model_on_whole_sequences():
    from rnnbench.models import serve

    task = small()
    torch.manual_seed(0)
    model = task.build_model(lambda n: Encoder("gru", n, 8, 1, True), {"dropout": 0.0}).eval()
    _, example, output = serve(task, model)  # the default serving form: the task defines none
    assert example.shape[0] == 2 and torch.all(example.sum(-1) == 1)  # two rows, no padding
    whole = torch.full((2,), example.shape[1], dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(output, model(example, whole))


def test_options_are_checked():
    from rnnbench.errors import ConfigError

    with pytest.raises(ConfigError, match="min_len"):
        ParityTask("synthetic", min_len=10, max_len=5)
    with pytest.raises(ConfigError, match="max_len"):
        ParityTask("synthetic", max_len=10**9)


@needs_install
def test_registry_lists_parity_with_its_distribution(monkeypatch):
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    entry = Registry().task("parity")
    assert entry.cls is ParityTask and entry.source == "rnnbench-parity 0.1.0"
    assert entry.entry_point == "parity = rnnbench_parity.plugin"


TINY = """\
name: parity-tiny
cells: [gru, {name: lstm, bidirectional: [true]}]
tasks:
  - name: parity
    options: {min_len: 2, max_len: 5, train_size: 256, valid_size: 64, test_size: 64}
search:
  hidden_size: {type: int, low: 4, high: 8}
  lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
budget: {trials: 2, epochs: 1}
final: {seeds: 2}
pruner: {name: none}
"""


@needs_install
def test_runs_through_rnnbench_run_and_report(tmp_path: Path):
    (tmp_path / "parity.yaml").write_text(TINY)
    env = {**os.environ, "RNNBENCH_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}

    def rnnbench(*args):
        return subprocess.run([sys.executable, "-m", "rnnbench.cli", *args], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=600)  # fmt: skip

    run = rnnbench("run", "parity.yaml")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "parity-tiny/parity-synthetic/gru-1L-uni" in run.stdout and "accuracy" in run.stdout
    assert "not logged" not in run.stdout + run.stderr  # its models too, with no serving code of its own
    report = rnnbench("report", "parity-tiny", "--format", "html")
    assert report.returncode == 0, report.stdout[-2000:] + report.stderr[-2000:]
    table = (tmp_path / "reports" / "parity-tiny" / "tables" / "parity-synthetic.csv").read_text()
    assert "gru-1L-uni" in table and "lstm-1L-bi" in table and "trivial baseline" in table
