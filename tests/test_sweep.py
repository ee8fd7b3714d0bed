"""Samplers under rnnbench's ask-and-tell loop: fresh points per trial, grids that end cleanly, a
QMC start-up that covers each range and proposes the same points to every study (and on resume),
and a pruner that waits for a third of a trial's validations."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest

from rnnbench.errors import ConfigError
from rnnbench.experiment import parse
from rnnbench.ledger import create_study
from rnnbench.plan import open_stores, prepare
from rnnbench.scheduler import claimed, owner_identity
from rnnbench.sweep import design_seed, make_pruner, make_sampler, suggest, trial_budget

TEXT = """\
name: s
cells: [gru]
tasks: [memory]
search:
{search}
budget: {{trials: {trials}, epochs: 1}}
sampler: {{name: {sampler}, seed: 0}}
"""
# the reference study's space (experiments/reference-cpu.yaml)
LR_DROPOUT = """\
  lr: {type: float, low: 2.0e-3, high: 2.0e-2, log: true}
  dropout: {type: float, low: 0.0, high: 0.3}"""


def _tell_all(
    tmp_path: Path, search: str, sampler: str, trials: int = 4, cells: str = "[gru]"
) -> list[list[dict]]:
    """Every study's proposals, claimed through the worker as a run does (a sampler rebuilt per ask)."""
    text = TEXT.format(search=search, sampler=sampler, trials=trials).replace("[gru]", cells)
    experiment = parse(text)
    plan = prepare(experiment, home=tmp_path)
    stores = open_stores(plan)
    _, storage, lock = stores
    studies = []
    for study in plan.studies:
        create_study(plan, stores[1], study)
        proposed = []
        while True:
            with claimed(storage, lock, study, "search", owner_identity()) as claim:
                pass
            led, trial = claim.ledger, claim.trial
            if trial is None:
                break
            params = suggest(trial, experiment)
            proposed.append(params)
            led.search.tell(trial, float(len(proposed)))  # the grid's last tell used to raise (Study.stop)
        assert len(proposed) == trial_budget(experiment)
        studies.append(proposed)
    return studies if len(studies) > 1 else studies[0]


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_every_trial_gets_a_new_configuration(tmp_path: Path, sampler: str):
    proposed = _tell_all(tmp_path, "  lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}", sampler)
    assert len({p["lr"] for p in proposed}) == 4


def test_grid_visits_each_point_once_and_stops(tmp_path: Path):
    proposed = _tell_all(tmp_path, "  lr: {type: categorical, choices: [0.001, 0.01, 0.1]}", "grid")
    assert sorted(p["lr"] for p in proposed) == [0.001, 0.01, 0.1]  # budget 4 capped at 3 points


def _span(values: list[float], low: float, high: float, log: bool) -> float:
    f = math.log if log else float
    return (f(max(values)) - f(min(values))) / (f(high) - f(low))


def test_six_trials_span_the_range_and_every_study_proposes_the_same_points(tmp_path: Path):
    """The reference study's budget and space: 6 trials under the default sampler (tpe with a qmc
    start-up) reach 80% of each range, and both architectures are proposed the same points."""
    gru, lstm = _tell_all(tmp_path, LR_DROPOUT, "tpe", trials=6, cells="[gru, lstm]")
    assert gru == lstm  # paired: one design for every architecture
    assert _span([p["lr"] for p in gru], 2e-3, 2e-2, log=True) >= 0.8
    assert _span([p["dropout"] for p in gru], 0.0, 0.3, log=False) >= 0.8


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_the_design_spans_80_percent_for_every_seed(dims: int):
    """Scrambled Sobol alone reaches it for 35 of seeds 0..99 (2 parameters, 6 trials): the
    scramble seed is chosen so that the first 4 points already do, whatever sampler.seed is."""
    from scipy.stats import qmc

    for seed in range(100):
        points = qmc.Sobol(dims, scramble=True, seed=design_seed(seed, dims)).random(4)
        assert (points.max(axis=0) - points.min(axis=0) >= 0.8).all(), seed


