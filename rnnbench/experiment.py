"""The experiment file: YAML (safe_load) validated by pydantic, expanded into studies.

Every mistake becomes one ConfigError line with the key path and, where known, the YAML line.
Validation needs no data and creates nothing on disk; names of cells, tasks, datasets, options and
hyperparameters are checked against the plugin registry with a closest-match suggestion.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rnnbench.errors import ConfigError, RnnbenchError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Range(_Strict):
    """low <= high, and low > 0 on a log scale (int and float ranges alike)."""

    @model_validator(mode="after")
    def _range(self):
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log-scaled range needs low > 0")
        return self


class IntParam(_Range):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = 1


class FloatParam(_Range):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False


class CategoricalParam(_Strict):
    type: Literal["categorical"]
    choices: list[Any] = Field(min_length=1)


SearchParam = Annotated[IntParam | FloatParam | CategoricalParam, Field(discriminator="type")]


def _as_list(value):
    return value if isinstance(value, list) else [value]


_LABEL = Field(None, pattern=r"^[A-Za-z0-9_.+=-]+$", description="names this entry in study names")


class CellEntry(_Strict):
    name: str
    label: str | None = _LABEL  # tells apart two entries of one cell (e.g. different hparams)
    layers: list[Annotated[int, Field(ge=1, le=16)]] = [1]
    bidirectional: list[bool] = [False]
    hparams: dict[str, Any] = {}

    _listify = field_validator("layers", "bidirectional", mode="before")(_as_list)


class TaskEntry(_Strict):
    name: str
    dataset: str = "synthetic"
    label: str | None = _LABEL  # tells apart two entries of one task (e.g. memory at several seq_len)
    data_path: str | None = None
    options: dict[str, Any] = {}
    hparams: dict[str, Any] = {}


class BudgetSpec(_Strict):
    trials: int = Field(10, ge=0)  # 0: no search, the fixed configuration goes to the final seeds
    epochs: int = Field(5, ge=1)  # passes over the training data (unlimited when max_steps is set)
    max_steps: int | None = Field(None, ge=1)  # optimizer steps per trial
    eval_every: int | None = Field(None, ge=1)  # steps between validations (default: every epoch)
    steps_per_epoch: int | None = Field(None, ge=1)
    max_minutes_per_trial: float | None = Field(None, gt=0)
    patience: int | None = Field(None, ge=1)  # validations without improvement before stopping

    def epochs_limit(self) -> int:
        """Passes over the data a trial may make: ``epochs`` if given, unlimited under max_steps."""
        return self.epochs if "epochs" in self.model_fields_set or not self.max_steps else 10**9

    def validations(self) -> int | None:
        """How many validations a trial makes at most, when the step budget says."""
        if self.eval_every and self.max_steps:
            return -(-self.max_steps // self.eval_every)
        return None if self.eval_every else self.epochs_limit()


class FinalSpec(_Strict):
    seeds: int = Field(3, ge=0)
    epochs: int | None = Field(None, ge=1, description="default: budget.epochs")


class SamplerSpec(_Strict):
    name: Literal["tpe", "random", "grid"] = "tpe"
    seed: int = 0


class PrunerSpec(_Strict):
    name: Literal["median", "hyperband", "none"] = "median"
    warmup_epochs: int = Field(1, ge=0)


class Experiment(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    cells: list[str | CellEntry] = Field(min_length=1)
    tasks: list[str | TaskEntry] = Field(min_length=1)
    search: dict[str, SearchParam] = {}
    fixed: dict[str, Any] = {}
    budget: BudgetSpec = BudgetSpec()
    final: FinalSpec = FinalSpec()
    sampler: SamplerSpec = SamplerSpec()
    pruner: PrunerSpec = PrunerSpec()
    device: str = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    deterministic: bool = False  # torch.use_deterministic_algorithms: reproducible, often slower
    parameter_budget: int | None = Field(None, ge=1, description="solve hidden_size per architecture")
    skip_invalid: bool = False

    @field_validator("cells", mode="after")
    @classmethod
    def _cells(cls, cells):
        return [CellEntry(name=c) if isinstance(c, str) else c for c in cells]

    @field_validator("tasks", mode="after")
    @classmethod
    def _tasks(cls, tasks):
        return [TaskEntry(name=t) if isinstance(t, str) else t for t in tasks]

    @model_validator(mode="after")
    def _consistency(self):
        if self.parameter_budget and "hidden_size" in {**self.search, **self.fixed}:
            raise ValueError(
                "parameter_budget solves hidden_size per architecture: remove hidden_size from search/fixed"
            )
        if overlap := set(self.search) & set(self.fixed):
            raise ValueError(f"{sorted(overlap)} both searched and fixed")
        if self.sampler.name == "grid" and any(
            not isinstance(p, CategoricalParam) for p in self.search.values()
        ):
            raise ValueError("the grid sampler needs every search parameter to be categorical")
        return self


class Study:
    """One (architecture, task, dataset): the unit that gets a tuning budget."""

    def __init__(
        self, experiment: Experiment, cell: CellEntry, layers: int, bidirectional: bool, task: TaskEntry
    ):
        from rnnbench.trainer import Architecture

        self.experiment, self.cell_entry, self.task_entry = experiment, cell, task
        self.arch = Architecture(cell.name, layers, bidirectional)
        arch = self.arch.label if cell.label is None else f"{cell.label}-{self.arch.label.split('-', 1)[1]}"
        self.name = f"{experiment.name}/{task.label or f'{task.name}-{task.dataset}'}/{arch}"

    @property
    def fixed_hparams(self) -> dict[str, Any]:
        return {**self.experiment.fixed, **self.cell_entry.hparams, **self.task_entry.hparams}

    def make_task(self, seed: int = 0):
        from rnnbench.plugins import get_task

        cls = get_task(self.task_entry.name)
        return cls(
            self.task_entry.dataset, data_path=self.task_entry.data_path, seed=seed, **self.task_entry.options
        )

    def fingerprint(self) -> str:
        """What must not change under a resumed study: search space, budget, fixed values, task."""
        e = self.experiment
        payload = {
            "search": {k: v.model_dump() for k, v in sorted(e.search.items())},
            "fixed": self.fixed_hparams,
            "budget": e.budget.model_dump(),
            "sampler": e.sampler.model_dump(),
            "pruner": e.pruner.model_dump(),
            "task": self.task_entry.model_dump(),
            "parameter_budget": e.parameter_budget,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"Study({self.name})"


def expand(experiment: Experiment) -> tuple[list[Study], list[tuple[str, str]]]:
    """All studies, plus (study name, reason) for combinations a task refuses (with skip_invalid).

    A combination is refused by the task's own ``check_architecture``, the very check the trainer
    runs, on an instance built with the entry's options (construction reads no data), so a plugin's
    refusal is known here instead of failing every trial.
    """
    studies, skipped = [], []
    for task in experiment.tasks:
        checker = None
        for cell in experiment.cells:
            for layers, bidirectional in itertools.product(cell.layers, cell.bidirectional):
                study = Study(experiment, cell, layers, bidirectional, task)
                if checker is None:
                    checker = study.make_task()
                try:
                    checker.check_architecture(bidirectional=bidirectional)
                except ConfigError as refusal:
                    reason = str(refusal)
                    if not experiment.skip_invalid:
                        raise ConfigError(
                            f"{study.name}: {reason} (set skip_invalid: true to skip such combinations)"
                        ) from None
                    skipped.append((study.name, reason))
                    continue
                studies.append(study)
    if not studies:
        raise ConfigError("the experiment expands to no study (every combination was skipped)")
    seen: dict[str, Study] = {}
    for study in studies:
        if study.name in seen:
            raise ConfigError(
                f"two entries give the same study name {study.name!r}: set a distinct `label:` on the "
                "repeated task or cell entry (e.g. label: memory-T100)"
            )
        seen[study.name] = study
    return studies, skipped


def _yaml_lines(text: str) -> dict[tuple, int]:
    """Map key paths (tuples of keys/indices) to 1-based YAML line numbers, for error messages."""
    lines: dict[tuple, int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                p = (*path, key.value)
                lines[p] = key.start_mark.line + 1
                walk(value, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[(*path, i)] = item.start_mark.line + 1
                walk(item, (*path, i))

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _locate(loc: tuple, lines: dict[tuple, int]) -> str:
    # pydantic adds union-branch names (e.g. "str", "CellEntry") to paths; drop them for YAML lookup
    path = tuple(
        p for p in loc if isinstance(p, int) or not (p[:1].isupper() or p in ("str", "int", "float"))
    )
    for n in range(len(path), 0, -1):
        if path[:n] in lines:
            return f" (line {lines[path[:n]]})"
    return ""


def _format_loc(loc: tuple) -> str:
    out = ""
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p[:1].isupper() or p in ("str", "int", "float", "function-after"):
            continue
        else:
            out += f".{p}" if out else p
    return out or "(top level)"


def parse(text: str, source: str = "<string>") -> Experiment:
    """Parse and validate an experiment (schema + registry names)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{source}{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: an experiment file must be a mapping of keys (name, cells, tasks, ...)")
    lines = _yaml_lines(text)
    try:
        experiment = Experiment.model_validate(data)
    except ValidationError as exc:
        err = _pick_error(exc.errors())
        loc = tuple(err["loc"])
        if err["type"] == "extra_forbidden":
            msg = _unknown_key_message(loc, exc)
        else:
            msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{source}{_locate(loc, lines)}: {_format_loc(loc)}: {msg}") from None
    _check_names(experiment, source, lines)
    try:
        expand(experiment)  # refused combinations (bidirectional on a causal task) fail here, before any work
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return experiment


def _pick_error(errors: list[dict]) -> dict:
    # A union (str | CellEntry) reports one error per branch; the mapping branch is the informative one.
    for err in errors:
        if err["type"] != "string_type":
            return err
    return errors[0]


def _unknown_key_message(loc: tuple, exc: ValidationError) -> str:
    import difflib

    key = loc[-1]
    model = {
        "budget": BudgetSpec,
        "final": FinalSpec,
        "sampler": SamplerSpec,
        "pruner": PrunerSpec,
        "cells": CellEntry,
        "tasks": TaskEntry,
    }.get(loc[0] if len(loc) > 1 else "", Experiment)
    if loc[0] == "search":
        known = ["type", "low", "high", "log", "step", "choices"]
    else:
        known = list(model.model_fields)
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key {key!r}{hint} (known: {', '.join(known)})"


def _check_names(e: Experiment, source: str, lines: dict[tuple, int]) -> None:
    """Cell/task/dataset/option/hyperparameter names, against the registry."""
    from rnnbench.plugins import registry
    from rnnbench.trainer import TRAINER_HPARAMS

    reg = registry()

    def fail(path: tuple, err: RnnbenchError):
        raise ConfigError(f"{source}{_locate(path, lines)}: {_format_loc(path)}: {err}") from None

    cell_hparams: set[str] = set()
    for i, cell in enumerate(e.cells):
        try:
            cls = reg.cell(cell.name).cls
        except RnnbenchError as err:
            fail(("cells", i, "name") if ("cells", i, "name") in lines else ("cells", i), err)
        cell_hparams |= set(cls.hparam_names())
        for key in cell.hparams:
            if key not in cls.hparam_names():
                from rnnbench.errors import UnknownNameError

                fail(
                    ("cells", i, "hparams", key),
                    UnknownNameError(f"hyperparameter of cell {cell.name!r}", key, cls.hparam_names()),
                )
    task_hparams: set[str] = set()
    for i, task in enumerate(e.tasks):
        try:
            cls = reg.task(task.name).cls
            task_hparams |= set(cls.hparam_defaults)
            cls(
                task.dataset, data_path=task.data_path, **task.options
            )  # validates dataset and options; no I/O
        except RnnbenchError as err:
            fail(("tasks", i, "name") if ("tasks", i, "name") in lines else ("tasks", i), err)
        for key in task.hparams:
            if key not in cls.hparam_defaults:
                from rnnbench.errors import UnknownNameError

                fail(
                    ("tasks", i, "hparams", key),
                    UnknownNameError(f"hyperparameter of task {task.name!r}", key, cls.hparam_defaults),
                )
    known = set(TRAINER_HPARAMS) | cell_hparams | task_hparams
    for section in ("search", "fixed"):
        for key in getattr(e, section):
            if key not in known:
                from rnnbench.errors import UnknownNameError

                fail((section, key), UnknownNameError("hyperparameter", key, known))


def load(path: str | Path) -> Experiment:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file {path} does not exist")
    return parse(path.read_text(), str(path))
