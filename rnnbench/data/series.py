"""Time series for forecasting: CSV reading, chronological splits, z-scoring and sliding windows.

A series is a ``[rows, columns]`` float matrix whose first ``n_targets`` columns are the values to
forecast and whose remaining columns are extra inputs. Every input problem in a file (a column that
is not there, a value that is not a number, a gap, dates out of order) is one :class:`DataError`
naming the file, the line and the column, because a silent NaN would only surface epochs later as
a diverged loss.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from rnnbench.errors import ConfigError, DataError, first_line

# Cells spelled like this are gaps, not numbers (pandas' defaults, minus nothing surprising).
MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "-nan", "null", "none", "#n/a", "?"})

# Informer/Autoformer's ETT split: 12 months train, 4 valid, 4 test, 30-day months of hourly rows.
ETT_SPLIT_ROWS = (12 * 30 * 24, 4 * 30 * 24, 4 * 30 * 24)

SPLIT_NAMES = ("train", "valid", "test")


@dataclass(frozen=True)
class Series:
    """A numeric series read from ``source``: targets first, then extra input features."""

    values: np.ndarray  # [rows, columns], float64
    columns: tuple[str, ...]
    n_targets: int
    source: str

    def __len__(self) -> int:
        return self.values.shape[0]

    @property
    def target_columns(self) -> tuple[str, ...]:
        return self.columns[: self.n_targets]

    @property
    def feature_columns(self) -> tuple[str, ...]:
        return self.columns[self.n_targets :]


def read_series_csv(
    path: str | Path,
    *,
    target_columns: Sequence[str],
    feature_columns: Sequence[str] | None = None,
    date_column: str | None = None,
    multivariate: bool = False,
) -> Series:
    """Read a CSV series. ``feature_columns=None`` means none, or with ``multivariate`` every other
    numeric column (the date column excluded)."""
    path = Path(path)
    try:
        # Everything as text, blank lines kept: validation below can then name the exact line.
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty (expected a header line and data rows)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV file: {first_line(exc)}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    return series_from_frame(
        _drop_trailing_blank_rows(frame),
        str(path),
        target_columns=target_columns,
        feature_columns=feature_columns,
        date_column=date_column,
        multivariate=multivariate,
    )


def series_from_frame(
    frame: pd.DataFrame,
    source: str,
    *,
    target_columns: Sequence[str],
    feature_columns: Sequence[str] | None = None,
    date_column: str | None = None,
    multivariate: bool = False,
) -> Series:
    """Validate and select the columns of a table (text or numbers); ``source`` names it in errors."""
    if len(frame) == 0:
        raise DataError(f"{source}: the file has a header but no data rows")
    targets = list(target_columns)
    if not targets:
        raise ConfigError("target_columns must name at least one column")
    asked = targets + list(feature_columns or []) + ([date_column] if date_column else [])
    for name in asked:
        if name not in frame.columns:
            raise DataError(
                f"{source}: no column {name!r}; the columns present are {', '.join(map(repr, frame.columns))}"
            )
    if feature_columns is not None:
        features = list(feature_columns)
        if both := sorted(set(features) & set(targets)):
            raise ConfigError(
                f"column(s) {', '.join(both)} are listed as both target and feature; targets are "
                "always inputs too, so list them as targets only"
            )
    elif multivariate:
        others = [c for c in frame.columns if c not in targets and c != date_column]
        features = [c for c in others if _looks_numeric(frame[c])]
    else:
        features = []
    if len(set(targets + features)) != len(targets + features):
        raise ConfigError(f"a column is listed twice in target/feature columns: {targets + features}")
    if date_column:
        _check_dates(frame[date_column], date_column, source)
    columns = targets + features
    values = np.stack([_numeric_column(frame[c], c, source) for c in columns], axis=1)
    return Series(values=values, columns=tuple(columns), n_targets=len(targets), source=source)


def _drop_trailing_blank_rows(frame: pd.DataFrame) -> pd.DataFrame:
    # A file ending in blank lines is common and harmless; blank lines inside it are gaps.
    blank = (frame.fillna("").astype(str).apply(lambda col: col.str.strip()) == "").all(axis=1).to_numpy()
    end = len(frame)
    while end > 0 and blank[end - 1]:
        end -= 1
    return frame.iloc[:end]


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _where(source: str, index: int) -> str:
    # Index 0 is the first data row, on line 2 under the header (blank lines are kept as rows).
    return f"{source}, line {index + 2} (data row {index + 1})"


def _looks_numeric(column: pd.Series) -> bool:
    """A column counts as numeric when most of its cells parse as numbers, so one typo in a numeric
    column is reported below rather than silently dropping the column, while text columns (names,
    undeclared dates) are left out."""
    numbers = pd.to_numeric(column.astype(str).str.strip(), errors="coerce")
    return bool(numbers.notna().mean() > 0.5)


def _numeric_column(column: pd.Series, name: str, source: str) -> np.ndarray:
    if pd.api.types.is_numeric_dtype(column.dtype):
        text = None
        numbers = column.astype("float64")
        missing = numbers.isna().to_numpy()
    else:
        text = column.fillna("").astype(str).str.strip()
        missing = text.str.lower().isin(MISSING_TOKENS).to_numpy()
        numbers = pd.to_numeric(text.where(~missing), errors="coerce")
    values = numbers.to_numpy(dtype="float64", na_value=np.nan)
    if missing.any():
        row = int(np.flatnonzero(missing)[0])
        raise DataError(
            f"{_where(source, row)}: missing value in column {name!r} "
            f"({int(missing.sum())} missing in that column); fill or drop the gaps first"
        )
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        shown = text.iloc[row] if text is not None else values[row]
        raise DataError(
            f"{_where(source, row)}: column {name!r} holds {shown!r}, which is not a finite number"
        )
    # Models compute in float32: a larger value would become inf there, and every score with it.
    huge = np.abs(values) > FLOAT32_MAX
    if huge.any():
        row = int(np.flatnonzero(huge)[0])
        raise DataError(
            f"{_where(source, row)}: column {name!r} holds {values[row]:g}, beyond the float32 range "
            f"(±{FLOAT32_MAX:.3g}) models compute in; rescale the column"
        )
    return values


def _check_dates(column: pd.Series, name: str, source: str) -> None:
    text = column.fillna("").astype(str).str.strip()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "could not infer format": we report bad cells
        dates = pd.to_datetime(text, errors="coerce")
    unparsed = dates.isna().to_numpy()
    if unparsed.any():
        row = int(np.flatnonzero(unparsed)[0])
        what = "missing date" if text.iloc[row] == "" else f"{text.iloc[row]!r} is not a date"
        raise DataError(f"{_where(source, row)}: {what} in date column {name!r}")
    stamps = dates.to_numpy()
    not_after = np.flatnonzero(stamps[1:] <= stamps[:-1])
    if len(not_after):
        row = int(not_after[0]) + 1
        raise DataError(
            f"{_where(source, row)}: date {text.iloc[row]!r} in column {name!r} is not after the previous "
            f"row's {text.iloc[row - 1]!r}; dates must be strictly increasing (sort the file, drop duplicates)"
        )


# -- splits and normalisation ------------------------------------------------------------------
def split_rows(n_rows: int, split: str | Sequence[float], source: str = "series") -> dict[str, range]:
    """Chronological train/valid/test row ranges: the rows each split forecasts (its labels).

    ``split`` is ``"ett"`` (rows [0, 8640), [8640, 11520), [11520, 14400); later rows unused) or
    three fractions summing to 1, cut as the TensorFlow time-series tutorial does
    (``int(n * 0.7)``, ``int(n * 0.9)``).
    """
    if split == "ett":
        needed = sum(ETT_SPLIT_ROWS)
        if n_rows < needed:
            raise DataError(f"{source}: split 'ett' needs {needed} rows, the series has {n_rows}")
        bounds = np.cumsum((0,) + ETT_SPLIT_ROWS)
    else:
        fractions = np.asarray(split, dtype="float64")
        if fractions.shape != (3,) or (fractions <= 0).any() or abs(fractions.sum() - 1.0) > 1e-6:
            raise ConfigError(f"split must be 'ett' or three positive fractions summing to 1, got {split!r}")
        # The epsilon keeps 0.7 + 0.2 = 0.8999... from losing a row to float rounding.
        cuts = np.floor(np.cumsum(fractions)[:2] * n_rows + 1e-9).astype(int)
        bounds = [0, *cuts, n_rows]
    return {name: range(int(bounds[i]), int(bounds[i + 1])) for i, name in enumerate(SPLIT_NAMES)}


def column_statistics(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and (population) std, as sklearn's StandardScaler fits them for Informer.

    A constant column gets its value as mean and std 1, so it normalises to exact zeros instead of
    dividing by zero. Constant is tested on the values themselves (max == min), not on ``std > 0``:
    the std of a constant 0.1 comes out near 1e-17 in floating point (and its mean 1e-17 off), and
    dividing by that would blow the column up to ~1e15 wherever it moves later.
    """
    low, high = values.min(axis=0), values.max(axis=0)
    constant = low == high
    mean = np.where(constant, low, values.mean(axis=0))
    std = values.std(axis=0)
    return mean, np.where(constant | (std <= 0), 1.0, std)


