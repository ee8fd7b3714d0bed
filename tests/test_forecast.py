"""The forecast task: reading, splitting, normalising and windowing series, models and metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rnnbench.data.series import WindowSpec, sliding_windows, split_rows
from rnnbench.encoder import Encoder
from rnnbench.errors import ConfigError, DataError
from rnnbench.tasks import forecast
from rnnbench.tasks.forecast import ForecastTask

CPU = torch.device("cpu")


def write_csv(path, header: str, rows: list[str], newline: str = "\n") -> str:
    path.write_text(newline.join([header, *rows]) + newline)
    return str(path)


def ramp_csv(tmp_path, rows: int = 100, name: str = "ramp.csv") -> str:
    """A series whose value is its own row index, so a window shows exactly which rows it used."""
    return write_csv(tmp_path / name, "step,value", [f"{i},{float(i)}" for i in range(rows)])


def all_windows(task: ForecastTask, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (inputs, labels) of a split in original units, in evaluation order."""
    parts = list(task.batches(split, 7, device=CPU))
    inputs = torch.cat([b.inputs for b in parts])
    labels = torch.cat([b.targets for b in parts])
    n = task.n_targets
    return inputs * task.std + task.mean, labels * task.std[:n] + task.mean[:n]


# -- learning --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("cell", "bidirectional"), [("lstm", False), ("gru", True)])
def test_synthetic_multistep_beats_persistence(briefly, cell, bidirectional):
    task = ForecastTask("synthetic", input_width=24, label_width=8)
    _, scores = briefly(task, cell, steps=120, hidden_size=16, bidirectional=bidirectional)
    persistence = task.baseline("valid")
    assert set(scores) == set(persistence) == {m.name for m in task.metrics}
    assert task.primary_metric.name == "mse"
    assert scores["mse"] < 0.5 * persistence["mse"]
    assert scores["mae_original"] < persistence["mae_original"]


def test_input_projection_and_layers(briefly):
    task = ForecastTask("synthetic", input_width=12, label_width=4, multivariate=True)
    model, scores = briefly(task, "rnn", steps=5, hidden_size=8, layers=2, hparams={"input_projection": 6})
    assert model.encoder.input_size == 6 and model.projection.in_features == 2
    assert all(math.isfinite(v) for v in scores.values())
    with pytest.raises(ConfigError, match="input_projection"):
        task.build_model(lambda n: Encoder("rnn", n, 4), {"input_projection": -1})


# -- baseline and metrics -------------------------------------------------------------------------
def test_persistence_baseline_is_computed_from_the_windows(tmp_path):
    # On a ramp the persistence error h steps ahead is exactly h rows.
    task = ForecastTask(
        "csv", data_path=ramp_csv(tmp_path), target_columns="value", input_width=5, label_width=3
    )
    task.setup()
    scores = task.baseline("test")
    horizons = np.arange(1, 4)
    assert scores["mae_original"] == pytest.approx(horizons.mean(), rel=1e-5)
    assert scores["mse_original"] == pytest.approx((horizons**2).mean(), rel=1e-5)
    std = float(task.std[0])
    assert scores["mae"] == pytest.approx(horizons.mean() / std, rel=1e-5)
    assert scores["mse"] == pytest.approx((horizons**2).mean() / std**2, rel=1e-5)


def test_evaluate_matches_a_direct_computation(tmp_path):
    task = ForecastTask("synthetic", input_width=10, label_width=3)
    task.setup()
    model = task.build_model(lambda n: Encoder("gru", n, 8), {})
    model.eval()
    scores = task.evaluate(model, "valid", 64, device=CPU)
    batch = next(task.batches("valid", 10_000, device=CPU))
    with torch.no_grad():
        error = model(batch.inputs) - batch.targets
    assert scores["mse"] == pytest.approx(error.square().mean().item(), rel=1e-4)
    assert scores["mae_original"] == pytest.approx((error.abs() * task.std[0]).mean().item(), rel=1e-4)


