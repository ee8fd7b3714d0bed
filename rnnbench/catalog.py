"""What ``rnnbench list`` shows, cached so it answers without importing torch.

Importing torch alone takes seconds on a small CPU machine, and listing a cell's parameter count
means building it. The catalog is rebuilt whenever its fingerprint changes: the rnnbench version,
the builtin plugin sources, the installed ``rnnbench`` entry points and their distributions'
versions, and RNNBENCH_DISABLE_PLUGINS. ``rnnbench list --refresh`` rebuilds it by hand (an
editable plugin whose code changed without a version bump).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import warnings
from pathlib import Path
from typing import Any

from rnnbench import __version__
from rnnbench.data.resolve import cache_dir
from rnnbench.plugins import DISABLE_ENV, ENTRY_POINT_GROUP, Registry, one_line_error

REFERENCE_SIZE = 128  # input = hidden = 128, one layer, unidirectional


def _fingerprint() -> str:
    parts = [__version__, os.environ.get(DISABLE_ENV, "")]
    package = Path(__file__).parent
    for source in sorted([*package.glob("cells/*.py"), *package.glob("tasks/*.py"), package / "plugins.py"]):
        stat = source.stat()
        parts.append(f"{source.name}:{stat.st_mtime_ns}:{stat.st_size}")
    for ep in sorted(
        importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name, e.value)
    ):
        dist = f"{ep.dist.name}=={ep.dist.version}" if ep.dist else "?"
        parts.append(f"{ep.name}={ep.value}@{dist}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _cache_file() -> Path:
    return cache_dir() / "catalog.json"


def build() -> dict[str, Any]:
    """Load every plugin and describe its cells and tasks (imports torch)."""
    # local: rnnbench.encoder imports torch, +2.9 s that a cached `rnnbench list` must not pay
    from rnnbench.encoder import Encoder

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registry = Registry()
    cells = []
    for entry in registry.cells.values():
        try:
            count = Encoder(entry.cls, REFERENCE_SIZE, REFERENCE_SIZE).parameters()
            params: int | None = sum(p.numel() for p in count)
        except Exception as exc:  # a cell that cannot be built at the reference size is still listed
            params = None
            caught.append(
                warnings.WarningMessage(
                    f"cell {entry.name!r} ({entry.origin}) failed to build: {one_line_error(exc)}",
                    UserWarning,
                    "",
                    0,
                )
            )
        cells.append(
            {
                "name": entry.name,
                "source": entry.source,
                "description": entry.description,
                "parameters": params,
            }
        )
    tasks = [
        {
            "name": entry.name,
            "source": entry.source,
            "description": entry.description,
            "datasets": list(entry.cls.datasets),
            "metrics": [m.name for m in entry.cls.metrics],
            "causal": bool(entry.cls.causal),
        }
        for entry in registry.tasks.values()
    ]
    clashes = [message for by_name in registry.clashes.values() for message in by_name.values()]
    return {"cells": cells, "tasks": tasks, "warnings": [str(w.message) for w in caught] + clashes}


def load(refresh: bool = False) -> dict[str, Any]:
    """The catalog, from the cache when its fingerprint still matches."""
    fingerprint, path = _fingerprint(), _cache_file()
    if not refresh and path.is_file():
        try:
            cached = json.loads(path.read_text())
            if cached.get("fingerprint") == fingerprint:
                return cached["catalog"]
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache: rebuild
    catalog = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "catalog": catalog}))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs speed
    return catalog
