"""What a study measures: parameter budgets per trial, final seeds apart from the search seed,
pruner warm-up, the fingerprint that guards a resume, fixed configurations, thread counts."""

from __future__ import annotations

from pathlib import Path

import pytest

from rnnbench.experiment import parse
from rnnbench.ledger import FINAL_SEED_BASE, create_study, final_seeds
from rnnbench.plan import open_stores, prepare
from rnnbench.scheduler import claimed, owner_identity
from rnnbench.sizing import count_parameters
from rnnbench.trial import HiddenSizes
from tests.helpers import run_cli

BASE = """\
name: {name}
cells: [gru]
tasks:
  - name: sentiment
    dataset: synthetic
{extra}
budget: {{trials: {trials}, epochs: 1, steps_per_epoch: 3}}
final: {{seeds: {seeds}}}
pruner: {{name: none}}
"""


def _experiment(name="p", extra="", trials=2, seeds=1):
    return parse(BASE.format(name=name, extra=extra, trials=trials, seeds=seeds))


def test_parameter_budget_is_solved_per_trial_with_its_searched_sizes(tmp_path: Path):
    e = _experiment(extra="search:\n  embedding_dim: {type: int, low: 8, high: 128}\nparameter_budget: 20000")
    plan = prepare(e, home=tmp_path)
    study = plan.studies[0]
    task = study.make_task()
    task.setup()
    counts = {}
    for embedding in (8, 128):
        hp = HiddenSizes().hparams(study, task, {"embedding_dim": embedding})
        total = count_parameters(task, study, hp["hidden_size"], hp)
        over = count_parameters(task, study, hp["hidden_size"] + 1, hp)
        assert total <= 20_000 < over  # within the budget, and as close as a hidden size allows
        counts[embedding] = (hp["hidden_size"], total)
    assert counts[8][0] > counts[128][0]  # a larger embedding leaves a smaller recurrent layer
    print(f"\nparameter_budget 20,000, gru on synthetic sentiment: {counts}")


def test_a_task_budget_overrides_the_experiments_for_that_task_only(tmp_path: Path):
    e = parse(
        "name: tb\ncells: [gru]\nparameter_budget: 20000\n"
        "tasks:\n  - {name: sentiment, dataset: synthetic, parameter_budget: 8000}\n"
        "  - {name: memory, options: {problem: adding, seq_len: 10}}\n"
    )
    plan = prepare(e, home=tmp_path)
    for study, budget in zip(plan.studies, (8_000, 20_000)):
        assert study.parameter_budget == budget
        task = study.make_task()
        task.setup()
        hp = HiddenSizes().hparams(study, task, {})
        assert (
            count_parameters(task, study, hp["hidden_size"], hp)
            <= budget
            < count_parameters(task, study, hp["hidden_size"] + 1, hp)
        )


def test_a_task_budget_sets_that_tasks_trials_and_steps(tmp_path: Path):
    path = tmp_path / "tb.yaml"
    path.write_text(
        "name: tbud\ncells: [gru]\nsearch: {lr: {type: float, low: 0.001, high: 0.01}}\n"
        "fixed: {hidden_size: 8}\nbudget: {trials: 2, epochs: 1, steps_per_epoch: 3}\nfinal: {seeds: 1}\n"
        "tasks:\n  - {name: sentiment, dataset: synthetic}\n"
        "  - name: memory\n    options: {problem: adding, seq_len: 6}\n"
        "    budget: {trials: 1, epochs: 2, steps_per_epoch: 5}\n"
    )
    result = run_cli(["run", str(path)], tmp_path / "home")
    assert result.returncode == 0, result.stderr
    from rnnbench.ledger import StudyLedger
    from rnnbench.sweep import open_storage, record_of

    storage = open_storage(str(tmp_path / "home" / "optuna.journal"), tmp_path / "home")
    for name, trials, steps in (
        ("tbud/sentiment-synthetic/gru-1L-uni", 2, 3),
        ("tbud/memory-synthetic/gru-1L-uni", 1, 10),
    ):
        led = StudyLedger.load(storage, name)
        assert len(led.search_trials) == trials, name
        for t in [*led.search_trials, *led.final_trials]:
            assert record_of(t)["summary"]["steps"] == steps, name


def test_parameter_budget_reaches_every_trial_of_a_run(tmp_path: Path):
    path = tmp_path / "pb.yaml"
    path.write_text(
        BASE.format(
            name="pb",
            extra="search:\n  embedding_dim: {type: int, low: 8, high: 128}\nparameter_budget: 20000",
            trials=3,
            seeds=1,
        )
    )
    result = run_cli(["run", str(path)], tmp_path / "home")
    assert result.returncode == 0, result.stderr
    from rnnbench.ledger import StudyLedger
    from rnnbench.sweep import open_storage, record_of, study_names

    storage = open_storage(None, tmp_path / "home")
    led = StudyLedger.load(storage, study_names(storage, "pb")[0])
    for t in led.search_trials + led.final_trials:
        summary = record_of(t)["summary"]
        assert summary["params_target"] == 20_000 and summary["params_total"] <= 20_000