# -- splits, normalisation and windows ------------------------------------------------------------
def test_normalisation_uses_training_rows_only(tmp_path):
    values = np.sin(np.arange(200) / 5.0) * 10 + 50
    clean = write_csv(tmp_path / "clean.csv", "value", [f"{v}" for v in values])
    spiked = values.copy()
    spiked[-5] = 1e6  # an outlier in the test rows must not move the statistics
    spiky = write_csv(tmp_path / "spiky.csv", "value", [f"{v}" for v in spiked])
    stats = []
    for path in (clean, spiky):
        task = ForecastTask("csv", data_path=path, target_columns=["value"], input_width=8, label_width=2)
        task.setup()
        stats.append((task.mean.clone(), task.std.clone()))
    train = values[: int(200 * 0.7)]
    assert torch.equal(stats[0][0], stats[1][0]) and torch.equal(stats[0][1], stats[1][1])
    assert stats[0][0].item() == pytest.approx(train.mean(), rel=1e-6)
    assert stats[0][1].item() == pytest.approx(train.std(), rel=1e-6)


def test_windows_never_cross_split_boundaries(tmp_path):
    task = ForecastTask(
        "csv",
        data_path=ramp_csv(tmp_path, 100),
        target_columns="value",
        input_width=6,
        label_width=2,
        shift=3,
    )
    task.setup()
    assert {k: (r.start, r.stop) for k, r in task.rows.items()} == {
        "train": (0, 70),
        "valid": (70, 90),
        "test": (90, 100),
    }
    for split, rows in task.rows.items():
        inputs, labels = all_windows(task, split)
        assert len(inputs) == len(rows) - (6 + 3) + 1 == task.describe()[f"windows_{split}"]
        assert inputs.min().round() == rows.start and labels.max().round() == rows.stop - 1
        # Inputs are consecutive rows; labels start shift - label_width rows after them (a gap of 1).
        first = inputs[:, :1, 0]
        assert torch.allclose(inputs[..., 0], first + torch.arange(6), atol=1e-3)
        assert torch.allclose(labels[..., 0], first + torch.tensor([7.0, 8.0]), atol=1e-3)


def test_split_rows_fractions_and_ett():
    assert [len(r) for r in split_rows(144, (0.7, 0.2, 0.1)).values()] == [100, 29, 15]
    ett = split_rows(17420, "ett")
    assert [(r.start, r.stop) for r in ett.values()] == [(0, 8640), (8640, 11520), (11520, 14400)]
    with pytest.raises(DataError, match="needs 14400 rows"):
        split_rows(1000, "ett")
    with pytest.raises(ConfigError, match="sum to 1"):
        ForecastTask("synthetic", split=[0.5, 0.2, 0.2])


# Informer's Dataset_ETT_hour: the rows each split's windows are cut from, and its window count.
ETT_BORDER2S = [12 * 30 * 24, 12 * 30 * 24 + 4 * 30 * 24, 12 * 30 * 24 + 8 * 30 * 24]


def ett_border1s(seq_len: int) -> list[int]:
    return [0, 12 * 30 * 24 - seq_len, 12 * 30 * 24 + 4 * 30 * 24 - seq_len]


def informer_window_counts(seq_len: int, pred_len: int) -> list[int]:
    return [b2 - b1 - seq_len - pred_len + 1 for b1, b2 in zip(ett_border1s(seq_len), ETT_BORDER2S)]


@pytest.mark.parametrize("horizon", [24, 48, 168, 336, 720])
def test_ett_split_windows_are_informers(tmp_path, horizon):
    """On a ramp (value = row index) every window shows which rows it used: Informer's, exactly."""
    task = ForecastTask(
        "csv", data_path=ramp_csv(tmp_path, 14_500), target_columns="value", split="ett",
        input_width=96, label_width=horizon,
    )  # fmt: skip
    task.setup()
    counts = [task.describe()[f"windows_{s}"] for s in ("train", "valid", "test")]
    assert counts == informer_window_counts(96, horizon)
    if horizon == 24:
        assert counts == [8521, 2857, 2857]
    for split, border1, border2 in zip(("train", "valid", "test"), ett_border1s(96), ETT_BORDER2S):
        inputs, labels = all_windows(task, split)
        first_inputs, labels = inputs[:, 0, 0].round(), labels[..., 0].round()
        # window i reads rows border1 + i ... and forecasts the pred_len rows right after its inputs
        assert torch.equal(first_inputs, border1 + torch.arange(len(inputs), dtype=torch.float32))
        assert torch.equal(labels[:, 0], first_inputs + 96)
        # labels start at the split's first row (valid/test inputs reach back 96 rows) and never leave it
        split_start = {"train": 0, "valid": ETT_BORDER2S[0], "test": ETT_BORDER2S[1]}[split]
        assert labels.min() == max(split_start, 96) and labels.max() == border2 - 1


