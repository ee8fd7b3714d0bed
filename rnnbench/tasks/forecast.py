"""Time-series forecasting: a window of past rows in, the next ``label_width`` target values out.

Direct multi-step forecasting: the encoder reads ``input_width`` z-scored rows and a linear head
maps its final output(s) to all ``label_width`` future steps at once, so there is no error feedback
between horizons. The encoder sees only the input window, whose labels lie strictly after it, so a
bidirectional encoder is allowed.

Datasets and their defaults (every default can be overridden by an option)::

    name       file                                       target      inputs -> labels  split        season
    etth1      forecasting/ett/ETTh1.csv                  OT          48 -> 24          ett          24
    etth2      forecasting/ett/ETTh2.csv                  OT          48 -> 24          ett          24
    airline    forecasting/airline/airline-passengers.csv Passengers  12 -> 1           0.7/0.2/0.1  12
    sunspots   forecasting/sunspots/monthly-sunspots.csv  Sunspots    48 -> 12          0.7/0.2/0.1  12
    synthetic  generated from the task seed (no file)     signal      48 -> 24          0.7/0.2/0.1  24
    csv        data_path (required)                       (required)  24 -> 1           0.7/0.2/0.1  none

``split: ett`` is the Informer/Autoformer protocol (``Dataset_ETT_hour``), so normalised MSE/MAE
compare with the literature: 12/4/4 months of 30 days (rows [0, 8640), [8640, 11520),
[11520, 14400); later rows unused), z-scored with the mean and std of the training rows only, and
valid/test windows whose labels lie in the split while their inputs may reach back into the
previous split. With ``input_width: 96`` that gives 8,521 / 2,857 / 2,857 windows at horizon 24 and
``len - input_width - label_width + 1`` in general. (Informer's and Autoformer's test loaders drop
the last incomplete batch of 32, so their published scores cover 2,848 of the 2,857 test windows;
rnnbench scores all of them.) The fraction splits cut windows inside each split, as the TensorFlow
time-series tutorial they follow does. The default 48 -> 24 instead of the literature's 96 -> 24
halves the recurrent steps, so a trial trains in minutes on a CPU.

``features`` are Informer's modes: ``S``, the target columns in and out (the default); ``MS``,
every numeric column in (ETT's six loads, synthetic's leading indicator; or ``feature_columns``)
and the targets out; ``M``, every column in and out: all of them are forecast, and every metric
averages over all of them (``*_original`` each in its own column's units). ``multivariate: true``
and ``false`` are the older spellings of ``MS`` and ``S``. The targets are always inputs too.

``normalize`` adds a per-window normalisation inside the model, on top of the global z-scoring, so
a saved model carries it: ``last`` is NLinear's subtract-last (Zeng et al., AAAI 2023), ``revin`` is
RevIN (Kim et al., ICLR 2022). Both read only the input window, in which every forecast column
is present (targets are inputs), and both need ``input_width >= 2``: on a one-row window every
input would normalise to zero (its last value is itself; its std is 0).

Baselines (:meth:`ForecastTask.baselines`), scored like the models and in the z-scored space they
see: persistence (the last target value repeated), seasonal naive (each label step repeats the
value a whole number of seasons earlier, read from the input window, so it needs
``season <= input_width``) and ``linear``, Zeng et al.'s Linear fitted in closed form on the
training windows (:func:`fit_linear`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from rnnbench import hookimpl
from rnnbench.data.batching import to_device
from rnnbench.data.resolve import DataFile, resolve
from rnnbench.data.series import (
    Series,
    WindowSpec,
    column_statistics,
    read_series_csv,
    series_from_frame,
    sliding_windows,
    split_rows,
    split_window,
    to_tensor,
    window_rows,
)
from rnnbench.errors import ConfigError, DataError
from rnnbench.hparams import MAX_WIDTH, Domain
from rnnbench.task import NON_NEGATIVE, SPLITS, Batch, EncoderFactory, Metric, Task, TaskOptions

TF_TUTORIAL_SPLIT = (0.7, 0.2, 0.1)
SYNTHETIC_ROWS = 4000
EVAL_BATCH_SIZE = 1024  # persistence has no parameters: one large batch per step is enough
# item columns summed into each metric (divided by the summed ``n``, the number of values)
ERROR_SUMS = {"mse": "se", "mae": "ae", "mse_original": "se_original", "mae_original": "ae_original"}


@dataclass(frozen=True)
class SeriesDataset:
    """Where a named dataset lives and the defaults it is benchmarked with."""

    file: DataFile | None
    target_columns: tuple[str, ...]
    date_column: str | None
    input_width: int
    label_width: int
    split: str | tuple[float, float, float] = TF_TUTORIAL_SPLIT
    season: int | None = None  # rows per seasonal cycle: the seasonal naive baseline's lag


def _ett(name: str, sha256: str) -> SeriesDataset:
    return SeriesDataset(
        DataFile(
            f"forecasting/ett/{name}.csv",
            sha256,
            f"https://raw.githubusercontent.com/zhouhaoyi/ETDataset/main/ETT-small/{name}.csv",
        ),
        ("OT",),
        "date",
        input_width=48,
        label_width=24,
        split="ett",
        season=24,  # hourly rows: the daily cycle
    )


DATASETS: dict[str, SeriesDataset] = {
    "etth1": _ett("ETTh1", "f18de3ad269cef59bb07b5438d79bb3042d3be49bdeecf01c1cd6d29695ee066"),
    "etth2": _ett("ETTh2", "a3dc2c597b9218c7ce1cd55eb77b283fd459a1d09d753063f944967dd6b9218b"),
    "airline": SeriesDataset(
        DataFile(
            "forecasting/airline/airline-passengers.csv",
            "8cb51be753a718d9be5d76d7e238cc224792754676adc21faa59e954b0201621",
            "https://raw.githubusercontent.com/jbrownlee/Datasets/master/airline-passengers.csv",
        ),
        ("Passengers",),
        "Month",
        input_width=12,
        label_width=1,
        season=12,
    ),
    "sunspots": SeriesDataset(
        DataFile(
            "forecasting/sunspots/monthly-sunspots.csv",
            "c4ec8cc57d9f6fb6ecdb3e1f37f25b6f4badd5124c55931052b0cd2fc3bc71f3",
            "https://raw.githubusercontent.com/jbrownlee/Datasets/master/monthly-sunspots.csv",
        ),
        ("Sunspots",),
        "Month",
        input_width=48,
        label_width=12,
        season=12,  # the calendar year (the ~11-year sunspot cycle is longer than any window)
    ),
    "synthetic": SeriesDataset(None, ("signal",), None, input_width=48, label_width=24, season=24),
    "csv": SeriesDataset(None, (), None, input_width=24, label_width=1),
}


def synthetic_series_frame(seed: int, rows: int = SYNTHETIC_ROWS) -> pd.DataFrame:
    """A seasonal series with a trend and noise, plus a correlated leading indicator.

    ``signal`` = a period-24 cycle + a slower period-100 cycle + a linear trend + noise; random
    phases come from ``seed``. ``leading`` shows the slow cycle 12 steps early, so a multivariate
    model can do better than a univariate one. Persistence is poor at long horizons (the cycles
    move), while a small recurrent model can learn the shape.
    """
    rng = np.random.default_rng(seed)
    steps = np.arange(rows, dtype="float64")
    fast_phase, slow_phase = rng.uniform(0.0, 2.0 * np.pi, size=2)
    fast = np.sin(2.0 * np.pi * steps / 24.0 + fast_phase)
    slow = 0.6 * np.sin(2.0 * np.pi * steps / 100.0 + slow_phase)
    slow_ahead = 0.6 * np.sin(2.0 * np.pi * (steps + 12.0) / 100.0 + slow_phase)
    trend = steps / rows
    signal = fast + slow + trend + 0.1 * rng.standard_normal(rows)
    leading = slow_ahead + 0.1 * rng.standard_normal(rows)
    return pd.DataFrame({"signal": signal, "leading": leading})


class ForecastOptions(TaskOptions):
    """Options of the forecast task; ``None`` means the dataset's default (see the module docs)."""

    target_columns: list[str] | None = Field(None, min_length=1)
    feature_columns: list[str] | None = None
    features: Literal["S", "MS", "M"] | None = None  # None: MS with feature_columns, else S
    multivariate: bool = False  # the older spelling: true is MS, false is S
    normalize: Literal["none", "last", "revin"] = "none"
    season: int | None = Field(None, ge=1)
    date_column: str | None = None
    split: Literal["ett"] | tuple[float, float, float] | None = None
    input_width: int | None = Field(None, ge=1)
    label_width: int | None = Field(None, ge=1)
    shift: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_spelling_of_features(self) -> ForecastOptions:
        if self.features is not None and "multivariate" in self.model_fields_set:
            raise ValueError(
                "give features (S, MS or M) or multivariate (its older spelling: true = MS, "
                "false = S), not both"
            )
        if self.features == "S" and self.feature_columns:
            raise ValueError("features S reads the target columns only: drop feature_columns or use MS or M")
        return self

    @property
    def resolved_features(self) -> str:
        """S, MS or M; without ``features``, what ``multivariate`` and ``feature_columns`` always meant."""
        if self.features is not None:
            return self.features
        return "MS" if self.multivariate or self.feature_columns else "S"

    @field_validator("target_columns", "feature_columns", mode="before")
    @classmethod
    def _one_name_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("split")
    @classmethod
    def _fractions_sum_to_one(cls, value: Any) -> Any:
        if isinstance(value, tuple) and (min(value) <= 0 or abs(sum(value) - 1.0) > 1e-6):
            raise ValueError(f"split fractions must be positive and sum to 1, got {list(value)}")
        return value


