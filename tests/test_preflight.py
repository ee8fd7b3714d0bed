"""Pre-flight and `rnnbench check`: every cell and task meets its contract before a run starts.

Cells written the way PyTorch users write modules work; a broken plugin is refused in seconds with
exit code 2, naming its distribution, entry point, class and the rule it broke.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from rnnbench import Cell
from rnnbench.encoder import Encoder
from rnnbench.errors import ConfigError, ContractError
from rnnbench.plugins import Registered
from rnnbench.preflight import check_cell, check_experiment, check_task
from tests.helpers import run_cli


# -- cells written the PyTorch way ----------------------------------------------------------------
class TorchStyleCell(Cell):
    """Elman cell written as a PyTorch user would: super().__init__() bare, own nn.Linear layers."""

    def __init__(self, input_size, hidden_size, alpha=1.0):
        super().__init__()
        self.ih = nn.Linear(input_size, hidden_size)
        self.hh = nn.Linear(hidden_size, hidden_size, bias=False)
        self.alpha = alpha

    def forward(self, x_t, h):
        h = torch.tanh(self.ih(x_t) + self.alpha * self.hh(h))
        return h, h


class NoBaseInitCell(Cell):
    """Skips Cell.__init__ altogether (calls nn.Module's directly)."""

    def __init__(self, input_size, hidden_size):
        nn.Module.__init__(self)
        self.ih = nn.Linear(input_size, hidden_size)
        self.hh = nn.Linear(hidden_size, hidden_size)

    def forward(self, x_t, h):
        h = torch.tanh(self.ih(x_t) + self.hh(h))
        return h, h


class ReadmeStyleCell(Cell):
    """The README's signature: super().__init__(input_size, hidden_size, **hparams)."""

    def __init__(self, input_size, hidden_size, **hparams):
        super().__init__(input_size, hidden_size, **hparams)
        self.weight_ih = nn.Parameter(torch.randn(hidden_size, input_size) * 0.3)
        self.weight_hh = nn.Parameter(torch.randn(hidden_size, hidden_size) * 0.3)

    def project_input(self, x):
        return x @ self.weight_ih.t()

    def forward_projected(self, xp_t, h):
        h = torch.tanh(xp_t + h @ self.weight_hh.t())
        return h, h

    def forward(self, x_t, h):
        return self.forward_projected(self.project_input(x_t), h)


def entry(cls, name="toy") -> Registered:
    return Registered(name, cls, "rnnbench-toy 0.1", f"{name} = toy_plugin")


@pytest.mark.parametrize("cls", [TorchStyleCell, NoBaseInitCell, ReadmeStyleCell])
def test_both_cell_styles_work_end_to_end_through_the_encoder(cls):
    cell = cls(3, 5)
    if cls is not NoBaseInitCell:  # it skips Cell.__init__: only the encoder (build_cell) sets its sizes
        assert (cell.input_size, cell.hidden_size) == (3, 5)
    encoder = Encoder(cls, 3, 5, num_layers=2, bidirectional=True)
    assert [(c.input_size, c.hidden_size) for c in encoder.cells] == [(3, 5), (3, 5), (10, 5), (10, 5)]
    x = torch.randn(4, 6, 3)
    out, finals = encoder(x, torch.tensor([6, 4, 2, 1]))
    assert out.shape == (4, 6, 10) and len(finals) == 4 and torch.all(out[3, 1:] == 0)
    out.sum().backward()
    assert all(p.grad is not None for p in encoder.parameters())
    check_cell(entry(cls))  # and it meets the whole contract


def test_torch_style_hyperparameters_come_from_the_signature():
    assert TorchStyleCell.hparam_names() == ("alpha",)
    encoder = Encoder(TorchStyleCell, 3, 4, alpha=0.5)
    assert encoder.cells[0].alpha == 0.5
    with pytest.raises(ConfigError, match=r"unknown hyperparameter\(s\) \['beta'\]; it accepts \['alpha'\]"):
        Encoder(TorchStyleCell, 3, 4, beta=1)
    assert TorchStyleCell(input_size=2, hidden_size=7).hidden_size == 7


def test_torch_style_cell_trains_through_the_trainer():
    from rnnbench.plugins import get_task
    from rnnbench.trainer import Architecture, Trainer

    task = get_task("memory")(
        "synthetic", problem="adding", seq_len=6, train_size=64, valid_size=32, test_size=32
    )

    import rnnbench.plugins as plugins

    real = plugins.get_cell
    plugins.get_cell = lambda name: TorchStyleCell if name == "torchstyle" else real(name)
    try:
        result = Trainer({"epochs": 1}).fit(
            task, Architecture("torchstyle", 2), {"hidden_size": 4, "alpha": 0.5}
        )
    finally:
        plugins.get_cell = real
    assert result.best_valid["mse"] > 0 and result.parameters["encoder"]["total"] > 0


# -- broken cells: refused, naming the plugin and the rule --------------------------------------------
class WrongWidth(TorchStyleCell):
    def forward(self, x_t, h):
        h, _ = super().forward(x_t, h)
        return torch.cat([h, h[:, :1]], 1), h


class OnlyH(TorchStyleCell):
    def forward(self, x_t, h):
        return super().forward(x_t, h)[0]


class StateChangesShape(TorchStyleCell):
    def forward(self, x_t, h):
        h, _ = super().forward(x_t, h)
        return h, (h, h)


class Float64(TorchStyleCell):
    def forward(self, x_t, h):
        h, _ = super().forward(x_t, h)
        return h.double(), h


class Detached(TorchStyleCell):
    def forward(self, x_t, h):
        h = torch.tanh(self.ih(x_t) + nn.functional.linear(h, self.hh.weight.detach()))
        return h, h


class ProjectionDisagrees(ReadmeStyleCell):
    def forward(self, x_t, h):
        h = torch.tanh(x_t @ self.weight_ih.t() + 2 * h @ self.weight_hh.t())
        return h, h


class Raises(TorchStyleCell):
    def forward(self, x_t, h):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied\nsecond line")


class NoParameters(Cell):
    def forward(self, x_t, h):
        return h, h


class BadSignature(Cell):
    def __init__(self, hidden_size):  # no input_size
        super().__init__(1, hidden_size)


BROKEN = {
    WrongWidth: "must return h_t of shape [batch, hidden] = [2, 4], got [2, 5]",
    OnlyH: "must return (h_t, new_state), got Tensor",
    StateChangesShape: "must have the structure and shapes of the state it got",
    Float64: "h_t in the input's dtype float32, got torch.float64",
    Detached: "parameters ['hh.weight'] get no gradient",
    ProjectionDisagrees: "forward(x_t, state) must equal forward_projected(project_input(x_t), state)",
    Raises: "forward(x_t, state) raised RuntimeError: mat1 and mat2 shapes cannot be multiplied",
    NoParameters: "no trainable parameters",
    BadSignature: "__init__(3, 4) raised TypeError",
}


@pytest.mark.parametrize("cls,rule", BROKEN.items(), ids=[c.__name__ for c in BROKEN])
def test_broken_cell_is_refused_naming_plugin_and_rule(cls, rule):
    with pytest.raises(ContractError) as info:
        check_cell(entry(cls, "broken"))
    message = str(info.value)
    assert rule in message and "\n" not in message and info.value.exit_code == 2
    origin = f"cell 'broken' (rnnbench-toy 0.1, entry point broken = toy_plugin, class {__name__}.{cls.__qualname__})"
    assert message.startswith(f"{origin} breaks the Cell contract: ")


def test_a_cell_refusing_a_value_is_a_config_error():
    class Picky(TorchStyleCell):
        def __init__(self, input_size, hidden_size, alpha=1.0):
            if alpha > 1:
                raise ConfigError(f"alpha must be <= 1, got {alpha}")
            super().__init__(input_size, hidden_size, alpha)

    with pytest.raises(ConfigError, match="cell 'picky': alpha must be <= 1, got 2") as info:
        check_cell(entry(Picky, "picky"), {"alpha": 2})
    assert not isinstance(info.value, ContractError)


# -- tasks --------------------------------------------------------------------------------------------
def memory_variant(**methods):
    from rnnbench.tasks.memory import Memory

    return type("MemoryVariant", (Memory,), {"__doc__": "variant", **methods})


def mean_of_batch_means(self, model, split, batch_size, *, device):
    """The classic bug: the last, shorter batch weighs as much as a full one."""
    means = [
        float(((model(b.inputs) - b.targets) ** 2).mean())
        for b in self.batches(split, batch_size, device=device)
    ]
    return {"mse": sum(means) / len(means)}


def counting_evaluate():
    """An evaluate that scores a different mse each time it is called (a consumed iterator, say)."""
    calls = iter(range(1, 1000))
    return lambda self, *a, **k: {"mse": float(next(calls))}


def raising_evaluate(self, *a, **k):
    raise RuntimeError("index out of range\nsecond line")


BROKEN_TASKS = {
    "evaluate depends on the batch size": (
        {"evaluate": mean_of_batch_means},
        "valid mse depends on the evaluation batch size (",
    ),
    "a metric missing": (
        {"evaluate": lambda self, *a, **k: {"loss": 1.0}},
        "evaluate(model, 'valid', 8) is missing metrics ['mse'] (got ['loss'])",
    ),
    "evaluate twice": (
        {"evaluate": counting_evaluate()},
        "evaluate must give the same scores when called twice (valid mse: ",
    ),
    "evaluate raises": (
        {"evaluate": raising_evaluate},
        "evaluate(model, 'valid', 8) raised RuntimeError: index out of range",
    ),
    "baseline keys": (
        {"baseline": lambda self, split: {"MSE": 0.17}},
        "baseline keys must be metric names (mse)",
    ),
    "loss as a float": (
        {"training_loss": lambda self, model, batch, carry=None: (1.0, None)},
        "training_loss must return a scalar loss tensor",
    ),
    "describe not a dict": ({"describe": lambda self: [1, 2]}, "describe() must return a dict"),
    "describe key MLflow refuses": ({"describe": lambda self: {"a:b": 1}}, "become MLflow param names"),
    "no encoder": (
        {"build_model": lambda self, make_encoder, hp: nn.Linear(2, 1)},
        "build_model must build its encoder with make_encoder(input_size)",
    ),
}


@pytest.mark.parametrize("methods,rule", BROKEN_TASKS.values(), ids=BROKEN_TASKS.keys())
def test_broken_task_is_refused_naming_the_rule(methods, rule):
    cls = memory_variant(**methods)
    with pytest.raises(ContractError, match="breaks the Task contract") as info:
        check_task(Registered("mem", cls, "rnnbench-mem 1.0", "mem = mem_plugin"))
    assert rule in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert "rnnbench-mem 1.0, entry point mem = mem_plugin, class" in str(info.value)


@pytest.mark.parametrize("methods,rule", BROKEN_TASKS.values(), ids=BROKEN_TASKS.keys())
def test_plugin_authors_check_names_the_same_rule(methods, rule):
    # one implementation: rnnbench.testing, at the pre-flight's batch sizes, says what check_task says
    from rnnbench.testing import ContractViolation, check_task_contract

    with pytest.raises(ContractViolation) as info:
        check_task_contract(memory_variant(**methods), batch_sizes=(8, 3), splits=("valid",), train_steps=2)
    assert rule in info.value.rule and str(info.value) == f"task 'memory': {info.value.rule}"


@pytest.mark.parametrize("name", ["memory", "forecast", "ner", "sentiment", "charlm"])
def test_builtin_tasks_meet_the_contract(name):
    from rnnbench.plugins import registry

    check_task(registry().task(name))


# -- the pre-flight of an experiment ----------------------------------------------------------------
def test_preflight_of_the_smoke_experiment_is_quick():
    from rnnbench.experiment import expand, load

    experiment = load(Path(__file__).resolve().parents[1] / "experiments" / "smoke.yaml")
    studies, _ = expand(experiment)
    started = time.perf_counter()
    summary = check_experiment(experiment, studies)
    assert (summary.datasets, summary.models) == (6, len(studies)) == (6, 33)
    assert time.perf_counter() - started < 20  # a few seconds on a 2-core CPU, with room for load


# -- through the command, with a real installed (dist-info) plugin ----------------------------------
BROKEN_PLUGIN = '''
import torch
from torch import nn
from rnnbench import Cell, hookimpl


class HalfWidthCell(Cell):
    """Returns half the hidden width: breaks every trial, until the pre-flight refuses it."""

    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.ih = nn.Linear(input_size, hidden_size // 2)

    def forward(self, x_t, h):
        return torch.tanh(self.ih(x_t)), h


@hookimpl
def rnnbench_cells():
    return {"halfwidth": HalfWidthCell}
'''


TORCH_STYLE_PLUGIN = '''
import torch
from torch import nn
from rnnbench import Cell, hookimpl


class ElmanCell(Cell):
    """Written as a PyTorch user would: bare super().__init__(), own layers, no project_input."""

    def __init__(self, input_size, hidden_size, alpha=1.0):
        super().__init__()
        self.ih = nn.Linear(input_size, hidden_size)
        self.hh = nn.Linear(hidden_size, hidden_size, bias=False)
        self.alpha = alpha

    def forward(self, x_t, h):
        h = torch.tanh(self.ih(x_t) + self.alpha * self.hh(h))
        return h, h


@hookimpl
def rnnbench_cells():
    return {"elman": ElmanCell}
'''


def install_fake(site: Path, dist: str, module: str, source: str, entry_name: str) -> None:
    """What pip leaves behind: a module and a .dist-info with an entry point of group rnnbench."""
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[rnnbench]\n{entry_name} = {module}\n")


def rnnbench(args: list[str], site: Path, home: Path, cwd: Path) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    return run_cli(args, home, cwd=cwd, PYTHONPATH=path, RNNBENCH_CACHE=str(cwd / "cache"))


def test_broken_plugin_refused_by_run_and_named_by_check(tmp_path: Path):
    site, home = tmp_path / "site", tmp_path / "home"
    site.mkdir()
    install_fake(site, "rnnbench-halfwidth", "halfwidth_plugin", BROKEN_PLUGIN, "halfwidth")
    install_fake(
        site, "rnnbench-missing-dep", "missing_dep_plugin", "import not_installed_anywhere\n", "missing"
    )
    install_fake(site, "rnnbench-elman", "elman_plugin", TORCH_STYLE_PLUGIN, "elman")
    (tmp_path / "exp.yaml").write_text(
        "name: hw\ncells: [halfwidth]\ntasks: [{name: memory, options: {seq_len: 5, train_size: 64}}]\n"
        "budget: {trials: 3, epochs: 1}\nfinal: {seeds: 0}\n"
    )
    started = time.perf_counter()
    run = rnnbench(["run", str(tmp_path / "exp.yaml")], site, home, tmp_path)
    assert time.perf_counter() - started < 60
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and not home.exists(), run.stdout + run.stderr
    # the plugin that fails to import: one line, not Python's two-line warning format
    assert lines[0] == (
        "warning: skipped plugin 'missing' from rnnbench-missing-dep 1.0 (missing_dep_plugin): "
        "ModuleNotFoundError: No module named 'not_installed_anywhere'"
    )
    assert len(lines) == 2 and "Traceback" not in run.stderr
    assert lines[1] == (
        "error: cell 'halfwidth' (rnnbench-halfwidth 1.0, entry point halfwidth = halfwidth_plugin, class "
        "halfwidth_plugin.HalfWidthCell) breaks the Cell contract: forward(x_t, state) must return h_t of "
        "shape [batch, hidden] = [2, 4], got [2, 2]"
    )

    check = rnnbench(["check"], site, home, tmp_path)
    assert check.returncode == 2 and not home.exists(), check.stderr
    out = check.stdout.splitlines()
    assert any(line.startswith("FAIL cell 'halfwidth' (rnnbench-halfwidth 1.0, entry point") for line in out)
    assert any(line.startswith("ok   cell lstm (builtin") for line in out)
    assert any(line.startswith("ok   task memory (builtin") for line in out)
    assert any(line.startswith("ok   cell elman (rnnbench-elman 1.0, entry point elman") for line in out), (
        check.stderr
    )

    # the PyTorch-style cell runs a whole (tiny) experiment, hyperparameter and all
    (tmp_path / "elman.yaml").write_text(
        "name: el\ncells: [{name: elman, hparams: {alpha: 0.5}}]\n"
        "tasks: [{name: memory, options: {seq_len: 5, train_size: 64, valid_size: 32, test_size: 32}}]\n"
        "search: {hidden_size: {type: int, low: 4, high: 8}}\nbudget: {trials: 1, epochs: 1}\nfinal: {seeds: 1}\n"
    )
    good = rnnbench(["run", str(tmp_path / "elman.yaml")], site, home, tmp_path)
    assert good.returncode == 0, good.stdout[-1500:] + good.stderr[-1500:]
    assert "el/memory-synthetic/elman-1L-uni" in good.stdout and "(seeds: " in good.stdout


def test_plugin_errors_are_one_line():
    from rnnbench.plugins import one_line_error

    error = SyntaxError("invalid syntax\n    def f(:\n         ^")
    assert one_line_error(error) == "SyntaxError: invalid syntax"
    assert len(one_line_error(ImportError("x" * 100_000))) < 300
