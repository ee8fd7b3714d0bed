"""`rnnbench run FILE key=value ...`: overrides change the document before validation, errors name
the override, and the experiment as run (overrides included) is what a resume is checked against."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from rnnbench.cli import app
from rnnbench.errors import ConfigError
from rnnbench.experiment import apply_overrides, load, parse, parse_mapping, parse_override

TINY = """\
name: over
cells: [gru]
tasks:
  - memory
search:
  hidden_size: {type: int, low: 4, high: 8}
budget: {trials: 2, epochs: 1}
"""


def _file(tmp_path: Path, text: str = TINY) -> Path:
    path = tmp_path / "over.yaml"
    path.write_text(text)
    return path


def test_values_are_read_as_yaml():
    assert parse_override("budget.trials=3") == (("budget", "trials"), 3)
    assert parse_override("cells=[lstm,gru]") == (("cells",), ["lstm", "gru"])
    assert parse_override("fixed.lr=1.0e-3") == (("fixed", "lr"), 1.0e-3)
    assert parse_override("tasks.0.options.seq_len=32") == (("tasks", 0, "options", "seq_len"), 32)
    assert parse_override("device=cpu") == (("device",), "cpu")
    assert parse_override("parameter_budget=null") == (("parameter_budget",), None)
    assert parse_override("name=a=b") == (("name",), "a=b")  # the first '=' splits


def test_overrides_apply_before_validation():
    e = parse(TINY, "x.yaml", ["budget.trials=3", "final.seeds=5", "cells=[lstm,gru]", "device=cpu"])
    assert (e.budget.trials, e.budget.epochs, e.final.seeds, e.device) == (3, 1, 5, "cpu")
    assert [c.name for c in e.cells] == ["lstm", "gru"]
    # a bare task name is walked into as {name: memory}; missing mappings are created
    e = parse(TINY, "x.yaml", ["tasks.0.options.seq_len=32", "sampler.seed=7", "fixed.lr=0.01"])
    assert e.tasks[0].name == "memory" and e.tasks[0].options == {"seq_len": 32}
    assert e.sampler.seed == 7 and e.fixed == {"lr": 0.01}
    assert parse(TINY, "x.yaml", ["budget.trials=3", "budget.trials=4"]).budget.trials == 4  # the last wins


def test_an_override_of_an_alias_changes_that_place_only():
    text = TINY.replace("budget: {trials: 2, epochs: 1}", "budget: &b {trials: 2, epochs: 1}\n") + (
        "tasks:\n  - name: memory\n    budget: *b\n"
    )
    text = text.replace("tasks:\n  - memory\n", "", 1)
    e = parse(text, "x.yaml", ["budget.trials=5"])
    assert e.budget.trials == 5 and e.tasks[0].budget.trials == 2


def test_the_mapping_is_not_changed_in_place():
    data = {"name": "x", "budget": {"trials": 2}}
    out = apply_overrides(data, ["budget.trials=3"])
    assert data["budget"]["trials"] == 2 and out["budget"]["trials"] == 3


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "budget.trails=3",
            "over.yaml (from the override `budget.trails=3`): budget.trails: unknown key 'trails'; "
            "did you mean 'trials'?",
        ),
        (
            "budgett.trials=3",
            "(from the override `budgett.trials=3`): budgett: unknown key 'budgett'; did you mean",
        ),
        (
            "budget.trials=-1",
            "(from the override `budget.trials=-1`): budget.trials: Input should be greater",
        ),
        (
            "cells=[lstmm]",
            "(from the override `cells=[lstmm]`): cells[0]: unknown cell 'lstmm'; did you mean 'lstm'?",
        ),
        (
            "fixed.lrr=0.1",
            "(from the override `fixed.lrr=0.1`): fixed.lrr: unknown hyperparameter 'lrr'; did you",
        ),
        (
            "tasks.0.options.seq_lenn=3",
            "(from the override `tasks.0.options.seq_lenn=3`): tasks[0].options.seq_lenn",
        ),
        ("tasks.3.seq_len=3", "override `tasks.3.seq_len=3`: tasks has 1 entry; index 3 is out of range"),
        ("tasks.x=1", "override `tasks.x=1`: tasks is a list: index it by number (tasks.0)"),
        ("budget.trials.x=3", "override `budget.trials.x=3`: budget.trials is 2, not a mapping"),
        ("trials", "override `trials`: an override is key=value"),
        ("a..b=1", "override `a..b=1`: 'a..b' is not a key path"),
        ("cells=[lstm", "override `cells=[lstm` line 1: not valid YAML"),
        ("fixed.x=&a [*a]", "a YAML alias refers to its own parent"),
    ],
)
def test_a_bad_override_is_one_line_naming_it(tmp_path: Path, override: str, expected: str):
    with pytest.raises(ConfigError) as err:
        load(_file(tmp_path), [override])
    message = str(err.value)
    assert expected in message and "\n" not in message
    if "(from the override" in expected:  # the file's own line numbers are not blamed
        assert "(line" not in message


def test_errors_in_the_file_still_name_its_line():
    with pytest.raises(ConfigError, match=r"x.yaml \(line 7\): budget.trials"):
        parse(TINY.replace("trials: 2", "trials: -2"), "x.yaml", ["final.seeds=2"])


def test_a_mapping_is_validated_as_a_file_is():
    data = {"name": "m", "cells": ["gru"], "tasks": ["memory"], "fixed": {"hidden_size": 4}}
    assert parse_mapping(data, overrides=["budget.trials=1"]).budget.trials == 1
    with pytest.raises(ConfigError, match=r"<mapping> \(from the override `budget.trails=1`\)"):
        parse_mapping(data, overrides=["budget.trails=1"])
    with pytest.raises(ConfigError, match=r"^<mapping>: budget.trials: Input should be"):
        parse_mapping({**data, "budget": {"trials": -1}})


def test_the_cli_refuses_a_bad_override_in_one_line_and_writes_nothing(tmp_path: Path):
    home = tmp_path / "home"
    result = CliRunner().invoke(app, ["run", str(_file(tmp_path)), "budget.trails=3", "--home", str(home)])
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        f"error: {tmp_path / 'over.yaml'} (from the override `budget.trails=3`): budget.trails: unknown key "
        "'trails'; did you mean 'trials'? (known: trials, epochs, max_steps, eval_every, steps_per_epoch, "
        "max_minutes_per_trial, patience, min_improvement)"
    ]
    assert not home.exists()


def test_dry_run_applies_the_overrides(tmp_path: Path):
    path = _file(tmp_path)
    home = tmp_path / "home"
    result = CliRunner().invoke(
        app, ["run", "--dry-run", str(path), "budget.trials=3", "final.seeds=4", "cells=[lstm]", "--home", str(home)]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "over/memory-synthetic/lstm-1L-uni" not in result.output  # the table names the study short
    assert "memory-synthetic/lstm-1L-uni" in result.output and "gru-1L" not in result.output
    row = next(line for line in result.output.splitlines() if "lstm-1L-uni" in line)
    assert "│ 3 " in row and "│ 4 " in row
    assert not home.exists()


def test_the_experiment_as_run_holds_the_overrides(tmp_path: Path):
    """The fingerprint and the stored experiment.yaml come from the experiment as validated, so an
    override is part of both: a resume with other overrides is refused as a changed file is."""
    import yaml

    from rnnbench import ledger, runner

    path = _file(tmp_path)
    plain = runner.prepare(load(path), home=tmp_path / "home")
    same = runner.prepare(load(path, ["budget.trials=2"]), home=tmp_path / "home")
    other = runner.prepare(load(path, ["budget.trials=3", "fixed.lr=0.01"]), home=tmp_path / "home")

    def parts(plan):
        return ledger.fingerprint_parts(plan, plan.studies[0])

    assert parts(plain) == parts(same)
    changed = {k for k in parts(plain) if parts(plain)[k] != parts(other)[k]}
    assert changed == {"budget", "fixed"}
    stored = yaml.safe_load(ledger.experiment_yaml(other.experiment))
    assert stored["budget"]["trials"] == 3 and stored["fixed"] == {"lr": 0.01}
    assert parse(ledger.experiment_yaml(other.experiment)).model_dump() == other.experiment.model_dump()
    assert not (tmp_path / "home").exists()  # prepare opens no store
