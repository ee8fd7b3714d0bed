"""Samplers under rnnbench's ask-and-tell loop: fresh points per trial, grids that end cleanly."""

from __future__ import annotations

from pathlib import Path

import pytest

from rnnbench.experiment import parse
from rnnbench.runner import Worker, create_study, open_stores, prepare
from rnnbench.sweep import suggest, trial_budget

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
    plan = prepare(experiment, home=tmp_path)
    study = plan.studies[0]
    stores = open_stores(plan)
    create_study(plan, stores[1], study)
    worker = Worker(plan, 0, {"device": "cpu"}, stores=stores)
    proposed = []
    while (claim := worker._claim(study, "search"))[1] is not None:
        led, trial = claim
        worker._lease.stop()
        params = suggest(trial, experiment)
        proposed.append(params)
        led.search.tell(trial, float(len(proposed)))  # the grid's last tell used to raise (Study.stop)
    assert len(proposed) == trial_budget(experiment)
    return proposed


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_every_trial_gets_a_new_configuration(tmp_path: Path, sampler: str):
    proposed = _tell_all(tmp_path, "  lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}", sampler)
    assert len({p["lr"] for p in proposed}) == 4


def test_grid_visits_each_point_once_and_stops(tmp_path: Path):
    proposed = _tell_all(tmp_path, "  lr: {type: categorical, choices: [0.001, 0.01, 0.1]}", "grid")
    assert sorted(p["lr"] for p in proposed) == [0.001, 0.01, 0.1]  # budget 4 capped at 3 points
