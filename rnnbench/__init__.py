"""rnnbench: benchmark recurrent architectures honestly.

Public API for plugin authors: ``hookimpl``, ``Cell``, ``Task`` and ``Metric``.
``Cell``/``Task`` import torch, so they load lazily: ``rnnbench --help`` stays fast.
"""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("rnnbench")

__all__ = ["Cell", "Metric", "Task", "__version__", "hookimpl"]


def __getattr__(name: str):
    if name == "Cell":
        from rnnbench.cells.base import Cell

        return Cell
    if name in ("Task", "Metric"):
        from rnnbench import task

        return getattr(task, name)
    raise AttributeError(f"module 'rnnbench' has no attribute {name!r}")
