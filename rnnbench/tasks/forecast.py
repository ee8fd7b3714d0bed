"""Time-series forecasting: a window of past rows in, the next ``label_width`` target values out.

Direct multi-step forecasting: the encoder reads ``input_width`` z-scored rows and a linear head
maps its final output(s) to all ``label_width`` future steps at once, so there is no error feedback
between horizons. The encoder sees only the input window, whose labels lie strictly after it, so a
bidirectional encoder is allowed.

Datasets and their defaults (every default can be overridden by an option)::

    name       file                                       target      inputs -> labels  split
    etth1      forecasting/ett/ETTh1.csv                  OT          48 -> 24          ett
    etth2      forecasting/ett/ETTh2.csv                  OT          48 -> 24          ett
    airline    forecasting/airline/airline-passengers.csv Passengers  12 -> 1           0.7/0.2/0.1
    sunspots   forecasting/sunspots/monthly-sunspots.csv  Sunspots    48 -> 12          0.7/0.2/0.1
    synthetic  generated from the task seed (no file)     signal      48 -> 24          0.7/0.2/0.1
    csv        data_path (required)                       (required)  24 -> 1           0.7/0.2/0.1

``split: ett`` is the Informer/Autoformer protocol (``Dataset_ETT_hour``), so normalised MSE/MAE
compare with the literature: 12/4/4 months of 30 days (rows [0, 8640), [8640, 11520),
[11520, 14400); later rows unused), z-scored with the mean and std of the training rows only, and
valid/test windows whose labels lie in the split while their inputs may reach back into the
previous split. With ``input_width: 96`` that gives 8,521 / 2,857 / 2,857 windows at horizon 24 and
``len - input_width - label_width + 1`` in general. (Informer's and Autoformer's test loaders drop
the last incomplete batch of 32, so their published scores cover 2,848 of the 2,857 test windows;
rnnbench scores all of them.) The fraction splits cut windows inside each split, as the TensorFlow
time-series tutorial they follow does. The default 48 -> 24 instead of the literature's 96 -> 24
halves the recurrent steps, so a trial trains in minutes on a CPU. With ``multivariate: true``, ETT
adds its six load columns as inputs and synthetic adds a leading indicator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, field_validator
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
    ),
    "synthetic": SeriesDataset(None, ("signal",), None, input_width=48, label_width=24),
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
    multivariate: bool = False
    date_column: str | None = None
    split: Literal["ett"] | tuple[float, float, float] | None = None
    input_width: int | None = Field(None, ge=1)
    label_width: int | None = Field(None, ge=1)
    shift: int | None = Field(None, ge=1)

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


class ForecastModel(nn.Module):
    """Optional input projection -> encoder -> linear head on the final output of each direction."""

    def __init__(self, encoder: nn.Module, projection: nn.Module, label_width: int, n_targets: int):
        super().__init__()
        self.projection = projection
        self.encoder = encoder
        self.label_width, self.n_targets = label_width, n_targets
        self.num_directions = 2 if getattr(encoder, "bidirectional", False) else 1
        self.head = nn.Linear(encoder.output_size, label_width * n_targets)

    def forward(self, inputs: Tensor) -> Tensor:
        """``inputs [B, input_width, columns]`` -> forecasts ``[B, label_width, n_targets]``."""
        outputs, _ = self.encoder(self.projection(inputs))
        if self.num_directions == 1:
            summary = outputs[:, -1]
        else:
            # Each direction's last step: forward ends at t = T-1, backward at t = 0.
            forward_part, backward_part = outputs.chunk(2, dim=-1)
            summary = torch.cat([forward_part[:, -1], backward_part[:, 0]], dim=-1)
        return self.head(summary).view(-1, self.label_width, self.n_targets)


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
                "(and optionally date_column, feature_columns or multivariate)"
            )
        self.target_columns = tuple(opts.target_columns or defaults.target_columns)
        self.date_column = opts.date_column if opts.date_column is not None else defaults.date_column
        self.split = opts.split if opts.split is not None else defaults.split
        label_width = opts.label_width or defaults.label_width
        self.window = WindowSpec(
            input_width=opts.input_width or defaults.input_width,
            label_width=label_width,
            shift=opts.shift or label_width,
        )
        self.series: Series | None = None
        self._on_device: dict[tuple[str, str], Tensor] = {}

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
        self.series, self._on_device = series, {}

    def _load_series(self) -> Series:
        opts = self.options
        columns = dict(
            target_columns=self.target_columns,
            feature_columns=opts.feature_columns,
            date_column=self.date_column,
            multivariate=opts.multivariate,
        )
        if self.dataset == "synthetic":
            return series_from_frame(
                synthetic_series_frame(self.seed), f"synthetic(seed={self.seed})", **columns
            )
        if self.dataset == "csv":
            if not self.data_path.is_file():
                raise DataError(f"data file {self.data_path} does not exist (data_path of dataset 'csv')")
            path = self.data_path
        else:
            path = resolve(DATASETS[self.dataset].file, self.data_path)
        return read_series_csv(path, **columns)

    @property
    def n_targets(self) -> int:
        return len(self.target_columns)

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
        projection = nn.Linear(self.n_inputs, width) if width else nn.Identity()
        encoder = make_encoder(width or self.n_inputs)
        return ForecastModel(encoder, projection, self.window.label_width, self.n_targets)

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

    def _persistence(self, inputs: Tensor) -> Tensor:
        last = inputs[:, -1:, : self.n_targets]
        return last.expand(-1, self.window.label_width, -1)

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
