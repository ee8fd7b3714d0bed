"""rnnbench: benchmark recurrent architectures honestly.

Public API for plugin authors: ``hookimpl``, ``Cell``, ``Task`` and ``Metric``; for scripts and
notebooks: ``run``, ``load_results`` and ``Results`` (see rnnbench.api).
Everything but ``hookimpl`` loads lazily (torch, pandas, optuna): ``rnnbench --help`` stays fast.
"""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("rnnbench")

__all__ = ["Cell", "Metric", "Results", "Task", "__version__", "hookimpl", "load_results", "run"]
_API = ("run", "load_results", "Results", "load_experiment")


def __getattr__(name: str):
    if name == "Cell":
        from rnnbench.cells.base import Cell

        return Cell
    if name in ("Task", "Metric"):
        from rnnbench import task

        return getattr(task, name)
    if name in _API:
        from rnnbench import api

        return getattr(api, name)
    raise AttributeError(f"module 'rnnbench' has no attribute {name!r}")