REVIN_EPS = 1e-5  # RevIN's eps, inside the square root of the window variance (the paper's code)
LINEAR_RIDGE = 1e-6  # the linear baseline's ridge, relative to the mean diagonal of its normal matrix
# what export_state says each normalize mode does inside the model (a user of the weights needs nothing else)
WINDOW_NORMALISATION = {
    "none": "none: the model reads the z-scored window as it is",
    "last": "inside the model: each column minus its last input value; the targets' last values are "
    "added back to the output (NLinear)",
    "revin": "inside the model: each column minus its window mean, over sqrt(window variance + 1e-5), "
    "times affine_weight plus affine_bias (learned, in the weights); inverted on the output with the "
    "targets' statistics (RevIN)",
}


class WindowIdentity(nn.Module):
    """``normalize: none``: the globally z-scored window as it is."""

    def forward(self, inputs: Tensor) -> tuple[Tensor, Any]:
        return inputs, None

    def restore(self, outputs: Tensor, stats: Any) -> Tensor:
        return outputs


class SubtractLast(nn.Module):
    """``normalize: last``, NLinear's (Zeng et al., AAAI 2023): every column minus its last input
    value; the forecast columns' last values are added back to the outputs."""

    def __init__(self, n_targets: int):
        super().__init__()
        self.n_targets = n_targets

    def forward(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        last = inputs[:, -1:, :].detach()
        return inputs - last, last[..., : self.n_targets]

    def restore(self, outputs: Tensor, last: Tensor) -> Tensor:
        return outputs + last


class RevIN(nn.Module):
    """``normalize: revin``, Kim et al. (ICLR 2022), as their code computes it: each window and
    column minus its mean, over ``sqrt(var + eps)`` (population variance, so a constant window gives
    zeros, never a division by zero), times a learnable weight plus a bias per column (1 and 0 at
    first); the outputs undo it with the forecast columns' statistics and affine."""

    def __init__(self, n_columns: int, n_targets: int, eps: float = REVIN_EPS):
        super().__init__()
        self.n_targets, self.eps = n_targets, eps
        self.affine_weight = nn.Parameter(torch.ones(n_columns))
        self.affine_bias = nn.Parameter(torch.zeros(n_columns))

    def forward(self, inputs: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        mean = inputs.mean(1, keepdim=True).detach()
        std = torch.sqrt(inputs.var(1, keepdim=True, unbiased=False) + self.eps).detach()
        normalised = (inputs - mean) / std * self.affine_weight + self.affine_bias
        k = self.n_targets
        return normalised, (mean[..., :k], std[..., :k])

    def restore(self, outputs: Tensor, stats: tuple[Tensor, Tensor]) -> Tensor:
        mean, std = stats
        k = self.n_targets
        # eps² keeps a weight trained to 0 from dividing by zero (the paper's code does the same)
        outputs = (outputs - self.affine_bias[:k]) / (self.affine_weight[:k] + self.eps * self.eps)
        return outputs * std + mean


def window_normalisation(normalize: str, n_columns: int, n_targets: int) -> nn.Module:
    if normalize == "last":
        return SubtractLast(n_targets)
    if normalize == "revin":
        return RevIN(n_columns, n_targets)
    return WindowIdentity()


class ForecastModel(nn.Module):
    """Window normalisation -> optional input projection -> encoder -> linear head on the final
    output of each direction -> the normalisation undone.

    ``dropout`` acts where a one-layer encoder has no dropout of its own (the encoder drops only
    between layers): on the encoder's summary before the head, and on the projected inputs when
    there is a projection. At 0 it is the identity, in training mode too.
    """

    def __init__(
        self,
        encoder: nn.Module,
        projection: nn.Module,
        label_width: int,
        n_targets: int,
        *,
        normalisation: nn.Module | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.normalisation = normalisation if normalisation is not None else WindowIdentity()
        self.projection = projection
        self.input_dropout = nn.Identity() if isinstance(projection, nn.Identity) else nn.Dropout(dropout)
        self.encoder = encoder
        self.summary_dropout = nn.Dropout(dropout)
        self.label_width, self.n_targets = label_width, n_targets
        self.num_directions = 2 if getattr(encoder, "bidirectional", False) else 1
        self.head = nn.Linear(encoder.output_size, label_width * n_targets)

    def forward(self, inputs: Tensor) -> Tensor:
        """``inputs [B, input_width, columns]`` -> forecasts ``[B, label_width, n_targets]``."""
        normalised, stats = self.normalisation(inputs)
        outputs, _ = self.encoder(self.input_dropout(self.projection(normalised)))
        if self.num_directions == 1:
            summary = outputs[:, -1]
        else:
            # Each direction's last step: forward ends at t = T-1, backward at t = 0.
            forward_part, backward_part = outputs.chunk(2, dim=-1)
            summary = torch.cat([forward_part[:, -1], backward_part[:, 0]], dim=-1)
        forecast = self.head(self.summary_dropout(summary)).view(-1, self.label_width, self.n_targets)
        return self.normalisation.restore(forecast, stats)


# -- baselines ------------------------------------------------------------------------------------
def seasonal_lags(spec: WindowSpec, season: int) -> Tensor:
    """For each label step, the input row holding the value a whole number of seasons before it:
    the most recent one, ``ceil(d / season)`` seasons back, where ``d`` is how many rows the step
    lies after the last input row."""
    if season > spec.input_width:
        raise ConfigError(
            f"season ({season}) is longer than input_width ({spec.input_width}): the seasonal naive "
            "baseline reads one season back inside the input window"
        )
    after_last = spec.shift - spec.label_width + 1 + torch.arange(spec.label_width)
    back = season * torch.div(after_last + season - 1, season, rounding_mode="floor")
    return spec.input_width - 1 + after_last - back


def _normalise_rows(x: Tensor, normalize: str) -> tuple[Tensor, Tensor, Tensor]:
    """Per-window normalisation of ``x [..., input_width]`` as the models' (without RevIN's
    learnable affine): ``(normalised, shift, scale)``, undone as ``y * scale + shift``."""
    one = torch.ones_like(x[..., -1:])
    if normalize == "last":
        shift = x[..., -1:]
        return x - shift, shift, one
    if normalize == "revin":
        shift = x.mean(-1, keepdim=True)
        scale = torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + REVIN_EPS)
        return (x - shift) / scale, shift, scale
    return x, torch.zeros_like(one), one


def fit_linear(
    inputs: Tensor, labels: Tensor, normalize: str = "none", ridge: float = LINEAR_RIDGE
) -> Tensor:
    """Zeng et al.'s Linear (AAAI 2023) in closed form: ``[input_width + 1, label_width]``.

    One map from a column's input window (and a 1 for the bias) to its ``label_width`` next values,
    shared by every forecast column, each column a separate example (channel-independent, their
    ``individual=False``), so other input columns do not enter. Least squares over every training
    window (``inputs [N, input_width, >= k]``, ``labels [N, label_width, k]``) in float64, with a ridge
    of ``ridge`` times the normal matrix's mean diagonal, which keeps a constant column or a tiny
    training split well-posed and moves a well-posed fit by about that much. ``normalize`` fits in
    the same per-window space as the models (``last``: NLinear's).
    """
    k = labels.shape[-1]
    x = inputs[..., :k].transpose(1, 2).reshape(-1, inputs.shape[1]).double()
    y = labels.transpose(1, 2).reshape(-1, labels.shape[1]).double()
    x, shift, scale = _normalise_rows(x, normalize)
    y = (y - shift) / scale
    design = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    normal = design.T @ design
    normal += ridge * normal.diagonal().mean() * torch.eye(normal.shape[0], dtype=normal.dtype)
    return torch.linalg.solve(normal, design.T @ y)


class LinearForecast:
    """A :func:`fit_linear` map applied to each forecast column of a batch of windows."""

    def __init__(self, weight: Tensor, n_targets: int, normalize: str):
        self.weight, self.n_targets, self.normalize = weight, n_targets, normalize

    def __call__(self, inputs: Tensor) -> Tensor:
        x = inputs[..., : self.n_targets].transpose(1, 2).double()  # [B, k, input_width]
        x, shift, scale = _normalise_rows(x, self.normalize)
        weight = self.weight.to(x.device)
        forecast = (x @ weight[:-1] + weight[-1]) * scale + shift
        return forecast.transpose(1, 2).to(inputs.dtype)


class ForecastTask(Task):
    """Time-series forecasting from a sliding window: ETT, airline, sunspots or any CSV (MSE, MAE)."""

    name = "forecast"
    metrics = (
        Metric(
            "mse",
            "minimize",
            "mean squared error of z-scored targets (as ETT results are reported)",
            NON_NEGATIVE,
            margin=0.05,  # 5%: below the spread of published ETTh1 results between runs
            margin_relative=True,
        ),
        Metric("mae", "minimize", "mean absolute error of z-scored targets", NON_NEGATIVE),
        Metric("mse_original", "minimize", "mean squared error in the data's own units", NON_NEGATIVE),
        Metric("mae_original", "minimize", "mean absolute error in the data's own units", NON_NEGATIVE),
    )
    causal = False
    datasets = tuple(DATASETS)
    Options = ForecastOptions
    hparam_defaults = {"input_projection": 0}  # 0: feed the z-scored columns to the encoder as they are
    hparam_domains = {"input_projection": Domain("int", 0, MAX_WIDTH)}

    def __init__(self, dataset: str = "synthetic", *, data_path=None, seed: int = 0, **options):
        super().__init__(dataset, data_path=data_path, seed=seed, **options)
        defaults, opts = DATASETS[dataset], self.options
        if dataset == "synthetic" and self.data_path is not None:
            raise ConfigError("dataset 'synthetic' of task 'forecast' is generated: it takes no data_path")
        if dataset == "csv" and (self.data_path is None or not opts.target_columns):
            raise ConfigError(
                "dataset 'csv' of task 'forecast' needs data_path and the target_columns option "
                "(and optionally date_column, feature_columns, features, normalize or season)"
            )
        self.features, self.normalize = opts.resolved_features, opts.normalize
        self.target_columns = tuple(opts.target_columns or defaults.target_columns)
        self.date_column = opts.date_column if opts.date_column is not None else defaults.date_column
        self.split = opts.split if opts.split is not None else defaults.split
        label_width = opts.label_width or defaults.label_width
        self.window = WindowSpec(
            input_width=opts.input_width or defaults.input_width,
            label_width=label_width,
            shift=opts.shift or label_width,
        )
        if self.normalize != "none" and self.window.input_width < 2:
            raise ConfigError(
                f"normalize: {self.normalize} needs input_width >= 2: on a one-row window every input "
                "normalises to zero (its last value is itself, its std is 0), so the model would see nothing"
            )
        self.season = opts.season if opts.season is not None else defaults.season
        if opts.season is not None:
            seasonal_lags(self.window, opts.season)  # a season given but longer than the window: refused
        elif self.season is not None and self.season > self.window.input_width:
            self.season = None  # the dataset's default does not fit this window: no seasonal naive
        self.series: Series | None = None
        self._on_device: dict[tuple[str, str], Tensor] = {}
        self._linear: LinearForecast | None = None

    # -- data -----------------------------------------------------------------------------------
    def setup(self) -> None:
        series = self._load_series()
        self.rows = split_rows(len(series), self.split, series.source)
        # ETT as published: valid/test inputs may start in the previous split (labels never do).
        self.window_rows = window_rows(self.rows, self.window, reach_back=self.split == "ett")
        train = self.rows["train"]
        mean, std = column_statistics(series.values[train.start : train.stop])
        normalised = to_tensor((series.values - mean) / std)
        self.segments = {name: normalised[r.start : r.stop] for name, r in self.window_rows.items()}
        for name, r in self.window_rows.items():
            if self.window.count(len(r)) == 0:
                raise DataError(
                    f"{series.source}: the {name} split has {len(self.rows[name])} rows, fewer than one "
                    f"window of {self.window.total_width} (input_width {self.window.input_width} + shift "
                    f"{self.window.shift}); use a smaller window or another split"
                )
        self.mean, self.std = to_tensor(mean), to_tensor(std)
        self.series, self._on_device, self._linear = series, {}, None

    def _load_series(self) -> Series:
        opts = self.options
        columns = dict(
            target_columns=self.target_columns,
            feature_columns=opts.feature_columns,
            date_column=self.date_column,
            multivariate=self.features != "S",
        )
        if self.dataset == "synthetic":
            series = series_from_frame(
                synthetic_series_frame(self.seed), f"synthetic(seed={self.seed})", **columns
            )
        elif self.dataset == "csv":
            if not self.data_path.is_file():
                raise DataError(f"data file {self.data_path} does not exist (data_path of dataset 'csv')")
            series = read_series_csv(self.data_path, **columns)
        else:
            series = read_series_csv(resolve(DATASETS[self.dataset].file, self.data_path), **columns)
        # M: every input column is forecast too (the named targets stay first)
        return replace(series, n_targets=len(series.columns)) if self.features == "M" else series

    @property
    def n_targets(self) -> int:
        """How many columns are forecast: the target columns, or every column under ``features: M``."""
        return self._loaded().n_targets

    @property
    def n_inputs(self) -> int:
        return len(self._loaded().columns)

    def _loaded(self) -> Series:
        if self.series is None:
            raise RuntimeError("call setup() before using the forecast task's data")
        return self.series

    def _windows(self, split: str, device: torch.device) -> Tensor:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self._loaded()
        key = (split, str(device))
        if key not in self._on_device:
            self._on_device[key] = sliding_windows(self.segments[split].to(device), self.window)
        return self._on_device[key]

    def batches(
        self, split: str, batch_size: int, *, device: torch.device, generator: torch.Generator | None = None
    ) -> Iterator[Batch]:
        windows = self._windows(split, device)
        count = windows.shape[0]
        order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
        order = to_device(order, device)  # once per epoch, asynchronous on CUDA
        for start in range(0, count, batch_size):
            index = order[start : start + batch_size]
            inputs, labels = split_window(windows[index], self.window, self.n_targets)
            size = min(batch_size, count - start)
            yield Batch(inputs, labels, None, tokens=size * self.window.input_width)

    # -- model ----------------------------------------------------------------------------------
    def build_model(self, make_encoder: EncoderFactory, hparams: dict[str, Any]) -> nn.Module:
        width = hparams.get("input_projection", self.hparam_defaults["input_projection"])
        if not isinstance(width, int) or isinstance(width, bool) or width < 0:
            raise ConfigError(f"input_projection must be an integer >= 0 (0 = off), got {width!r}")
        dropout = hparams.get("dropout", 0.0)
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")
        projection = nn.Linear(self.n_inputs, width) if width else nn.Identity()
        encoder = make_encoder(width or self.n_inputs)
        normalisation = window_normalisation(self.normalize, self.n_inputs, self.n_targets)
        return ForecastModel(
            encoder,
            projection,
            self.window.label_width,
            self.n_targets,
            normalisation=normalisation,
            dropout=float(dropout),
        )

    def training_loss(self, model: nn.Module, batch: Batch, carry: Any = None) -> tuple[Tensor, Any]:
        # Windows are independent sequences: nothing carries over between batches.
        return nn.functional.mse_loss(model(batch.inputs), batch.targets), None

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, split: str, batch_size: int, *, device: torch.device
    ) -> dict[str, float]:
        return self._score(model, split, batch_size, device)

    @torch.no_grad()
    def evaluate_items(
        self, model: nn.Module, split: str, batch_size: int, *, device: torch.device
    ) -> pd.DataFrame:
        """One row per window, in time order: summed squared and absolute errors over its
        ``label_width × targets`` values (float32), z-scored (``se``, ``ae``) and in the data's units
        (``se_original``, ``ae_original``), their number ``n`` (int32), and ``se_h<k>``, the
        z-scored squared error at horizon step ``k`` (1 = the next step)."""
        std = self.std[: self.n_targets].to(device)
        parts = []
        for error in self._errors(model, split, batch_size, device):
            squared, original = error.square(), error * std
            errors = [squared, error.abs(), original.square(), original.abs()]
            per_window = torch.stack([e.sum((1, 2)) for e in errors], 1)
            parts.append(torch.cat([per_window, squared.sum(-1)], 1))
        table = pd.DataFrame(
            torch.cat(parts).cpu().numpy(),  # one transfer at the end
            columns=[*ERROR_SUMS.values(), *(f"se_h{k}" for k in range(1, self.window.label_width + 1))],
        )
        table.insert(4, "n", np.int32(self.window.label_width * self.n_targets))
        return table

    def metrics_from_sums(self, sums: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = np.asarray(sums["n"], dtype=np.float64)
        return {
            metric: np.asarray(sums[column], dtype=np.float64) / values
            for metric, column in ERROR_SUMS.items()
        }

    def baseline(self, split: str) -> dict[str, float]:
        """Persistence: every horizon step repeats the last observed target value."""
        return self._score(self._persistence, split, EVAL_BATCH_SIZE, torch.device("cpu"))

    def baselines(self, split: str) -> dict[str, dict[str, float]]:
        """Persistence, seasonal naive (where a season fits the input window) and the closed-form
        linear map fitted on the training windows (see the module docs)."""
        cpu = torch.device("cpu")
        named = {"persistence": self.baseline(split)}
        if self.season is not None:
            named["seasonal_naive"] = self._score(self._seasonal_naive, split, EVAL_BATCH_SIZE, cpu)
        named["linear"] = self._score(self._linear_forecast(), split, EVAL_BATCH_SIZE, cpu)
        return named

    def _persistence(self, inputs: Tensor) -> Tensor:
        last = inputs[:, -1:, : self.n_targets]
        return last.expand(-1, self.window.label_width, -1)

    def _seasonal_naive(self, inputs: Tensor) -> Tensor:
        lags = seasonal_lags(self.window, self.season).to(inputs.device)
        return inputs[:, lags, : self.n_targets]

    def _linear_forecast(self) -> LinearForecast:
        if self._linear is None:  # fitted once per setup, on the training windows only
            inputs, labels = split_window(
                self._windows("train", torch.device("cpu")), self.window, self.n_targets
            )
            weight = fit_linear(inputs, labels, self.normalize)
            self._linear = LinearForecast(weight, self.n_targets, self.normalize)
        return self._linear

    @torch.no_grad()
    def _score(
        self, predict: Callable[[Tensor], Tensor], split: str, batch_size: int, device: torch.device
    ) -> dict[str, float]:
        # Sums stay on the device; one transfer at the end instead of a sync per batch.
        std = self.std[: self.n_targets].to(device)
        totals = torch.zeros(4, device=device)
        values = 0
        for error in self._errors(predict, split, batch_size, device):
            original = error * std
            totals += torch.stack(
                [error.square().sum(), error.abs().sum(), original.square().sum(), original.abs().sum()]
            )
            values += error.numel()
        return dict(zip(ERROR_SUMS, (totals / values).tolist()))

    def _errors(
        self, predict: Callable[[Tensor], Tensor], split: str, batch_size: int, device: torch.device
    ) -> Iterator[Tensor]:
        """Forecast minus truth, z-scored, ``[B, label_width, targets]``, of each batch of windows in
        time order."""
        for batch in self.batches(split, batch_size, device=device):
            yield predict(batch.inputs) - batch.targets

    def export_state(self) -> dict[str, Any]:
        columns = self.series.columns
        return {
            "input": "[B, input_width, columns] float32, each column z-scored with mean and std; "
            "output: [B, label_width, targets], z-scored (multiply by std, add mean)",
            "features": self.features,
            "normalize": self.normalize,
            "normalize_means": WINDOW_NORMALISATION[self.normalize],
            "columns": list(columns),
            "targets": list(columns[: self.n_targets]),
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "input_width": self.window.input_width,
            "label_width": self.window.label_width,
            "shift": self.window.shift,
        }

    def describe(self) -> dict[str, Any]:
        series = self._loaded()
        facts: dict[str, Any] = {
            "dataset": self.dataset,
            "source": series.source,
            "rows": len(series),
            "split": self.split if isinstance(self.split, str) else list(self.split),
            "target_columns": list(series.target_columns),
            "feature_columns": list(series.feature_columns),
            "input_size": len(series.columns),
            "features": self.features,
            "normalize": self.normalize,
            "season": self.season if self.season is not None else "none",
            "input_width": self.window.input_width,
            "label_width": self.window.label_width,
            "shift": self.window.shift,
        }
        for name, r in self.rows.items():
            facts[f"rows_{name}"] = len(r)
            facts[f"windows_{name}"] = self.window.count(len(self.window_rows[name]))
            facts[f"first_input_row_{name}"] = self.window_rows[name].start
        for i, column in enumerate(series.target_columns):
            facts[f"train_mean_{column}"] = float(self.mean[i])
            facts[f"train_std_{column}"] = float(self.std[i])
        return facts


@hookimpl
def rnnbench_tasks():
    return {"forecast": ForecastTask}