def test_sliding_windows_are_a_view_in_row_order():
    segment = torch.arange(20.0).view(10, 2)
    windows = sliding_windows(segment, WindowSpec(3, 1, 1))
    assert windows.shape == (7, 4, 2)
    assert windows.data_ptr() == segment.data_ptr()  # unfold: no copy of the series
    assert torch.equal(windows[2], segment[2:6])


def test_single_step_and_multi_step_shapes():
    for label_width in (1, 6):
        task = ForecastTask("synthetic", input_width=16, label_width=label_width)
        task.setup()
        batch = next(task.batches("train", 5, device=CPU, generator=torch.Generator().manual_seed(0)))
        assert batch.inputs.shape == (5, 16, 1) and batch.targets.shape == (5, label_width, 1)
        assert batch.tokens == 5 * 16 and batch.lengths is None
        model = task.build_model(lambda n: Encoder("lstm", n, 4, 1, True), {})
        assert model(batch.inputs).shape == (5, label_width, 1)


def test_synthetic_is_deterministic_by_seed_and_defaults():
    first, again, other = (ForecastTask("synthetic", seed=s) for s in (3, 3, 4))
    for task in (first, again, other):
        task.setup()
    assert torch.equal(first.segments["train"], again.segments["train"])
    assert not torch.equal(first.segments["train"], other.segments["train"])
    facts = first.describe()
    assert (facts["input_width"], facts["label_width"], facts["shift"]) == (48, 24, 24)


def test_multivariate_input_width(tmp_path):
    task = ForecastTask("synthetic", multivariate=True, input_width=8, label_width=2)
    task.setup()
    batch = next(task.batches("valid", 4, device=CPU))
    assert batch.inputs.shape == (4, 8, 2) and batch.targets.shape == (4, 2, 1)
    assert task.describe()["feature_columns"] == ["leading"]
    # Two targets, multivariate: text columns are left out, targets come first.
    days = np.datetime64("2020-01-01") + np.arange(60)
    path = write_csv(
        tmp_path / "two.csv",
        "when,a,b,c,site",
        [f"{day},{d},{2 * d},{d % 3},north" for d, day in enumerate(days)],
    )
    task = ForecastTask(
        "csv",
        data_path=path,
        target_columns=["b", "a"],
        multivariate=True,
        date_column="when",
        input_width=4,
        label_width=2,
    )
    task.setup()
    assert task.series.columns == ("b", "a", "c")
    batch = next(task.batches("train", 3, device=CPU))
    assert batch.inputs.shape == (3, 4, 3) and batch.targets.shape == (3, 2, 2)
    model = task.build_model(lambda n: Encoder("gru", n, 4), {})
    assert model.encoder.input_size == 3 and model(batch.inputs).shape == (3, 2, 2)


def test_user_csv_trains_and_evaluates(tmp_path, briefly):
    rows = [f"2021-01-01 {h // 60:02d}:{h % 60:02d},{math.sin(h / 4):.4f}" for h in range(300)]
    path = write_csv(tmp_path / "mine.csv", "time,load", rows, newline="\r\n")
    task = ForecastTask("csv", data_path=path, target_columns="load", date_column="time", input_width=8)
    _, scores = briefly(task, steps=10, hidden_size=8)
    assert all(math.isfinite(v) for v in scores.values())
    assert task.describe()["rows"] == 300 and task.window.label_width == 1


