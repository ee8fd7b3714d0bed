"""Plugin loading: broken plugins are named and skipped, conflicts are errors, builtins always load.

Most tests replace ``importlib.metadata.entry_points`` with a fixed list of fake entry points, so
what is installed on the machine (the example plugin, say) cannot change their outcome. One test
goes through the real discovery path with a temporary ``.dist-info`` on ``sys.path``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import textwrap
import types
import warnings
from dataclasses import dataclass

import pytest

from rnnbench import Cell, hookimpl
from rnnbench.errors import PluginError
from rnnbench.plugins import DISABLE_ENV, ENTRY_POINT_GROUP, PluginWarning, Registry

BUILTIN_CELLS = {"gru", "lstm", "peephole", "rnn"}


class ToyCell(Cell):
    """A toy cell that keeps its state unchanged."""

    def forward(self, x_t, state):
        return state, state


class OtherToyCell(ToyCell):
    """Another toy cell."""


@dataclass
class FakeDistribution:
    name: str
    version: str


@dataclass
class FakeEntryPoint:
    """The part of importlib.metadata.EntryPoint the registry uses."""

    name: str
    value: str
    dist: FakeDistribution | None
    group: str = ENTRY_POINT_GROUP

    def load(self):
        return importlib.import_module(self.value)


def plugin_module(monkeypatch, module_name: str, **hooks) -> types.ModuleType:
    """An importable module whose attributes are the given hook implementations."""
    module = types.ModuleType(module_name)
    for hook_name, function in hooks.items():
        setattr(module, hook_name, hookimpl(function))
    monkeypatch.setitem(sys.modules, module_name, module)
    return module


def cells_hook(result):
    def rnnbench_cells():
        return result

    return rnnbench_cells


@pytest.fixture
def installed(monkeypatch):
    """Declare the fake entry points that are 'installed'; returns a setter."""
    monkeypatch.delenv(DISABLE_ENV, raising=False)

    real_entry_points = importlib.metadata.entry_points

    def install(*entry_points: FakeEntryPoint):
        def fake_entry_points(**selection):
            # Other libraries (pydantic) read their own groups while tasks import: leave those alone.
            if selection.get("group") != ENTRY_POINT_GROUP:
                return real_entry_points(**selection)
            return list(entry_points)

        monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)

    return install


def plugin_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, PluginWarning)]


def load_registry() -> tuple[Registry, list[str]]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        registry = Registry()
    return registry, plugin_warnings(record)


# -- healthy plugins --------------------------------------------------------------------------------
def test_third_party_cells_load_with_their_distribution_as_source(monkeypatch, installed):
    plugin_module(monkeypatch, "toy_plugin", rnnbench_cells=cells_hook({"toy": ToyCell}))
    installed(FakeEntryPoint("toy", "toy_plugin", FakeDistribution("rnnbench-toy", "0.3.1")))
    registry, messages = load_registry()
    assert messages == []
    assert set(registry.cells) == BUILTIN_CELLS | {"toy"}
    assert registry.cell("toy").cls is ToyCell
    assert registry.cell("toy").source == "rnnbench-toy 0.3.1"
    assert registry.cell("toy").description == "A toy cell that keeps its state unchanged."
    assert registry.cell("lstm").source == "builtin"


def test_one_module_behind_two_entry_points_registers_once(monkeypatch, installed):
    plugin_module(monkeypatch, "toy_plugin", rnnbench_cells=cells_hook({"toy": ToyCell}))
    dist = FakeDistribution("rnnbench-toy", "0.3.1")
    installed(FakeEntryPoint("toy", "toy_plugin", dist), FakeEntryPoint("toy-again", "toy_plugin", dist))
    registry, messages = load_registry()
    assert messages == []
    assert registry.cell("toy").cls is ToyCell


# -- broken plugins are named and skipped -----------------------------------------------------------
def test_plugin_that_fails_to_import_is_named_and_the_others_still_load(monkeypatch, installed, tmp_path):
    (tmp_path / "broken_plugin.py").write_text("import a_dependency_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plugin_module(monkeypatch, "toy_plugin", rnnbench_cells=cells_hook({"toy": ToyCell}))
    installed(
        FakeEntryPoint("broken", "broken_plugin", FakeDistribution("rnnbench-broken", "2.0")),
        FakeEntryPoint("toy", "toy_plugin", FakeDistribution("rnnbench-toy", "0.3.1")),
    )
    try:
        registry, messages = load_registry()
    finally:
        sys.modules.pop("broken_plugin", None)
    assert len(messages) == 1
    message = messages[0]
    assert "rnnbench-broken 2.0" in message  # the distribution
    assert "'broken'" in message and "broken_plugin" in message  # the entry point and its target
    assert "ModuleNotFoundError" in message and "a_dependency_that_is_not_installed" in message  # the error
    assert set(registry.cells) == BUILTIN_CELLS | {"toy"}


def test_hook_returning_a_non_dict_is_skipped_with_a_warning(monkeypatch, installed):
    plugin_module(monkeypatch, "listy_plugin", rnnbench_cells=cells_hook([ToyCell]))
    plugin_module(monkeypatch, "toy_plugin", rnnbench_cells=cells_hook({"toy": ToyCell}))
    installed(
        FakeEntryPoint("listy", "listy_plugin", FakeDistribution("rnnbench-listy", "1.0")),
        FakeEntryPoint("toy", "toy_plugin", FakeDistribution("rnnbench-toy", "0.3.1")),
    )
    registry, messages = load_registry()
    assert len(messages) == 1
    assert "rnnbench-listy 1.0" in messages[0] and "listy" in messages[0]
    assert "must return a dict" in messages[0] and "list" in messages[0]
    assert set(registry.cells) == BUILTIN_CELLS | {"toy"}


@pytest.mark.parametrize(
    "bad_entry",
    [{"notacell": int}, {"instance": ToyCell(1, 1)}, {"": ToyCell}, {"module": types}],
    ids=["not-a-cell-class", "instance", "empty-name", "module"],
)
def test_entry_that_is_not_a_cell_class_is_skipped_with_a_warning(monkeypatch, installed, bad_entry):
    plugin_module(monkeypatch, "mixed_plugin", rnnbench_cells=cells_hook({**bad_entry, "toy": ToyCell}))
    installed(FakeEntryPoint("mixed", "mixed_plugin", FakeDistribution("rnnbench-mixed", "1.0")))
    registry, messages = load_registry()
    assert len(messages) == 1
    assert "rnnbench-mixed 1.0" in messages[0]
    assert "subclass of rnnbench.Cell" in messages[0]
    assert set(registry.cells) == BUILTIN_CELLS | {"toy"}  # its good entry still loads


def test_hook_that_raises_is_skipped_with_a_warning(monkeypatch, installed):
    def rnnbench_cells():
        raise RuntimeError("cannot build my cells")

    plugin_module(monkeypatch, "raising_plugin", rnnbench_cells=rnnbench_cells)
    installed(FakeEntryPoint("raising", "raising_plugin", FakeDistribution("rnnbench-raising", "1.0")))
    registry, messages = load_registry()
    assert len(messages) == 1
    assert "rnnbench-raising 1.0" in messages[0] and "cannot build my cells" in messages[0]
    assert set(registry.cells) == BUILTIN_CELLS


def test_plugin_rejected_by_the_hook_validation_is_skipped_entirely(monkeypatch, installed):
    """A hook with a wrong signature fails registration: none of the plugin's hooks may stay behind."""

    def rnnbench_tasks(unexpected_argument):
        return {}

    plugin_module(
        monkeypatch,
        "half_plugin",
        rnnbench_cells=cells_hook({"half": ToyCell}),
        rnnbench_tasks=rnnbench_tasks,
    )
    installed(FakeEntryPoint("half", "half_plugin", FakeDistribution("rnnbench-half", "1.0")))
    registry, messages = load_registry()
    assert len(messages) == 1 and "rnnbench-half 1.0" in messages[0]
    assert "half" not in registry.cells  # it was reported as skipped, so it must not be half-loaded


