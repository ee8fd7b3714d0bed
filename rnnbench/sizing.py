"""Model size: the parameters of the model a trial trains, and the hidden size a parameter budget
allows (so every architecture of a task is compared at the same size)."""

from __future__ import annotations

from typing import Any

from rnnbench.errors import ConfigError
from rnnbench.experiment import Experiment, Study
from rnnbench.trainer import build_model


def search_corners(e: Experiment) -> list[dict[str, Any]]:
    """Searched numeric hyperparameters all at their low, then all at their high end."""
    low, high = {}, {}
    for name, p in e.search.items():
        if name == "hidden_size":
            continue
        if p.type == "categorical":
            numeric = [c for c in p.choices if isinstance(c, (int, float)) and not isinstance(c, bool)]
            if numeric:
                low[name], high[name] = min(numeric), max(numeric)
            else:
                low[name] = high[name] = p.choices[0]
        else:
            low[name], high[name] = p.low, p.high
    return [low, high]


def hidden_range(e: Experiment) -> list[int]:
    spec = e.search.get("hidden_size")
    if spec is None:
        return [int(e.fixed.get("hidden_size", 64))]
    if spec.type == "categorical":
        return [min(spec.choices), max(spec.choices)]
    return [int(spec.low), int(spec.high)]


def count_parameters(task, study: Study, hidden: int, hparams: dict[str, Any] | None = None) -> int:
    """Parameters of the whole model a trial with these hyperparameters trains."""
    model = build_model(task, study.arch, {**study.fixed_hparams, **(hparams or {}), "hidden_size": hidden})
    return sum(p.numel() for p in model.parameters())


def solve_hidden_size(task, study: Study, target: int, hparams: dict[str, Any] | None = None) -> int:
    """Largest hidden size whose whole model, with *these* hyperparameters (a searched embedding
    size counts too), stays within ``target`` parameters: fair comparisons at equal size."""
    low, high = 1, 4096
    if count_parameters(task, study, low, hparams) > target:
        raise ConfigError(
            f"{study.name}: parameter_budget {target:,} is below the smallest model of this architecture"
            + (f" with {hparams}" if hparams else "")
        )
    while low < high:
        mid = (low + high + 1) // 2
        if count_parameters(task, study, mid, hparams) <= target:
            low = mid
        else:
            high = mid - 1
    return low
