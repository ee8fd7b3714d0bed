"""Forecasting as the field does it: Informer's feature modes, NLinear/RevIN window normalisation,
dropout where a one-layer encoder has none, and the baselines shown beside every score."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from rnnbench.data.series import WindowSpec, column_statistics
from rnnbench.encoder import Encoder
from rnnbench.errors import ConfigError
from rnnbench.report.collect import TaskInfo
from rnnbench.report.tables import BASELINE_ROW, rank_task
from rnnbench.task import Task
from rnnbench.tasks.forecast import (
    ForecastModel,
    ForecastTask,
    LinearForecast,
    RevIN,
    SubtractLast,
    fit_linear,
    seasonal_lags,
)

CPU = torch.device("cpu")


def frame_task(tmp_path, frame: pd.DataFrame, **options) -> ForecastTask:
    path = tmp_path / "series.csv"
    frame.to_csv(path, index=False)
    task = ForecastTask("csv", data_path=path, **options)
    task.setup()
    return task


class ZeroEncoder(nn.Module):
    """An encoder whose every output is 0: the head then gives its bias, here 0 as well."""

    output_size, bidirectional = 3, False

    def forward(self, inputs):
        return torch.zeros(*inputs.shape[:2], self.output_size), None


def zero_model(label_width: int, n_targets: int, normalisation: nn.Module) -> ForecastModel:
    model = ForecastModel(ZeroEncoder(), nn.Identity(), label_width, n_targets, normalisation=normalisation)
    nn.init.zeros_(model.head.weight)
    nn.init.zeros_(model.head.bias)
    return model


# -- features --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "features", "inputs", "targets"),
    [
        ({}, "S", 1, 1),
        ({"features": "S"}, "S", 1, 1),
        ({"multivariate": False}, "S", 1, 1),
        ({"features": "MS"}, "MS", 2, 1),
        ({"multivariate": True}, "MS", 2, 1),
        ({"features": "M"}, "M", 2, 2),
    ],
)
def test_feature_modes_shapes(options, features, inputs, targets):
    task = ForecastTask("synthetic", input_width=6, label_width=3, **options)
    task.setup()
    assert task.features == features and task.n_targets == targets
    batch = next(task.batches("train", 4, device=CPU, generator=torch.Generator().manual_seed(0)))
    assert batch.inputs.shape == (4, 6, inputs) and batch.targets.shape == (4, 3, targets)
    model = task.build_model(lambda n: Encoder("gru", n, 5), {})
    assert model(batch.inputs).shape == (4, 3, targets)
    scores = task.evaluate(model.eval(), "test", 64, device=CPU)
    assert all(math.isfinite(v) for v in scores.values())
    assert task.export_state()["features"] == features


def test_m_scores_every_column_in_its_own_units(tmp_path):
    """Under M both columns are forecast: persistence's original-scale error averages the two
    columns' errors, each in its own units (a ramp of slope 1 and one of slope 10)."""
    steps = np.arange(100.0)
    task = frame_task(
        tmp_path, pd.DataFrame({"a": steps, "b": 10 * steps}), target_columns="a", features="M",
        input_width=4, label_width=2,
    )  # fmt: skip
    assert task.series.columns == ("a", "b") and task.n_targets == 2
    scores = task.baseline("test")
    # errors of 1 and 2 rows ahead: |a| errors 1, 2; |b| errors 10, 20
    assert scores["mae_original"] == pytest.approx((1 + 2 + 10 + 20) / 4, rel=1e-5)
    std = task.std.numpy()
    assert scores["mae"] == pytest.approx((1 / std[0] + 2 / std[0] + 10 / std[1] + 20 / std[1]) / 4, rel=1e-5)