# -- options -------------------------------------------------------------------------------------
def test_option_errors():
    with pytest.raises(ConfigError, match="unknown option"):
        ForecastTask("synthetic", horizon=3)
    with pytest.raises(ConfigError, match="shift"):
        ForecastTask("synthetic", label_width=4, shift=2)
    with pytest.raises(ConfigError, match="data_path"):
        ForecastTask("csv", target_columns="x")
    with pytest.raises(ConfigError, match="generated"):
        ForecastTask("synthetic", data_path="somewhere.csv")
    with pytest.raises(ConfigError, match="unknown dataset"):
        ForecastTask("etth3")


def test_split_too_small_for_a_window(tmp_path):
    task = ForecastTask("csv", data_path=ramp_csv(tmp_path, 40), target_columns="value", input_width=5)
    with pytest.raises(DataError, match=r"test split has 4 rows, fewer than one window of 6"):
        task.setup()


def test_registered_as_a_plugin():
    assert forecast.rnnbench_tasks() == {"forecast": ForecastTask}
    assert set(ForecastTask.datasets) == {"etth1", "etth2", "airline", "sunspots", "csv", "synthetic"}


# -- bad input files -----------------------------------------------------------------------------
BAD_FILES = {
    "unknown column": (
        ["1,2", "3,4"],
        {"target_columns": "temp"},
        r"no column 'temp'; the columns present are 'date', 'value'",
    ),
    "not a number": (
        ["2020-01-01,1.5", "2020-01-02,2.5", "2020-01-03,abc"],
        {},
        r"line 4 \(data row 3\): column 'value' holds 'abc', which is not a finite number",
    ),
    "missing value": (
        ["2020-01-01,1.5", "2020-01-02,", "2020-01-03,3"],
        {},
        r"line 3 \(data row 2\): missing value in column 'value'",
    ),
    "blank line inside": (["2020-01-01,1.5", "", "2020-01-03,3"], {}, r"line 3 \(data row 2\): missing"),
    "dates out of order": (
        ["2020-01-01,1", "2020-01-03,2", "2020-01-02,3"],
        {},
        r"line 4 \(data row 3\): date '2020-01-02' in column 'date' is not after the previous row's '2020-01-03'",
    ),
    "repeated date": (["2020-01-01,1", "2020-01-01,2"], {}, r"line 3 \(data row 2\).*strictly increasing"),
    "not a date": (["2020-01-01,1", "yesterday,2"], {}, r"line 3 \(data row 2\): 'yesterday' is not a date"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_input_names_file_and_row(tmp_path, case):
    rows, options, message = BAD_FILES[case]
    path = write_csv(tmp_path / "bad.csv", "date,value", rows)
    options = {"target_columns": "value", "date_column": "date", **options}
    task = ForecastTask("csv", data_path=path, input_width=1, **options)
    with pytest.raises(DataError, match=message) as caught:
        task.setup()
    assert str(caught.value).startswith(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ForecastTask("csv", data_path=tmp_path / "nope.csv", target_columns="x").setup()
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty"):
        ForecastTask("csv", data_path=tmp_path / "empty.csv", target_columns="x").setup()
    with pytest.raises(DataError, match="does not exist"):
        ForecastTask("airline", data_path=tmp_path / "nope.csv").setup()


def test_trailing_blank_lines_are_harmless(tmp_path):
    path = tmp_path / "tail.csv"
    path.write_text("value\r\n" + "".join(f"{i}\r\n" for i in range(60)) + "\r\n\r\n")
    task = ForecastTask("csv", data_path=path, target_columns="value", input_width=3)
    task.setup()
    assert task.describe()["rows"] == 60


# -- the real datasets ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["etth1", "etth2"])
def test_ett_files_and_split(shared_data, name):
    task = ForecastTask(name, multivariate=True)
    task.setup()
    facts = task.describe()
    assert facts["rows"] == 17_420 and facts["split"] == "ett"
    assert (facts["rows_train"], facts["rows_valid"], facts["rows_test"]) == (8640, 2880, 2880)
    # inputs reach back into the previous split, so every one of its 2,880 label rows is forecast
    assert facts["windows_valid"] == facts["windows_test"] == 2880 - 24 + 1
    assert facts["target_columns"] == ["OT"]
    assert facts["feature_columns"] == ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL"]
    batch = next(task.batches("test", 2, device=CPU))
    assert batch.inputs.shape == (2, 48, 7) and batch.targets.shape == (2, 24, 1)
    persistence = task.baseline("test")
    assert 0 < persistence["mse"] < 1 and persistence["mse_original"] > persistence["mse"]


def test_ett_protocol_on_the_real_file(shared_data):
    """ETTh1 96 -> h, multivariate in, OT out (Informer's 'MS'), against a reimplementation of
    Dataset_ETT_hour: StandardScaler fitted on the training rows, windows from border1s/border2s."""
    import pandas as pd

    frame = pd.read_csv(shared_data / "forecasting" / "ett" / "ETTh1.csv")
    data = frame.drop(columns="date")
    train = data.iloc[: ETT_BORDER2S[0]]
    scaled = (data - train.mean()) / train.std(ddof=0)  # sklearn's StandardScaler: population std
    for horizon in (24, 48, 168, 336, 720):
        task = ForecastTask("etth1", multivariate=True, input_width=96, label_width=horizon)
        task.setup()
        counts = [task.describe()[f"windows_{s}"] for s in ("train", "valid", "test")]
        assert counts == informer_window_counts(96, horizon)
    assert counts == [7825, 2161, 2161]  # horizon 720, as published
    task = ForecastTask("etth1", multivariate=True, input_width=96, label_width=24)
    task.setup()
    assert [task.describe()[f"windows_{s}"] for s in ("train", "valid", "test")] == [8521, 2857, 2857]
    columns = list(task.series.columns)
    assert torch.allclose(task.mean.double(), torch.tensor(train[columns].mean().to_numpy()))
    assert torch.allclose(task.std.double(), torch.tensor(train[columns].std(ddof=0).to_numpy()))
    # the test windows, as Dataset_ETT_hour.__getitem__ cuts them (label_len 0)
    block = scaled[columns].to_numpy()[ett_border1s(96)[2] : ETT_BORDER2S[2]]
    starts = np.arange(len(block) - 96 - 24 + 1)
    inputs = np.stack([block[s : s + 96] for s in starts])
    labels = np.stack([block[s + 96 : s + 96 + 24, :1] for s in starts])
    batch = next(task.batches("test", 10_000, device=CPU))
    assert batch.inputs.shape == (2857, 96, 7)
    assert np.allclose(batch.inputs.numpy(), inputs, atol=1e-5)
    assert np.allclose(batch.targets.numpy(), labels, atol=1e-5)
    # persistence scored by hand, normalised and in the data's own units (°C of oil temperature)
    error = np.repeat(inputs[:, -1:, :1], 24, axis=1) - labels
    std = train["OT"].std(ddof=0)
    expected = {"mse": (error**2).mean(), "mae": np.abs(error).mean(),
                "mse_original": (error**2).mean() * std**2, "mae_original": np.abs(error).mean() * std}  # fmt: skip
    assert task.baseline("test") == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize(
    ("name", "rows", "column"), [("airline", 144, "Passengers"), ("sunspots", 2820, "Sunspots")]
)
def test_small_univariate_files_with_crlf(shared_data, name, rows, column):
    task = ForecastTask(name)
    task.setup()
    facts = task.describe()
    assert facts["rows"] == rows and facts["target_columns"] == [column] and facts["input_size"] == 1
    assert sum(facts[f"rows_{s}"] for s in ("train", "valid", "test")) == rows
    assert all(math.isfinite(v) for v in task.baseline("valid").values())


def test_airline_values_read_exactly(shared_data):
    task = ForecastTask("airline")
    task.setup()
    values = task.series.values[:, 0]
    assert (values[0], values[-1], values.min(), values.max()) == (112, 432, 104, 622)
