"""Every searched hyperparameter must act: the pre-flight refuses a knob that changes nothing.

A knob that reaches neither the model nor the optimizer still gets trials, and the importance table
credits it with whatever noise the trials had (the reference study's 1-layer ETTh1 forecasters gave
a dropout they never applied 19-61% of the variance). Dropout now acts in every builtin task's
model, and weight decay is a searchable knob of the optimizer.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn

from rnnbench.errors import ConfigError
from rnnbench.experiment import expand, parse
from rnnbench.preflight import ACTING_KNOBS, MODEL_KNOBS, OPTIMIZER_KNOBS, check_experiment
from rnnbench.tasks.forecast import ForecastTask
from tests.test_plugins import FakeDistribution, FakeEntryPoint, plugin_module

REFERENCE = Path(__file__).resolve().parents[1] / "experiments" / "reference-cpu.yaml"
BUILTIN_CELLS = ("rnn", "lstm", "peephole", "gru")
SMALL_FORECAST = {"input_width": 12, "label_width": 4}


def preflight(text: str):
    experiment = parse(text)
    return check_experiment(experiment, expand(experiment)[0])


class OldForecastModel(nn.Module):
    """The forecaster before the dropout fix: encoder -> last output -> head, no dropout of its own."""

    def __init__(self, encoder: nn.Module, label_width: int, n_targets: int):
        super().__init__()
        self.encoder, self.label_width, self.n_targets = encoder, label_width, n_targets
        self.head = nn.Linear(encoder.output_size, label_width * n_targets)

    def forward(self, inputs):
        outputs, _ = self.encoder(inputs)
        return self.head(outputs[:, -1]).view(-1, self.label_width, self.n_targets)


class OldForecast(ForecastTask):
    """Forecasting with the model the reference study searched dropout on."""

    name = "oldforecast"

    def build_model(self, make_encoder, hparams):
        return OldForecastModel(make_encoder(self.n_inputs), self.window.label_width, self.n_targets)


@pytest.fixture
def old_forecast_plugin(monkeypatch):
    """``oldforecast`` installed as a third-party plugin (an entry point of group rnnbench)."""
    import importlib.metadata

    from rnnbench.plugins import DISABLE_ENV, ENTRY_POINT_GROUP, registry

    monkeypatch.delenv(DISABLE_ENV, raising=False)
    plugin_module(monkeypatch, "old_forecast_plugin", rnnbench_tasks=lambda: {"oldforecast": OldForecast})
    real = importlib.metadata.entry_points
    ours = [FakeEntryPoint("oldforecast", "old_forecast_plugin", FakeDistribution("rnnbench-old", "1.0"))]

    def entry_points(**selection):
        return ours if selection.get("group") == ENTRY_POINT_GROUP else real(**selection)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    registry.cache_clear()
    yield
    registry.cache_clear()  # the next test loads what is really installed


def reference_search(task: str, layers: int, **more) -> str:
    """The committed reference study's search and fixed values, on one GRU and a synthetic task."""
    reference = yaml.safe_load(REFERENCE.read_text())
    return yaml.safe_dump(
        {
            "name": "knobs",
            "cells": [
                {"name": "gru", "layers": [layers], "bidirectional": more.pop("bidirectional", [False])}
            ],
            "tasks": [{"name": task, "options": SMALL_FORECAST}],
            "search": reference["search"],
            "fixed": reference["fixed"],
            **more,
        }
    )


def test_every_trainer_hyperparameter_is_known_to_the_knob_check():
    from rnnbench.hparams import TRAINER_HPARAMS

    classified = {*MODEL_KNOBS, *OPTIMIZER_KNOBS, *ACTING_KNOBS}
    assert set(TRAINER_HPARAMS) <= classified, "add a new trainer knob to one of preflight's lists"