# -- conflicts --------------------------------------------------------------------------------------
def test_two_plugins_registering_the_same_name_is_an_error_naming_both(monkeypatch, installed):
    plugin_module(monkeypatch, "first_plugin", rnnbench_cells=cells_hook({"toy": ToyCell}))
    plugin_module(monkeypatch, "second_plugin", rnnbench_cells=cells_hook({"toy": OtherToyCell}))
    installed(
        FakeEntryPoint("first", "first_plugin", FakeDistribution("rnnbench-first", "1.0")),
        FakeEntryPoint("second", "second_plugin", FakeDistribution("rnnbench-second", "2.0")),
    )
    registry = Registry()  # the clash blocks only what uses the name
    assert registry.cell("gru").source == "builtin"
    with pytest.raises(PluginError) as info:
        registry.cell("toy")
    message = str(info.value)
    assert info.value.exit_code == 2 and "'toy'" in message
    assert "rnnbench-first 1.0" in message and "rnnbench-second 2.0" in message
    assert "toy" not in registry.cells  # listed nowhere as if one of them had won
    assert registry.clashes["cell"]["toy"] == message


def test_plugin_reusing_a_builtin_name_is_an_error(monkeypatch, installed):
    plugin_module(monkeypatch, "shadow_plugin", rnnbench_cells=cells_hook({"lstm": ToyCell}))
    installed(FakeEntryPoint("shadow", "shadow_plugin", FakeDistribution("rnnbench-shadow", "1.0")))
    registry = Registry()
    with pytest.raises(PluginError) as info:
        registry.cell("lstm")
    assert "builtin" in str(info.value) and "rnnbench-shadow 1.0" in str(info.value)
    assert registry.cell("gru").source == "builtin"