def _asks(experiment, storage, name: str, n: int, fail: int | None = None) -> list[optuna.trial.FrozenTrial]:
    """Ask and tell ``n`` trials with a sampler rebuilt per ask (as a worker's claim does); trial
    number ``fail`` dies after its suggestions (lost: recovery queues a copy of it)."""
    study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True)
    for _ in range(n):
        study.sampler = make_sampler(experiment, len(study.trials))
        trial = study.ask()
        suggest(trial, experiment)
        if trial.number == fail:
            storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, float(trial.number))
    return study.trials


def test_a_resumed_study_proposes_what_an_uninterrupted_one_would(tmp_path: Path):
    """Another process (a new storage object on the same journal) goes on where the first left
    off, and a lost trial's copy keeps its configuration without taking a point of the design."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from rnnbench.scheduler import recover

    experiment = parse(TEXT.format(search=LR_DROPOUT, sampler="qmc", trials=6))
    whole = [t.params for t in _asks(experiment, optuna.storages.InMemoryStorage(), "s", 6)]

    def journal():
        return JournalStorage(JournalFileBackend(str(tmp_path / "j.log")))

    _asks(experiment, journal(), "s", 3, fail=2)
    storage = journal()  # a resumed run: a new process reads the ledger
    recover(storage, optuna.load_study(study_name="s", storage=storage))
    trials = _asks(experiment, storage, "s", 4)
    done = [t.params for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert trials[3].params == trials[2].params  # the copy: the lost trial's configuration
    assert done == whole  # the copy finished point 2, then points 3, 4, 5: none skipped or repeated


def test_tpe_takes_over_after_the_startup_trials():
    qmc = parse(TEXT.format(search=LR_DROPOUT, sampler="qmc", trials=5))
    tpe = parse(
        TEXT.format(search=LR_DROPOUT, sampler="tpe", trials=5).replace(
            "seed: 0}", "seed: 0, startup_trials: 3}"
        )
    )
    design = [t.params for t in _asks(qmc, optuna.storages.InMemoryStorage(), "q", 5)]
    tuned = [t.params for t in _asks(tpe, optuna.storages.InMemoryStorage(), "t", 5)]
    assert tuned[:3] == design[:3]
    assert tuned[3] != design[3] and tuned[4] != design[4]
    study = optuna.create_study()
    for _ in range(3):  # the sampler's choice after 3 configurations: TPE
        study.tell(study.ask(), 0.0)
    frozen = study.ask()
    assert isinstance(make_sampler(tpe)._pick(study, study._storage.get_trial(frozen._trial_id)),
                      optuna.samplers.TPESampler)  # fmt: skip


CATEGORICAL = """\
  lr: {type: float, low: 1.0e-3, high: 1.0e-1, log: true}
  batch_size: {type: categorical, choices: [16, 32]}"""


@pytest.mark.parametrize(
    "sampler, message",
    [
        ("qmc", "search.batch_size: the qmc sampler cannot cover a categorical parameter"),
        ("tpe, startup: qmc", "search.batch_size: the qmc start-up cannot cover a categorical parameter"),
    ],
)
def test_qmc_refuses_a_categorical_parameter(sampler: str, message: str):
    with pytest.raises(ConfigError, match=message) as err:
        parse(TEXT.format(search=CATEGORICAL, sampler=sampler, trials=4), "e.yaml")
    assert "\n" not in str(err.value)


def test_a_categorical_falls_back_to_a_random_startup_in_the_file_as_run():
    """Not silently: the experiment as run (MLflow, ledger) says startup: random."""
    from rnnbench.ledger import experiment_yaml

    e = parse(TEXT.format(search=CATEGORICAL, sampler="tpe", trials=4))
    assert e.sampler.startup == "random" and "startup: random" in experiment_yaml(e)
    assert parse(TEXT.format(search=LR_DROPOUT, sampler="tpe", trials=4)).sampler.startup == "qmc"
    # a one-choice categorical is not searched: nothing to cover
    one = "  lr: {type: float, low: 1.0e-3, high: 1.0e-1}\n  batch_size: {type: categorical, choices: [16]}"
    assert parse(TEXT.format(search=one, sampler="qmc", trials=4)).sampler.name == "qmc"


def test_run_refuses_a_qmc_categorical_before_writing_anything(tmp_path: Path):
    from click.testing import CliRunner

    from rnnbench.cli import app

    path = tmp_path / "e.yaml"
    path.write_text(TEXT.format(search=CATEGORICAL, sampler="qmc", trials=4))
    result = CliRunner().invoke(app, ["run", str(path), "--home", str(tmp_path / "home")])
    assert result.exit_code == 2 and "batch_size" in result.output
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize(
    "budget, first",
    [("{epochs: 6}", 2), ("{epochs: 9}", 3), ("{epochs: 30}", 10), ("{max_steps: 1000, eval_every: 100}", 4),
     ("{epochs: 1}", 1)],
)  # fmt: skip
def test_the_pruner_never_stops_a_trial_before_a_third_of_its_validations(budget: str, first: int):
    """Driven directly: two finished trials set a good median, a third reports far worse values
    at validations 1, 2, ...: it is pruned first at the validation that ends a third of its budget."""
    text = TEXT.format(search=LR_DROPOUT, sampler="random", trials=4).replace(
        "budget: {trials: 4, epochs: 1}", f"budget: {budget}"
    )
    experiment = parse(text)
    study = optuna.create_study(pruner=make_pruner(experiment))
    rounds = experiment.budget.validations()
    for _ in range(2):
        trial = study.ask()
        for step in range(1, rounds + 1):
            trial.report(1.0, step)
        study.tell(trial, 1.0)
    trial = study.ask()
    prunable = []
    for step in range(1, rounds + 1):
        trial.report(100.0, step)
        prunable.append(trial.should_prune())
    assert prunable.index(True) + 1 == first and first * 3 >= rounds


def test_warmup_epochs_replaces_the_fraction_and_both_are_refused():
    text = TEXT.format(search=LR_DROPOUT, sampler="random", trials=4).replace("epochs: 1}", "epochs: 30}")
    assert make_pruner(parse(text + "pruner: {warmup_epochs: 2}\n"))._n_warmup_steps == 3
    assert make_pruner(parse(text + "pruner: {min_fraction: 0.5}\n"))._n_warmup_steps == 15
    with pytest.raises(ConfigError, match="min_fraction or warmup_epochs, not both"):
        parse(text + "pruner: {min_fraction: 0.5, warmup_epochs: 2}\n")
    with pytest.raises(ConfigError, match="eval_every without max_steps"):
        parse(text.replace("epochs: 30}", "epochs: 3, eval_every: 10}"))


def test_pruned_trials_count_toward_the_budget():
    from rnnbench.sweep import COUNTED

    assert "pruned" in COUNTED


def test_studies_run_under_the_old_defaults_are_not_resumed(tmp_path: Path):
    """The defaults changed what a search proposes and prunes: a study stored with the old ones
    (tpe with a random start-up; pruning from the 2nd validation) is refused, naming both keys."""
    import hashlib
    import json

    from rnnbench.ledger import FINGERPRINT_ATTR, check_fingerprint, fingerprint_parts

    plan = prepare(parse(TEXT.format(search=LR_DROPOUT, sampler="tpe", trials=4)), home=tmp_path)
    parts = fingerprint_parts(plan, plan.studies[0])

    def digest(value) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]

    old = {
        **parts,
        "sampler": digest({"name": "tpe", "seed": 0}),
        "pruner": digest({"name": "median", "warmup_epochs": 1}),
    }
    assert old != parts
    with pytest.raises(ConfigError, match="a different sampler, pruner"):
        check_fingerprint(plan.studies[0], {FINGERPRINT_ATTR: old}, parts)


@pytest.mark.parametrize(
    "extra",
    ["", "sampler: {name: random}", "sampler: {name: qmc}", "sampler: {startup_trials: 3, startup: random}",
     "pruner: {warmup_epochs: 2}", "pruner: {name: hyperband, min_fraction: 0.5}"],
)  # fmt: skip
def test_the_experiment_as_run_parses_to_the_same_sampler_and_pruner(extra: str):
    """MLflow and the ledger keep the file with every default written out (startup resolved):
    it must parse again, to the same thing."""
    from rnnbench.ledger import experiment_yaml

    e = parse(
        TEXT.format(search=LR_DROPOUT, sampler="tpe", trials=4).replace(
            "sampler: {name: tpe, seed: 0}\n", extra + "\n"
        )
    )
    again = parse(experiment_yaml(e))
    assert (again.sampler, again.pruner) == (e.sampler, e.pruner)
