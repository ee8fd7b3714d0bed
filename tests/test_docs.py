"""The documentation site builds offline and strictly, and its code is real code that runs.

`mkdocs build --strict` fails on a broken link, a missing page or snippet, or a docstring the API
reference cannot render; CI runs only pytest, so the build runs here. The code examples of the
tutorials (a cell plugin, a task plugin) are executed as written.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def blocks(page: str, language: str = "python") -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (DOCS / page).read_text(), re.S)


def block(page: str, marker: str, language: str = "python") -> str:
    return next(b for b in blocks(page, language) if marker in b)


def test_docs_build_strict_and_offline(tmp_path):
    """The whole site, API reference and CLI reference included, with warnings as errors. Nothing
    in mkdocs.yml fetches at build time (no `social`/`privacy` plugins, no remote inventories)."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    site = tmp_path / "site"
    assert (site / "reference" / "plugin-api" / "index.html").is_file()
    api = (site / "reference" / "plugin-api" / "index.html").read_text()
    for anchor in (
        "rnnbench.hookspecs.rnnbench_cells",
        "rnnbench.cells.base.Cell",
        "rnnbench.task.Task",
        "rnnbench.task.Batch",
        "rnnbench.task.Metric",
        "rnnbench.encoder.Encoder",
    ):
        assert f'id="{anchor}"' in api, anchor
    assert 'id="rnnbench-run"' in (site / "reference" / "cli" / "index.html").read_text()
    assert (site / "reference-cpu" / "figures" / "metric_vs_throughput.png").is_file()


def test_mkdocs_config_stays_offline():
    config = "\n".join(line.split("#")[0] for line in (ROOT / "mkdocs.yml").read_text().splitlines())
    for fetching in ("- social", "- privacy", "import:", "http://", "https://"):
        assert fetching not in config, f"mkdocs.yml must build offline: {fetching!r}"
    assert "dev_addr: 127.0.0.1:" in config  # `mkdocs serve` stays on loopback


# -- the cell plugin tutorial ---------------------------------------------------------------------
def test_cell_example_runs_deep_and_bidirectional_with_padding():
    namespace: dict = {}
    exec(compile(block("tutorials/cell-plugin.md", "class MinimalGRU"), "cell-plugin.md", "exec"), namespace)  # noqa: S102
    assert namespace["rnnbench_cells"]() == {"mgu": namespace["MinimalGRU"]}

    from rnnbench.encoder import Encoder

    enc = Encoder(namespace["MinimalGRU"], 3, 5, num_layers=2, bidirectional=True)
    x = torch.randn(4, 6, 3, requires_grad=True)
    out, final = enc(x, torch.tensor([6, 4, 2, 1]))
    assert out.shape == (4, 6, 10) and len(final) == 4
    assert torch.all(out[3, 1:] == 0)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in enc.parameters())


def test_torch_style_cell_works_through_the_encoder_and_the_contract():
    """The second style: a bare super().__init__() and the cell's own nn.Linear layers."""
    namespace: dict = {}
    exec(
        "import torch\nfrom torch import nn\nfrom rnnbench import Cell\n"
        + block("tutorials/cell-plugin.md", "class ElmanCell"),
        namespace,
    )  # noqa: S102
    cell_cls = namespace["ElmanCell"]
    assert cell_cls.hparam_names() == ("alpha",)

    from rnnbench.encoder import Encoder
    from rnnbench.plugins import Registered
    from rnnbench.preflight import check_cell

    enc = Encoder(cell_cls, 3, 5, num_layers=2, bidirectional=True, alpha=0.5)
    out, final = enc(torch.randn(4, 6, 3), torch.tensor([6, 4, 2, 1]))
    assert out.shape == (4, 6, 10) and len(final) == 4 and enc.cells[2].input_size == 10
    check_cell(Registered("elman", cell_cls, "docs"))