# -- switching third-party plugins off --------------------------------------------------------------
@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_disable_env_loads_builtins_only(monkeypatch, value):
    real_entry_points = importlib.metadata.entry_points

    def entry_points_must_not_be_read(**selection):
        if selection.get("group") == ENTRY_POINT_GROUP:
            raise AssertionError("rnnbench entry points were read although plugins are disabled")
        return real_entry_points(**selection)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points_must_not_be_read)
    monkeypatch.setenv(DISABLE_ENV, value)
    registry = Registry()
    assert set(registry.cells) == BUILTIN_CELLS
    assert {entry.source for entry in registry.cells.values()} == {"builtin"}
    assert {entry.source for entry in registry.tasks.values()} <= {"builtin"}


def test_disable_env_other_values_keep_plugins(monkeypatch, installed):
    plugin_module(monkeypatch, "toy_plugin", rnnbench_cells=cells_hook({"toy": ToyCell}))
    installed(FakeEntryPoint("toy", "toy_plugin", FakeDistribution("rnnbench-toy", "0.3.1")))
    monkeypatch.setenv(DISABLE_ENV, "0")
    assert "toy" in Registry().cells
    assert "toy" not in Registry(load_entry_points=False).cells


# -- the real discovery path ------------------------------------------------------------------------
def test_entry_point_of_an_installed_distribution_is_found(monkeypatch, tmp_path):
    """A .dist-info with an entry_points.txt on sys.path is all pip leaves behind; that must suffice."""
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    (tmp_path / "distinfo_toy_plugin.py").write_text(
        textwrap.dedent(
            '''
            from rnnbench import Cell, hookimpl

            class DistInfoToyCell(Cell):
                """Found through a real entry point."""

                def forward(self, x_t, state):
                    return state, state

            @hookimpl
            def rnnbench_cells():
                return {"distinfo-toy": DistInfoToyCell}
            '''
        )
    )
    dist_info = tmp_path / "rnnbench_distinfo_toy-1.2.3.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: rnnbench-distinfo-toy\nVersion: 1.2.3\n"
    )
    (dist_info / "entry_points.txt").write_text("[rnnbench]\ndistinfo-toy = distinfo_toy_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        registry = Registry()
    finally:
        sys.modules.pop("distinfo_toy_plugin", None)
    entry = registry.cell("distinfo-toy")
    assert entry.source == "rnnbench-distinfo-toy 1.2.3"
    assert entry.description == "Found through a real entry point."
    assert registry.cell("gru").source == "builtin"
