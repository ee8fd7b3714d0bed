"""Plugin manager: builtin plugins first, then every installed entry point of group ``rnnbench``.

A plugin that fails to import or returns something malformed is named in a one-line warning and
skipped; the others still load. A name two plugins register is refused where it is used (a
NameClashError naming both), so experiments that do not use it still run. Each cell
and task remembers where it came from (distribution, entry point, class), so the pre-flight check
can name exactly what broke the contract.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache

import pluggy

from rnnbench import hookspecs
from rnnbench.errors import NameClashError, UnknownNameError, clip_message, shorten

ENTRY_POINT_GROUP = "rnnbench"
DISABLE_ENV = "RNNBENCH_DISABLE_PLUGINS"

BUILTIN_PLUGINS = (
    "rnnbench.cells.rnn",
    "rnnbench.cells.lstm",
    "rnnbench.cells.peephole",
    "rnnbench.cells.gru",
    "rnnbench.tasks.charlm",
    "rnnbench.tasks.memory",
    "rnnbench.tasks.sentiment",
    "rnnbench.tasks.ner",
    "rnnbench.tasks.forecast",
)


class PluginWarning(UserWarning):
    """A third-party plugin was skipped."""


_default_formatwarning = warnings.formatwarning


def _format_warning(message, category, filename, lineno, line=None) -> str:
    # One line saying what was skipped; Python's own format adds the file, line and source line of
    # the warn() call inside rnnbench, which tells the user nothing.
    if issubclass(category, PluginWarning):
        return f"warning: {message}\n"
    return _default_formatwarning(message, category, filename, lineno, line)


warnings.formatwarning = _format_warning


@dataclass(frozen=True)
class Registered:
    """One cell or task class and where it came from."""

    name: str
    cls: type
    source: str  # "builtin" or "<distribution> <version>"
    entry_point: str | None = None  # "<name> = <module>" for third-party plugins

    @property
    def origin(self) -> str:
        """Where the class comes from, for messages: distribution, entry point and class."""
        where = [self.source]
        if self.entry_point:
            where.append(f"entry point {self.entry_point}")
        where.append(f"class {self.cls.__module__}.{self.cls.__qualname__}")
        return ", ".join(where)

    @property
    def description(self) -> str:
        doc = (self.cls.__doc__ or "").strip()
        return doc.splitlines()[0].strip() if doc else ""


class Registry:
    """Loaded plugins and the cells and tasks they register."""

    def __init__(self, *, load_entry_points: bool | None = None):
        self.pm = pluggy.PluginManager("rnnbench")
        self.pm.add_hookspecs(hookspecs)
        self._sources: dict[int, str] = {}
        self._entry_points: dict[int, str] = {}
        for module_name in BUILTIN_PLUGINS:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name != module_name:  # a real import error inside a builtin is a bug
                    raise
                continue  # builtin not shipped in this version
            self._register(module, "builtin", module_name)
        if load_entry_points is None:
            load_entry_points = os.environ.get(DISABLE_ENV, "").lower() not in ("1", "true", "yes")
        if load_entry_points:
            self._load_entry_points()
        # kind -> name -> the message naming every registrant: such a name is refused where it is
        # used, so a clash blocks only the experiments that use it
        self.clashes: dict[str, dict[str, str]] = {"cell": {}, "task": {}}
        self.cells = self._collect("cell", "rnnbench_cells", _cell_base())
        self.tasks = self._collect("task", "rnnbench_tasks", _task_base())

    def _register(self, plugin: object, source: str, name: str) -> None:
        self.pm.register(plugin, name=name)
        self._sources[id(plugin)] = source

    def _load_entry_points(self) -> None:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "unknown distribution"
            plugin = None
            try:
                plugin = ep.load()
                if self.pm.is_registered(plugin):
                    continue
                self._register(plugin, dist, f"{dist}:{ep.name}")
                self._entry_points[id(plugin)] = f"{ep.name} = {ep.value}"
            except Exception as exc:  # a broken plugin must not take the others down
                if plugin is not None and self.pm.is_registered(plugin):
                    self.pm.unregister(plugin)  # older pluggy may leave it half-registered
                warnings.warn(
                    f"skipped plugin {ep.name!r} from {dist} ({ep.value}): {one_line_error(exc)}",
                    PluginWarning,
                    stacklevel=2,
                )

    def _collect(self, kind: str, hook_name: str, base: type) -> dict[str, Registered]:
        found: dict[str, Registered] = {}
        claimants: dict[str, list[Registered]] = {}
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            source = self._sources.get(id(impl.plugin), "unknown")
            where = f"{impl.plugin_name} ({source})"
            try:
                result = impl.function()
            except Exception as exc:
                warnings.warn(f"skipped {kind}s of plugin {where}: {one_line_error(exc)}", PluginWarning)
                continue
            if not isinstance(result, dict):
                warnings.warn(
                    f"skipped {kind}s of plugin {where}: {hook_name}() must return a dict of "
                    f"name -> class, got {type(result).__name__}",
                    PluginWarning,
                )
                continue
            for name, cls in result.items():
                if not (isinstance(name, str) and name and isinstance(cls, type) and issubclass(cls, base)):
                    warnings.warn(
                        f"skipped {kind} {name!r} of plugin {where}: expected a subclass of "
                        f"rnnbench.{base.__name__}, got {shorten(cls)}",
                        PluginWarning,
                    )
                    continue
                entry = Registered(name, cls, source, self._entry_points.get(id(impl.plugin)))
                claimants.setdefault(name, []).append(entry)
                found[name] = entry
        for name, entries in claimants.items():
            if len(entries) > 1:
                del found[name]
                who = " and by ".join(f"{e.source} ({e.cls.__module__})" for e in entries)
                self.clashes[kind][name] = (
                    f"{kind} name {name!r} is registered twice: by {who}; uninstall one of them "
                    "(experiments that do not use it still run)"
                )
        return dict(sorted(found.items()))

    def cell(self, name: str) -> Registered:
        return self._lookup("cell", self.cells, name)

    def task(self, name: str) -> Registered:
        return self._lookup("task", self.tasks, name)

    def _lookup(self, kind: str, registered: dict[str, Registered], name: str) -> Registered:
        if name in self.clashes[kind]:
            raise NameClashError(self.clashes[kind][name])
        if name not in registered:
            raise UnknownNameError(kind, name, registered)
        return registered[name]


def one_line_error(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message, cut if long."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return clip_message(f"{type(exc).__name__}: {first}" if first else type(exc).__name__)


# The imports below stay local: a cached `rnnbench list` loads this module and must not pay torch
# (rnnbench.cells.base +2.4 s, rnnbench.task +3.0 s) or numpy (rnnbench.stats +0.13 s).
def _cell_base() -> type:
    from rnnbench.cells.base import Cell

    return Cell


def _task_base() -> type:
    from rnnbench.task import Task

    return Task


@lru_cache(maxsize=1)
def registry() -> Registry:
    """The process-wide registry (plugins load once)."""
    return Registry()


def get_cell(name: str) -> type:
    return registry().cell(name).cls


def get_task(name: str) -> type:
    return registry().task(name).cls


def declared_metric(task: str | None, metric: str):
    """The :class:`rnnbench.task.Metric` that ``task`` declares under ``metric`` (``f1_PER`` is an
    ``f1``); None when the task or the metric is not known here (a plugin that is not installed)."""
    try:
        declared = get_task(task).metrics if task else ()
    except Exception:
        return None
    for m in declared:
        if m.name == metric:
            return m
    return next((m for m in declared if metric.startswith(f"{m.name}_")), None)


def metric_bounds(task: str | None, metric: str) -> tuple[float, float]:
    """The values ``task``'s metric can take; unbounded when it is not known here."""
    from rnnbench.stats import UNBOUNDED

    m = declared_metric(task, metric)
    return m.bounds if m is not None else UNBOUNDED
