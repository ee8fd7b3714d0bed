"""Samplers under rnnbench's ask-and-tell loop: fresh points per trial, grids that end cleanly."""

from __future__ import annotations

from pathlib import Path

import pytest

from rnnbench.experiment import expand, parse
from rnnbench.sweep import Sweep, open_storage, suggest, trial_budget

TEXT = """\
name: s
cells: [gru]
tasks: [memory]
search:
{search}
budget: {{trials: 4, epochs: 1}}
sampler: {{name: {sampler}, seed: 0}}
"""


def _tell_all(tmp_path: Path, search: str, sampler: str) -> list[dict]:
    experiment = parse(TEXT.format(search=search, sampler=sampler))
    study = expand(experiment)[0][0]
    sweep = Sweep(experiment, open_storage(None, tmp_path), tmp_path)
    s = sweep.search_study(study, "minimize")
    proposed = []
    while (trial := sweep.claim_search_trial(study, s)) is not None:
        params = suggest(trial, experiment)
        proposed.append(params)
        s.tell(trial, float(len(proposed)))  # the grid's last tell used to raise (Study.stop)
        s = sweep.search_study(study, "minimize")  # a rebuilt study, as each worker step does
    assert len(proposed) == trial_budget(experiment)
    return proposed


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_every_trial_gets_a_new_configuration(tmp_path: Path, sampler: str):
    proposed = _tell_all(tmp_path, "  lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}", sampler)
    assert len({p["lr"] for p in proposed}) == 4


def test_grid_visits_each_point_once_and_stops(tmp_path: Path):
    proposed = _tell_all(tmp_path, "  lr: {type: categorical, choices: [0.001, 0.01, 0.1]}", "grid")
    assert sorted(p["lr"] for p in proposed) == [0.001, 0.01, 0.1]  # budget 4 capped at 3 points
