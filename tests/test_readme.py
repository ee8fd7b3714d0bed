"""The README's plugin example is real code: it must run through the encoder as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_cell_example_runs_deep_and_bidirectional_with_padding():
    block = next(
        b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "class MinimalGRU" in b
    )
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 (our own documentation)
    assert namespace["rnnbench_cells"]() == {"mgu": namespace["MinimalGRU"]}

    from rnnbench.encoder import Encoder

    enc = Encoder(namespace["MinimalGRU"], 3, 5, num_layers=2, bidirectional=True)
    x = torch.randn(4, 6, 3, requires_grad=True)
    out, final = enc(x, torch.tensor([6, 4, 2, 1]))
    assert out.shape == (4, 6, 10) and len(final) == 4
    assert torch.all(out[3, 1:] == 0)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in enc.parameters())


def test_readme_task_contract_example_runs(monkeypatch):
    import sys
    import types

    from rnnbench.tasks.memory import Memory

    block = next(
        b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "check_task_contract(" in b
    )

    class SmallMemory(Memory):  # a real task stands in for the reader's own (small: a fast test)
        def __init__(self, dataset="synthetic", **options):
            super().__init__(
                dataset, **{"seq_len": 10, "train_size": 300, "valid_size": 150, "test_size": 150, **options}
            )

    plugin = types.ModuleType("my_tasks.plugin")
    plugin.MyTask = SmallMemory
    monkeypatch.setitem(sys.modules, "my_tasks", types.ModuleType("my_tasks"))
    monkeypatch.setitem(sys.modules, "my_tasks.plugin", plugin)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 (our own documentation)
    namespace["test_my_task_keeps_the_rnnbench_contract"]()


def _block(language: str, marker: str) -> str:
    return next(b for b in re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S) if marker in b)


def test_readme_torch_style_cell_works_through_the_encoder_and_the_contract():
    """The second style: a bare super().__init__() and the cell's own nn.Linear layers."""
    namespace: dict = {}
    exec(
        "import torch\nfrom torch import nn\nfrom rnnbench import Cell\n"
        + _block("python", "class ElmanCell"),
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
    check_cell(Registered("elman", cell_cls, "readme"))


def test_readme_pyproject_is_complete():
    """Build system, name, version, dependencies and the entry point: what `pip install .` needs.
    (Installing it for real, into a fresh venv, is done by hand: see the README's plugin section.)"""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    project = tomllib.loads(_block("toml", "[build-system]"))
    assert project["build-system"]["build-backend"] == "setuptools.build_meta"
    assert {"name", "version", "dependencies"} <= set(project["project"])
    assert "rnnbench" in project["project"]["dependencies"]
    assert project["project"]["entry-points"]["rnnbench"] == {"mgu": "my_cells.plugin"}
    assert project["tool"]["setuptools"]["packages"] == ["my_cells"]
    assert "my_cells/plugin.py" in _block("python", "class MinimalGRU")
