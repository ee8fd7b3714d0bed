"""Per-item outcomes of a final seed: one row per scored item of its valid and test splits.

Paired statistics compare architectures item by item (the same test sentence scored by two models)
and resample items as well as seeds. The frame is written beside the seed's weights, atomically and
before the ledger record that names it (path, sha256, rows), so a record never points at a missing
or half-written file; MLflow gets it as the run's artifact ``items/items.parquet``, a projection of
that file (see :func:`rnnbench.projection.project_items`).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rnnbench.models import read_recorded, weights_path, write_atomically

ARTIFACT_DIR = "items"  # in the final seed's MLflow run
ARTIFACT_FILE = "items.parquet"
ARTIFACT_PATH = f"{ARTIFACT_DIR}/{ARTIFACT_FILE}"
ID_COLUMNS = ("split", "item")  # then the task's own columns


def items_path(home: Path, study_name: str, seed: int, trial: int | None = None) -> Path:
    """Beside the seed's weights, so any change to where weights go moves the items with them."""
    weights = weights_path(home, study_name, seed, trial)
    return weights.with_name(weights.stem + ".items.parquet")


def item_frame(per_split: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One frame of ``split``, ``item`` (the row number within its split) and the task's columns."""
    frames = []
    for split, frame in per_split.items():
        frame = frame.reset_index(drop=True)
        ids = {"split": split, "item": np.arange(len(frame), dtype=np.int32)}
        frames.append(pd.concat([pd.DataFrame(ids), frame], axis=1))
    return pd.concat(frames, ignore_index=True)


def to_parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False, compression="zstd")
    return buffer.getvalue()


def save_items(
    home: Path, study_name: str, seed: int, frame: pd.DataFrame, trial: int | None = None
) -> dict[str, Any]:
    """Write the items atomically; returns what the ledger record keeps: path, sha256 and rows."""
    path = items_path(home, study_name, seed, trial)
    data = to_parquet_bytes(frame)
    write_atomically(path, data)
    return {
        "path": path.relative_to(home).as_posix(),
        "sha256": hashlib.sha256(data).hexdigest(),
        "rows": len(frame),
    }


def read_items_bytes(home: Path, ref: Mapping[str, Any]) -> bytes:
    """The file a record names, checked against its sha256 (DataError when missing or changed)."""
    return read_recorded(home, dict(ref), "items")


def load_items(home: Path, ref: Mapping[str, Any]) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(read_items_bytes(home, ref)))