# -- window normalisation --------------------------------------------------------------------------
def test_subtract_last_and_revin_invert_exactly():
    """With an encoder that outputs 0 and a zero head, the model's forecast is what the
    normalisation adds back: the last input value (NLinear) or the window mean (RevIN)."""
    inputs = torch.randn(5, 7, 3, generator=torch.Generator().manual_seed(0)) * 4 + 2
    last = zero_model(4, 2, SubtractLast(2))(inputs)
    assert torch.equal(last, inputs[:, -1:, :2].expand(-1, 4, -1))
    revin = RevIN(3, 2)
    mean = zero_model(4, 2, revin)(inputs)
    assert torch.allclose(mean, inputs[:, :, :2].mean(1, keepdim=True).expand(-1, 4, -1), atol=1e-6)
    # RevIN's normalised inputs: zero mean, unit population std per window and column
    normalised, _ = revin(inputs)
    assert torch.allclose(normalised.mean(1), torch.zeros(5, 3), atol=1e-5)
    assert torch.allclose(normalised.std(1, unbiased=False), torch.ones(5, 3), atol=1e-4)
    # with a trained affine, restoring the normalised window gives the window back
    with torch.no_grad():
        revin.affine_weight.copy_(torch.tensor([3.0, 0.5, 2.0]))
        revin.affine_bias.copy_(torch.tensor([-0.5, 1.0, 0.0]))
        normalised, stats = revin(inputs)
        assert torch.allclose(revin.restore(normalised[..., :2], stats), inputs[..., :2], atol=1e-5)


def test_normalize_builds_into_the_model_and_is_exported():
    for normalize, kind, params in (
        ("none", "WindowIdentity", 0),
        ("last", "SubtractLast", 0),
        ("revin", "RevIN", 4),
    ):
        task = ForecastTask("synthetic", features="MS", normalize=normalize, input_width=6, label_width=2)
        task.setup()
        model = task.build_model(lambda n: Encoder("lstm", n, 4), {})
        assert type(model.normalisation).__name__ == kind
        assert sum(p.numel() for p in model.normalisation.parameters()) == params  # 2 columns x (w, b)
        state = task.export_state()
        assert state["normalize"] == normalize and state["normalize_means"]
        if params:
            assert {"normalisation.affine_weight", "normalisation.affine_bias"} <= set(model.state_dict())


def test_constant_columns_stay_finite(tmp_path):
    """A constant column (0.1, whose float std is ~1e-17, not 0) z-scores to zeros; under RevIN a
    constant window divides by sqrt(eps), never by zero."""
    rows = 80
    frame = pd.DataFrame({"y": np.sin(np.arange(rows) / 3.0), "flat": np.full(rows, 0.1)})
    mean, std = column_statistics(frame.to_numpy())
    assert std[1] == 1.0 and mean[1] == pytest.approx(0.1)
    for normalize in ("none", "last", "revin"):
        task = frame_task(tmp_path, frame, target_columns="y", features="M", normalize=normalize,
                          input_width=6, label_width=2)  # fmt: skip
        assert torch.equal(task.segments["train"][:, 1], torch.zeros(len(task.segments["train"])))
        model = task.build_model(lambda n: Encoder("gru", n, 4), {})
        batch = next(task.batches("train", 16, device=CPU))
        loss, _ = task.training_loss(model, batch)
        loss.backward()
        assert math.isfinite(loss.item())
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        for scores in task.baselines("test").values():
            assert all(math.isfinite(v) for v in scores.values())


# -- dropout ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("projection", [0, 4])
def test_dropout_acts_on_a_one_layer_model(projection):
    task = ForecastTask("synthetic", input_width=8, label_width=3)
    task.setup()
    torch.manual_seed(0)
    plain = task.build_model(
        lambda n: Encoder("gru", n, 16), {"dropout": 0.0, "input_projection": projection}
    )
    dropped = task.build_model(
        lambda n: Encoder("gru", n, 16), {"dropout": 0.5, "input_projection": projection}
    )
    dropped.load_state_dict(plain.state_dict())  # same weights: only the dropout differs
    inputs = next(task.batches("valid", 8, device=CPU)).inputs
    with torch.no_grad():
        plain.train(), dropped.train()
        assert torch.equal(plain(inputs), plain(inputs))  # dropout 0: deterministic in training too
        assert not torch.allclose(plain(inputs), dropped(inputs))
        plain.eval(), dropped.eval()
        assert torch.equal(plain(inputs), dropped(inputs))
    assert isinstance(dropped.input_dropout, nn.Dropout if projection else nn.Identity)