def test_reference_search_is_refused_on_the_old_one_layer_forecaster(old_forecast_plugin):
    assert set(yaml.safe_load(REFERENCE.read_text())["search"]) == {"lr", "dropout"}
    with pytest.raises(ConfigError) as refused:
        preflight(reference_search("oldforecast", layers=1))
    message = str(refused.value)
    assert message.startswith(
        "searched 'dropout' changes nothing in gru-1L-uni on oldforecast-synthetic: dropout 0.0 and 0.3 "
        "give the same training loss; search it with layers >= 2"
    )
    assert "\n" not in message and "'lr'" not in message  # one line; lr acts (it is the optimizer's)


def test_reference_search_passes_on_the_old_forecaster_at_two_layers(old_forecast_plugin):
    # the encoder drops between its layers: the same model acts at 2 layers
    assert preflight(reference_search("oldforecast", layers=2)).warnings == []


def test_reference_search_passes_on_the_builtin_one_layer_forecaster():
    assert preflight(reference_search("forecast", layers=1)).warnings == []


def test_skip_invalid_warns_once_for_every_architecture_instead(old_forecast_plugin):
    text = reference_search("oldforecast", layers=1, bidirectional=[False, True], skip_invalid=True)
    summary = preflight(text)
    assert summary.warnings == [
        "searched 'dropout' changes nothing in gru-1L-uni, gru-1L-bi on oldforecast-synthetic: dropout 0.0 "
        "and 0.3 give the same training loss; search it with layers >= 2 (the encoder drops only between "
        "layers; this task's model applies none of its own), or fix it"
    ]
    assert summary.line().splitlines()[1] == f"warning: {summary.warnings[0]}"


MEMORY = "tasks: [{name: memory, options: {seq_len: 5, train_size: 64, valid_size: 16, test_size: 16}}]\n"


def test_momentum_searched_with_adam_is_refused():
    with pytest.raises(ConfigError, match=(
        r"^searched 'momentum' changes nothing in lstm-1L-uni on memory-synthetic: momentum 0.5 and 0.99 "
        r"give the same optimizer; search it with optimizer sgd or rmsprop"
    )):  # fmt: skip
        preflight(
            "name: m\ncells: [lstm]\n" + MEMORY + "fixed: {optimizer: adam}\n"
            "search: {momentum: {type: float, low: 0.5, high: 0.99}}\n"
        )


def test_momentum_acts_when_the_optimizer_searched_can_read_it():
    summary = preflight(
        "name: m\ncells: [lstm]\n"
        + MEMORY
        + "search: {optimizer: {type: categorical, choices: [adam, sgd]}, "
        "momentum: {type: float, low: 0.5, high: 0.99}}\n"
    )
    assert summary.warnings == []


def test_no_search_no_knob_check():
    # trials: 0 sends the fixed configuration straight to the final seeds: nothing searched is drawn
    summary = preflight(
        "name: m\ncells: [lstm]\n" + MEMORY + "fixed: {optimizer: adam}\nbudget: {trials: 0}\n"
        "search: {momentum: {type: float, low: 0.5, high: 0.99}}\n"
    )
    assert summary.warnings == []


def test_decoupled_weight_decay_is_searchable_and_acts():
    """README: decoupled weight decay is ``optimizer: adamw`` with weight_decay searched."""
    summary = preflight(
        "name: wd\ncells: [gru]\n" + MEMORY + "fixed: {optimizer: adamw}\n"
        "search: {weight_decay: {type: float, low: 1.0e-5, high: 1.0e-1, log: true}}\n"
    )
    assert summary.warnings == []
    from rnnbench.plugins import get_task
    from rnnbench.trainer import Architecture, Trainer

    task = get_task("memory")("synthetic", seq_len=5, train_size=64, valid_size=16, test_size=16)
    weights = []
    for decay in (1e-5, 1e-1):
        result = Trainer({"epochs": 1}).fit(
            task, Architecture("gru"), {"optimizer": "adamw", "weight_decay": decay, "hidden_size": 4}
        )
        weights.append(torch.cat([p.detach().flatten() for p in result.model.parameters()]))
    assert not torch.equal(*weights)