def test_final_seeds_never_replay_the_search_seed():
    assert final_seeds(_experiment(seeds=3)) == [FINAL_SEED_BASE, FINAL_SEED_BASE + 1, FINAL_SEED_BASE + 2]
    e = parse(BASE.format(name="s", extra="sampler: {seed: 10000}", trials=1, seeds=2))
    assert e.sampler.seed not in final_seeds(e) and len(final_seeds(e)) == 2


@pytest.mark.parametrize("warmup, first_prunable_epoch", [(0, 1), (1, 2), (2, 3)])
def test_warmup_epochs_are_never_pruned(warmup: int, first_prunable_epoch: int, tmp_path: Path):
    """Through the worker's own claim: the trial it trains must carry the experiment's pruner
    (a loaded Optuna study has the default one: 5 start-up trials, no warm-up)."""
    extra = f"search: {{lr: {{type: float, low: 0.001, high: 0.01}}}}\npruner: {{name: median, warmup_epochs: {warmup}}}"
    text = BASE.format(name="w", extra=extra, trials=3, seeds=0)
    plan = prepare(parse(text.replace("pruner: {name: none}\n", "")), home=tmp_path)
    stores = open_stores(plan)
    create_study(plan, stores[1], plan.studies[0])
    _, storage, lock = stores

    def claim():
        with claimed(storage, lock, plan.studies[0], "search", owner_identity()) as c:
            return c.trial

    for _ in range(2):  # two good finished trials (accuracy 0.9): the median to beat
        t = claim()
        for epoch in (1, 2, 3):
            t.report(0.9, epoch)
        t.study.tell(t, 0.9)
    bad = claim()
    pruned_at = None
    for epoch in (1, 2, 3):
        bad.report(0.1, epoch)
        if bad.should_prune():
            pruned_at = epoch
            break
    assert pruned_at == first_prunable_epoch


def test_a_resume_names_what_changed_and_final_seeds_may_grow(tmp_path: Path):
    def create(text: str, **kwargs):
        plan = prepare(parse(text), home=tmp_path, **kwargs)
        _, storage, _ = open_stores(plan)
        return create_study(plan, storage, plan.studies[0])

    text = BASE.format(
        name="f", extra="search:\n  lr: {type: float, low: 0.001, high: 0.01}", trials=2, seeds=1
    )
    create(text)
    create(text.replace("seeds: 1", "seeds: 3"))  # more seeds: fine
    from rnnbench.errors import ConfigError

    with pytest.raises(ConfigError, match="final.seeds can grow"):
        create(text.replace("seeds: 1", "seeds: 2").replace("seeds: 2", "seeds: 1"))
    for change, key in (
        ("final: {seeds: 3, epochs: 4}", "final.epochs"),
        ("final: {seeds: 3}\nprecision: bf16", "precision"),
        ("final: {seeds: 3}\ndeterministic: true", "deterministic"),
    ):
        with pytest.raises(ConfigError, match=f"different {key}"):
            create(text.replace("final: {seeds: 1}", change))
    with pytest.raises(ConfigError, match="different device"):
        create(text.replace("seeds: 1", "seeds: 3"), device="cuda")
    with pytest.raises(ConfigError, match="different task"):  # a resolved default changed too
        create(text.replace("dataset: synthetic", "dataset: synthetic\n    options: {tokenizer: regex}"))


def test_a_fixed_configuration_goes_straight_to_the_final_seeds(tmp_path: Path):
    path = tmp_path / "fixed.yaml"
    path.write_text(BASE.format(name="fixed", extra="fixed: {hidden_size: 8}", trials=0, seeds=2))
    result = run_cli(["run", str(path), "--threads", "1"], tmp_path / "home")
    assert result.returncode == 0, result.stderr
    from mlflow.tracking import MlflowClient

    from rnnbench.ledger import StudyLedger
    from rnnbench.sweep import open_storage, record_of, study_names
    from rnnbench.tracking import tracking_uri_for

    storage = open_storage(None, tmp_path / "home")
    led = StudyLedger.load(storage, study_names(storage, "fixed")[0])
    assert led.search_trials == [] and len(led.final_trials) == 2
    valid = [record_of(t)["best_valid"]["accuracy"] for t in led.final_trials]
    client = MlflowClient(tracking_uri_for(tmp_path / "home"))
    runs = client.search_runs([client.get_experiment_by_name("fixed").experiment_id])
    parent = next(r for r in runs if r.data.tags["rnnbench.stage"] == "study")
    assert parent.data.metrics["best_valid"] == pytest.approx(sum(valid) / 2)  # from the seeds
    assert parent.data.tags["rnnbench.status"] == "complete"
    assert f"{sum(valid) / 2:.4g}" in result.stdout  # the CLI's best valid column
    children = [r for r in runs if r.data.tags["rnnbench.stage"] == "final"]
    assert {r.data.tags["rnnbench.threads"] for r in children} == {"1"}  # --threads
    assert {r.data.params["hidden_size"] for r in children} == {"8"}