def test_cell_pyproject_is_complete():
    """Build system, name, version, dependencies and the entry point: what `pip install .` needs."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    project = tomllib.loads(block("tutorials/cell-plugin.md", "[build-system]", "toml"))
    assert project["build-system"]["build-backend"] == "setuptools.build_meta"
    assert {"name", "version", "dependencies"} <= set(project["project"])
    assert "rnnbench" in project["project"]["dependencies"]
    assert project["project"]["entry-points"]["rnnbench"] == {"mgu": "my_cells.plugin"}
    assert project["tool"]["setuptools"]["packages"] == ["my_cells"]
    assert "my_cells/plugin.py" in block("tutorials/cell-plugin.md", "class MinimalGRU")


# -- the task plugin tutorial ---------------------------------------------------------------------
def _skeleton(monkeypatch) -> types.ModuleType:
    """The tutorial's task skeleton as the module its first line names (my_tasks.plugin)."""
    code = block("tutorials/task-plugin.md", "class FirstSymbol")
    assert code.startswith("# my_tasks/plugin.py\n")
    module = types.ModuleType("my_tasks.plugin")
    monkeypatch.setitem(sys.modules, "my_tasks", types.ModuleType("my_tasks"))
    monkeypatch.setitem(sys.modules, "my_tasks.plugin", module)
    exec(compile(code, "task-plugin.md", "exec"), module.__dict__)  # noqa: S102 (our own documentation)
    return module


SMALL = {"train_size": 200, "valid_size": 24, "test_size": 24, "max_len": 10}  # a fast test


def test_task_skeleton_keeps_the_contract(monkeypatch):
    from rnnbench.testing import check_task_contract

    plugin = _skeleton(monkeypatch)
    assert plugin.rnnbench_tasks() == {"first_symbol": plugin.FirstSymbol}
    check_task_contract(plugin.FirstSymbol("synthetic", **SMALL), train_steps=10)


def test_task_skeleton_builds_every_architecture_and_serves(monkeypatch):
    """Through the trainer's own model builder (hparam_defaults merged), deep and bidirectional,
    then what a logged MLflow model is made of: serving_model(model)(serving_example())."""
    from rnnbench.models import serve
    from rnnbench.trainer import Architecture, build_model

    plugin = _skeleton(monkeypatch)
    task = plugin.FirstSymbol("synthetic", seed=3, **SMALL)
    task.check_architecture(bidirectional=True)
    task.setup()
    batch = next(iter(task.batches("train", 8, device=torch.device("cpu"), generator=torch.Generator())))
    assert batch.tokens == int(batch.lengths.sum()) and batch.inputs.shape[1] == int(batch.lengths.max())
    for arch in (Architecture("lstm"), Architecture("gru", 2, True), Architecture("rnn", 1, True)):
        model = build_model(task, arch, {"hidden_size": 6})
        assert model.embedding.embedding_dim == plugin.FirstSymbol.hparam_defaults["embedding_dim"]
        loss, carry = task.training_loss(model, batch)
        loss.backward()
        assert carry is None and torch.isfinite(loss)
        _, example, output = serve(task, model.eval())
        assert output.shape == (len(example), task.options.symbols)
    json.dumps(task.export_state())
    json.dumps(task.describe())
    assert set(task.baseline("test")) == {m.name for m in task.metrics}


def test_task_contract_example_runs(monkeypatch):
    """The tutorial's tests/test_my_task.py, run on a real task standing in for the reader's own."""
    from rnnbench.tasks.memory import Memory

    code = block("tutorials/task-plugin.md", "check_task_contract(MyTask")

    class SmallMemory(Memory):  # small: a fast test
        def __init__(self, dataset="synthetic", **options):
            super().__init__(
                dataset, **{"seq_len": 10, "train_size": 300, "valid_size": 150, "test_size": 150, **options}
            )

    plugin = types.ModuleType("my_tasks.plugin")
    plugin.MyTask = SmallMemory
    monkeypatch.setitem(sys.modules, "my_tasks", types.ModuleType("my_tasks"))
    monkeypatch.setitem(sys.modules, "my_tasks.plugin", plugin)
    namespace: dict = {}
    exec(compile(code, "task-plugin.md", "exec"), namespace)  # noqa: S102 (our own documentation)
    namespace["test_my_task_keeps_the_rnnbench_contract"]()