# -- baselines -------------------------------------------------------------------------------------
def test_seasonal_naive_on_a_pure_period_24_sine_is_zero(tmp_path):
    steps = np.arange(1000)
    frame = pd.DataFrame({"wave": np.sin(2 * np.pi * steps / 24)})
    task = frame_task(tmp_path, frame, target_columns="wave", season=24, input_width=30, label_width=30)
    named = task.baselines("test")
    assert list(named) == ["persistence", "seasonal_naive", "linear"]
    assert named["seasonal_naive"]["mse"] < 1e-10 and named["persistence"]["mse"] > 0.5
    # with a gap between inputs and labels (shift 40), every label step still lies whole seasons back
    gap = frame_task(
        tmp_path, frame, target_columns="wave", season=24, input_width=30, label_width=5, shift=40
    )
    assert gap.baselines("test")["seasonal_naive"]["mse"] < 1e-10


def test_seasonal_lags_and_season_options():
    spec = WindowSpec(input_width=5, label_width=4, shift=4)
    # label steps 1..4 rows after the last input (index 4): season 3 reads indices 2, 3, 4, 2
    assert seasonal_lags(spec, 3).tolist() == [2, 3, 4, 2]
    assert seasonal_lags(spec, 1).tolist() == [4, 4, 4, 4]  # season 1 is persistence
    with pytest.raises(ConfigError, match=r"season \(30\) is longer than input_width \(12\)"):
        ForecastTask("synthetic", season=30, input_width=12)
    # a dataset's default season that does not fit the window drops the seasonal baseline only
    task = ForecastTask("synthetic", input_width=12, label_width=2)
    task.setup()
    assert task.season is None and list(task.baselines("valid")) == ["persistence", "linear"]
    assert ForecastTask("synthetic").season == 24


def test_linear_baseline_recovers_a_linear_process(tmp_path):
    """An AR(2) process is a linear map of its last two values, so the closed-form linear baseline
    forecasts one step ahead with the noise's variance as its error and recovers the coefficients."""
    rng = np.random.default_rng(0)
    values = np.zeros(3000)
    for t in range(2, len(values)):
        values[t] = 1.2 * values[t - 1] - 0.5 * values[t - 2] + 0.01 * rng.standard_normal()
    task = frame_task(
        tmp_path, pd.DataFrame({"ar": values}), target_columns="ar", input_width=4, label_width=1
    )
    weight = task._linear_forecast().weight[:, 0]
    assert weight[:2].abs().max() < 0.05  # lags 4 and 3 unused
    assert weight[2].item() == pytest.approx(-0.5, abs=0.05) and weight[3].item() == pytest.approx(
        1.2, abs=0.05
    )
    scores = task.baselines("test")["linear"]
    noise = (0.01 / task.std[0].item()) ** 2  # the one-step error's variance, z-scored
    assert scores["mse"] == pytest.approx(noise, rel=0.15)
    # without noise, a trend plus a period-17 cycle (a linear recurrence of order 4) is forecast
    # 5 steps ahead almost exactly; persistence and the default season-free csv have no such luck
    steps = np.arange(1500.0)
    exact = pd.DataFrame({"x": 0.01 * steps + np.sin(2 * np.pi * steps / 17)})
    task = frame_task(tmp_path, exact, target_columns="x", input_width=8, label_width=5)
    named = task.baselines("test")
    assert named["linear"]["mse"] < 1e-5 * named["persistence"]["mse"]