BUILTIN_TASKS = {
    "charlm": "{name: charlm, options: {seq_len: 8}}",
    "sentiment": "{name: sentiment}",
    "ner": "{name: ner}",
    "memory-adding": "{name: memory, options: {problem: adding, seq_len: 5, train_size: 64}}",
    "memory-copy": "{name: memory, label: copy, options: {problem: copy, seq_len: 5, train_size: 64}}",
    "forecast": f"{{name: forecast, options: {SMALL_FORECAST}}}",
}


@pytest.mark.parametrize("task", list(BUILTIN_TASKS))
def test_dropout_and_lr_act_in_every_builtin_task_and_cell_at_one_layer(task):
    summary = preflight(
        f"name: all\ncells: {list(BUILTIN_CELLS)}\ntasks: [{BUILTIN_TASKS[task]}]\n"
        "search: {lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}, "
        "dropout: {type: float, low: 0.0, high: 0.3}}\n"
    )
    assert summary.warnings == [] and summary.models == len(BUILTIN_CELLS)


# memory's inputs are the problem itself: its dropout is on the encoder's outputs only
INPUT_DROPOUT = {"charlm": True, "sentiment": True, "ner": True, "memory": False}
OPTIONS = {"charlm": {"seq_len": 8}, "sentiment": {}, "ner": {}, "memory": {"seq_len": 8, "train_size": 64}}


@pytest.mark.parametrize("name", list(INPUT_DROPOUT))
def test_dropout_acts_on_the_inputs_and_on_the_encoder_outputs(name):
    """What the encoder and the head read, in training mode at dropout 0.5 against eval mode: about
    half the values zeroed and the rest doubled; memory's inputs (the problem itself) untouched."""
    from rnnbench.encoder import Encoder
    from rnnbench.plugins import get_task
    from rnnbench.trainer import Architecture, build_model

    task = get_task(name)("synthetic", **OPTIONS[name])
    task.setup()
    torch.manual_seed(0)
    model = build_model(task, Architecture("lstm"), {"hidden_size": 8, "dropout": 0.5})
    batch = next(iter(task.batches("train", 8, device=torch.device("cpu"), generator=torch.Generator())))
    encoder = next(m for m in model.modules() if isinstance(m, Encoder))
    seen = {}
    encoder.register_forward_pre_hook(lambda _, args: seen.__setitem__("encoder", args[0]))
    model.head.register_forward_pre_hook(lambda _, args: seen.__setitem__("head", args[0]))
    read = {}
    with torch.no_grad():
        for mode in ("eval", "train"):
            getattr(model, mode)()
            task.training_loss(model, batch, None)
            read[mode] = dict(seen)

    def zeros(t):
        return int((t == 0).sum())

    clean, dropped = read["eval"]["encoder"], read["train"]["encoder"]
    if INPUT_DROPOUT[name]:
        kept = dropped != 0
        assert torch.allclose(dropped[kept], 2 * clean[kept])
        assert zeros(dropped) > zeros(clean) + 0.3 * dropped.numel()
    else:
        assert torch.equal(dropped, clean)
    head = read["train"]["head"]
    assert zeros(head) > zeros(read["eval"]["head"]) + 0.3 * head.numel()


def test_run_refuses_an_inert_knob_with_exit_2_and_writes_nothing(tmp_path):
    from rnnbench.cli import app

    (tmp_path / "m.yaml").write_text(
        "name: m\ncells: [lstm]\n" + MEMORY + "fixed: {optimizer: adam}\n"
        "search: {momentum: {type: float, low: 0.5, high: 0.99}}\n"
    )
    home = tmp_path / "home"
    result = CliRunner(env={"RNNBENCH_HOME": str(home)}).invoke(app, ["run", str(tmp_path / "m.yaml")])
    assert result.exit_code == 2, result.output
    assert "searched 'momentum' changes nothing in lstm-1L-uni on memory-synthetic" in result.output
    assert not home.exists()