# -- windows -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class WindowSpec:
    """The TensorFlow tutorial's WindowGenerator geometry.

    A window spans ``input_width + shift`` rows: the first ``input_width`` are the inputs and the
    last ``label_width`` the labels. ``shift >= label_width``, so labels lie strictly after the
    inputs (a gap of ``shift - label_width`` rows when larger).
    """

    input_width: int
    label_width: int
    shift: int

    def __post_init__(self):
        for name in ("input_width", "label_width", "shift"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if self.shift < self.label_width:
            raise ConfigError(
                f"shift ({self.shift}) must be >= label_width ({self.label_width}): labels must come after "
                "the inputs, otherwise the model is asked for values it was given"
            )

    @property
    def total_width(self) -> int:
        return self.input_width + self.shift

    @property
    def label_start(self) -> int:
        return self.total_width - self.label_width

    def count(self, rows: int) -> int:
        """How many windows fit in ``rows`` consecutive rows (stride 1)."""
        return max(rows - self.total_width + 1, 0)


def window_rows(rows: dict[str, range], spec: WindowSpec, *, reach_back: bool) -> dict[str, range]:
    """The rows each split's windows are cut from.

    Without ``reach_back`` a split's windows lie wholly inside its own rows (the TensorFlow tutorial:
    one DataFrame per split). With it, a window belongs to the split its labels lie in, and the rows
    before its labels (input and gap) may come from the end of the previous split, as Informer's
    ``Dataset_ETT_hour`` cuts valid and test from ``border - seq_len``. Every label row of a split is
    then a forecast target, and no label is ever an input of another split's window. The first split
    has nothing before it.
    """
    reach = spec.label_start if reach_back else 0
    segments, first = {}, True
    for name, r in rows.items():
        start = r.start if first else max(r.start - reach, 0)
        segments[name], first = range(start, r.stop), False
    return segments


def sliding_windows(segment: Tensor, spec: WindowSpec) -> Tensor:
    """All windows of a segment ``[rows, columns]`` (see :func:`window_rows`) as a view
    ``[windows, total_width, columns]``, in row order, stride 1."""
    return segment.unfold(0, spec.total_width, 1).transpose(1, 2)


def split_window(windows: Tensor, spec: WindowSpec, n_targets: int) -> tuple[Tensor, Tensor]:
    """``(inputs [B, input_width, columns], labels [B, label_width, n_targets])``."""
    inputs = windows[:, : spec.input_width, :]
    labels = windows[:, spec.label_start :, :n_targets]
    return inputs.contiguous(), labels.contiguous()


def to_tensor(values: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


__all__ = [
    "ETT_SPLIT_ROWS",
    "Series",
    "WindowSpec",
    "column_statistics",
    "read_series_csv",
    "series_from_frame",
    "sliding_windows",
    "split_rows",
    "split_window",
    "to_tensor",
    "window_rows",
]