def test_fit_linear_is_exact_on_a_noiseless_map_in_every_space():
    """Labels that are an exact linear map of the window, with weights summing to 1 per step (so
    shifting and scaling a window shifts and scales its labels alike), are forecast with no error
    in every normalisation space."""
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(400, 6, 2, generator=gen).double()
    true = torch.randn(6, 3, generator=gen).double()
    true[-1] += 1.0 - true.sum(0)
    labels = torch.einsum("nwk,wh->nhk", inputs, true)
    for normalize in ("none", "last", "revin"):
        forecast = LinearForecast(fit_linear(inputs, labels, normalize), 2, normalize)
        assert torch.allclose(forecast(inputs), labels, atol=1e-4), normalize
    assert torch.allclose(fit_linear(inputs, labels)[:-1], true, atol=1e-5)


def test_baselines_contract_default_and_forecast():
    class Plain(Task):
        name = "plain"

        def setup(self): ...
        def batches(self, *args, **kwargs): ...
        def build_model(self, *args): ...
        def training_loss(self, *args): ...
        def evaluate(self, *args, **kwargs): ...
        def baseline(self, split):
            return {"accuracy": 0.5}

    assert Plain().baselines("test") == {"trivial": {"accuracy": 0.5}}
    task = ForecastTask("synthetic", input_width=24, label_width=4)
    task.setup()
    named = task.baselines("test")
    assert named["persistence"] == task.baseline("test")
    assert set(named["linear"]) == {m.name for m in task.metrics}
    # fitted on the training windows only: the same fit whichever split is scored first
    again = ForecastTask("synthetic", input_width=24, label_width=4)
    again.setup()
    again.baselines("valid")
    assert again.baselines("test") == named


# -- options ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"features": "MS", "multivariate": True}, r"give features \(S, MS or M\) or multivariate"),
        ({"features": "S", "multivariate": False}, r"not both"),
        ({"features": "X"}, r"features: Input should be 'S', 'MS' or 'M'"),
        ({"normalize": "minmax"}, r"normalize: Input should be 'none', 'last' or 'revin'"),
        ({"normalize": "revin", "input_width": 1}, r"normalize: revin needs input_width >= 2"),
        ({"normalize": "last", "input_width": 1}, r"normalize: last needs input_width >= 2"),
        ({"season": 0}, r"season: Input should be greater than or equal to 1"),
        ({"features": "S", "feature_columns": ["leading"]}, r"features S reads the target columns only"),
    ],
)
def test_bad_options_are_one_line_config_errors(options, message):
    with pytest.raises(ConfigError, match=message) as caught:
        ForecastTask("synthetic", **options)
    assert "\n" not in str(caught.value)


# -- the report ------------------------------------------------------------------------------------
def test_ranking_table_shows_each_named_baseline_once():
    info = TaskInfo("forecast", "mse", "minimize")
    base = {"study": "e/forecast/gru-1L-uni", "architecture": "gru-1L-uni", "cell": "gru", "variant": "1L-uni",
            "task": "forecast"}  # fmt: skip
    study = {**base, "stage": "study", "status": "complete", "baseline_test_mse": 0.3,
             "baseline_persistence_test_mse": 0.3, "baseline_seasonal_naive_test_mse": 0.5,
             "baseline_linear_test_mse": 0.1, "baseline_linear_test_mse_original": 9.0}  # fmt: skip
    finals = [{**base, "stage": "final", "status": "complete", "seed": s, "test_mse": v, "best_valid_mse": v}
              for s, v in enumerate([0.2, 0.21, 0.22])]  # fmt: skip
    t = rank_task(pd.DataFrame([study, *finals]), info)
    rows = t.table.set_index("architecture")["mean"]
    assert rows[BASELINE_ROW] == 0.3
    assert rows["baseline: seasonal_naive"] == 0.5 and rows["baseline: linear"] == 0.1
    assert "baseline: persistence" not in rows  # it is the trivial baseline's row
    assert "trivial baseline: persistence" in t.notes
    assert t.table.set_index("architecture").loc["gru-1L-uni", "rank"] == 1
