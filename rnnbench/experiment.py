"""The experiment file: YAML (safe_load) validated by pydantic, expanded into studies.

Every mistake becomes one ConfigError line with the key path and, where known, the YAML line.
Validation needs no data and creates nothing on disk; names of cells, tasks, datasets, options and
hyperparameters are checked against the plugin registry with a closest-match suggestion, and every
fixed value and search range against the domain its trainer, cell or task declares.

Everything a hostile or mistyped file could make huge is bounded before it is used: the file's
size, its encoding, the values its YAML aliases expand to, every string, the number of trials,
seeds, studies and epochs (see the limits below).
"""

from __future__ import annotations

import difflib
import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rnnbench.errors import ConfigError, RnnbenchError, UnknownNameError, shorten
from rnnbench.hparams import TRAINER_HPARAM_DOMAINS, TRAINER_HPARAMS
from rnnbench.plugins import get_task, registry

# Bounds on what a file may ask for; each is far above any sensible experiment.
MAX_FILE_BYTES = 1 << 20  # an experiment file is a few KB
MAX_YAML_VALUES = 10_000  # values after alias expansion (a YAML "billion laughs" expands to 10^9)
MAX_YAML_DEPTH = 64
MAX_STRING = 4096  # characters of any one string (a path fits)
MAX_STUDIES = 1000
MAX_TRIALS = 10_000
MAX_SEEDS = 1000
MAX_EPOCHS = 10_000
DEVICES = "auto, cpu, cuda, cuda:N or mps"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


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
    step: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _log_without_step(self):
        if self.log and self.step != 1:  # Optuna would refuse it at the first trial, after stores exist
            raise ValueError("a log-scaled range takes no step: remove step, or log")
        return self


class FloatParam(_Range):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False


class CategoricalParam(_Strict):
    type: Literal["categorical"]
    choices: list[Any] = Field(min_length=1, max_length=1000)

    @field_validator("choices")
    @classmethod
    def _scalars(cls, choices: list[Any]) -> list[Any]:
        # what Optuna can store in the ledger; found at the first trial otherwise, after stores exist
        for choice in choices:
            if choice is not None and not isinstance(choice, (bool, int, float, str)):
                raise ValueError(f"choice {shorten(choice)}: choices are numbers, text, true/false or null")
        return choices


SearchParam = Annotated[IntParam | FloatParam | CategoricalParam, Field(discriminator="type")]


def _as_list(value):
    return value if isinstance(value, list) else [value]


_LABEL = Field(
    None, pattern=r"^[A-Za-z0-9_.+=-]+$", max_length=100, description="names this entry in study names"
)


def _not_only_dots(label: str | None) -> str | None:
    # '.' and '..' would name a folder or its parent wherever the study name becomes a path
    if label is not None and not label.strip("."):
        raise ValueError(f"a label of dots only ({label!r}) is not a name: use letters or digits")
    return label


class CellEntry(_Strict):
    name: str
    label: str | None = _LABEL  # tells apart two entries of one cell (e.g. different hparams)
    layers: list[Annotated[int, Field(ge=1, le=16)]] = Field([1], min_length=1, max_length=16)
    bidirectional: list[bool] = Field([False], min_length=1, max_length=2)
    hparams: dict[str, Any] = {}

    _listify = field_validator("layers", "bidirectional", mode="before")(_as_list)
    _label = field_validator("label")(_not_only_dots)


def parse_margin(value: float | str) -> tuple[float, bool]:
    """``(size, relative)`` of a margin: ``0.005`` is absolute, ``"1%"`` relative (0.01)."""
    relative = isinstance(value, str) and value.strip().endswith("%")
    try:
        size = float(value.strip().removesuffix("%")) / 100 if relative else float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"margin must be a positive number or a percentage like '1%', not {value!r}"
        ) from None
    if isinstance(value, bool) or not (math.isfinite(size) and size > 0):
        raise ValueError(f"margin must be a positive number or a percentage like '1%', not {value!r}")
    return size, relative


class TaskEntry(_Strict):
    name: str
    dataset: str = "synthetic"
    label: str | None = _LABEL  # tells apart two entries of one task (e.g. memory at several seq_len)
    _label = field_validator("label")(_not_only_dots)
    data_path: str | None = None
    options: dict[str, Any] = {}
    hparams: dict[str, Any] = {}
    # the experiment's parameter_budget for this task only: embeddings and heads differ by task
    parameter_budget: int | None = Field(None, ge=1, le=10**9)
    # the experiment's budget for this task only (an epoch of one dataset is not another's)
    budget: BudgetSpec | None = None
    # margin of practical equivalence of the primary metric, overriding the task's own: a number
    # in the metric's units (0.01 accuracy), or a share of the compared value ("1%" of perplexity)
    margin: float | str | None = None
    # run only these of the cells' architectures on this task (e.g. [lstm-1L-bi, gru-1L-bi]): the
    # one variant that matters per task without the whole cross product
    architectures: list[str] | None = Field(None, min_length=1, max_length=100)

    @field_validator("margin")
    @classmethod
    def _positive_margin(cls, value: float | str | None) -> float | str | None:
        if value is not None:
            parse_margin(value)
        return value


class BudgetSpec(_Strict):
    trials: int = Field(
        10, ge=0, le=MAX_TRIALS
    )  # 0: no search, the fixed configuration goes to the final seeds
    epochs: int = Field(5, ge=1, le=MAX_EPOCHS)  # passes over the training data (unlimited under max_steps)
    max_steps: int | None = Field(None, ge=1, le=10**12)  # optimizer steps per trial
    eval_every: int | None = Field(None, ge=1, le=10**12)  # steps between validations (default: every epoch)
    steps_per_epoch: int | None = Field(None, ge=1, le=10**9)
    max_minutes_per_trial: float | None = Field(None, gt=0, le=7 * 24 * 60)
    # early stopping: a trial (search or final) stops once `patience` validations in a row fail to
    # beat the best so far by min_improvement (a number in the metric's units, or "1%" of it);
    # it then counts as converged, else as having hit the cap
    patience: int | None = Field(None, ge=1, le=MAX_EPOCHS)
    min_improvement: float | str = 0.0

    @field_validator("patience", mode="before")
    @classmethod
    def _positive_patience(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise ValueError(f"patience counts validations without improvement: at least 1, not {value}")
        return value

    @field_validator("min_improvement")
    @classmethod
    def _improvement(cls, value: float | str) -> float | str:
        if value != 0:
            parse_margin(value)  # the same spelling as a margin: 0.001 or "0.5%"
        return value

    @model_validator(mode="after")
    def _validations_fit_the_cap(self):
        if self.max_steps and self.eval_every and self.max_steps < self.eval_every:
            raise ValueError(
                f"max_steps ({self.max_steps}) is below one validation (eval_every {self.eval_every}): "
                "a trial would validate only at its cap"
            )
        if (
            self.max_steps
            and self.steps_per_epoch
            and not self.eval_every
            and self.max_steps < self.steps_per_epoch
        ):
            raise ValueError(
                f"max_steps ({self.max_steps}) is below one validation (steps_per_epoch "
                f"{self.steps_per_epoch}): a trial would validate only at its cap"
            )
        rounds = self.validations()
        if self.patience and rounds is not None and self.patience >= rounds:
            raise ValueError(
                f"patience {self.patience} can never stop a trial that validates at most {rounds} times: "
                "lower patience, or raise max_steps / epochs"
            )
        return self

    def improvement(self) -> tuple[float, bool]:
        """``(size, relative)`` of the minimum improvement."""
        return (0.0, False) if self.min_improvement == 0 else parse_margin(self.min_improvement)

    def epochs_limit(self) -> int:
        """Passes over the data a trial may make: ``epochs`` if given, unlimited under max_steps."""
        return self.epochs if "epochs" in self.model_fields_set or not self.max_steps else 10**9

    def validations(self) -> int | None:
        """How many validations a trial makes at most, when the step budget says."""
        if self.eval_every and self.max_steps:
            return -(-self.max_steps // self.eval_every)
        return None if self.eval_every else self.epochs_limit()


TaskEntry.model_rebuild()  # its budget field names BudgetSpec, defined after it


class FinalSpec(_Strict):
    seeds: int = Field(3, ge=0, le=MAX_SEEDS)
    epochs: int | None = Field(None, ge=1, le=MAX_EPOCHS, description="default: budget.epochs")


class SamplerSpec(_Strict):
    """How a study proposes configurations. ``tpe`` draws its first ``startup_trials`` from
    ``startup`` (``qmc``: one scrambled Sobol sequence shared by every architecture, so a small
    budget covers each range and comparisons stay paired), then models what it has seen; ``qmc``
    is the sequence alone. A QMC sequence stratifies numeric ranges only, so a categorical
    parameter under it is refused; under the default start-up it falls back to ``random``, written
    into the experiment as run (see :meth:`fit_space`)."""

    name: Literal["tpe", "qmc", "random", "grid"] = "tpe"
    startup: Literal["qmc", "random"] | None = None  # tpe only; default qmc (random with a categorical)
    startup_trials: int = Field(10, ge=0, le=MAX_TRIALS)  # tpe only: trials before TPE takes over
    seed: int = Field(0, ge=0, le=2**32 - 1)  # numpy's seed range

    @model_validator(mode="after")
    def _startup_is_tpe_only(self):
        # by value, not by key: the experiment as run (every default written out) parses again
        fields = type(self).model_fields
        given = [k for k in ("startup", "startup_trials") if getattr(self, k) != fields[k].default]
        if given and self.name != "tpe":
            verb = "apply" if len(given) > 1 else "applies"
            raise ValueError(f"{' and '.join(given)} {verb} to the tpe sampler only")
        return self

    def fit_space(self, search: dict[str, Any]) -> None:
        """Refuse a QMC sequence asked to cover a categorical parameter (it stratifies numbers,
        not choices); resolve the default start-up: qmc, or random where the space has one."""
        categorical = [k for k, p in search.items() if isinstance(p, CategoricalParam) and len(p.choices) > 1]
        if self.name == "tpe" and self.startup is None:
            self.startup = "random" if categorical else "qmc"
        qmc = self.name == "qmc" or (self.name == "tpe" and self.startup == "qmc" and self.startup_trials)
        if qmc and categorical:
            hint = "startup: random" if self.name == "tpe" else "name: tpe, random or grid"
            raise ValueError(
                f"search.{categorical[0]}: the qmc {'start-up' if self.name == 'tpe' else 'sampler'} cannot "
                f"cover a categorical parameter (it stratifies numeric ranges only): use sampler {hint}"
            )


class PrunerSpec(_Strict):
    """When a trial may be stopped early. By default never before ``min_fraction`` of the
    validations its budget allows (a slow starter, e.g. the lowest learning rate, gets a fair
    look); ``warmup_epochs: N`` instead protects the first N validations whatever the budget."""

    name: Literal["median", "hyperband", "none"] = "median"
    min_fraction: float | None = Field(None, gt=0, lt=1)  # default 1/3 (unless warmup_epochs is given)
    warmup_epochs: int | None = Field(None, ge=0, le=MAX_EPOCHS)

    @model_validator(mode="after")
    def _one_warmup(self):
        if self.min_fraction is not None and self.warmup_epochs is not None:
            raise ValueError("give min_fraction or warmup_epochs, not both")
        if self.min_fraction is None and self.warmup_epochs is None:
            self.min_fraction = 1 / 3
        return self

    def check_budget(self, budget: BudgetSpec) -> None:
        """min_fraction is a share of the validations a trial makes at most: they must be known."""
        if self.name != "none" and self.min_fraction is not None and budget.validations() is None:
            raise ValueError(
                "pruner min_fraction is a share of a trial's validations, unknown under eval_every "
                "without max_steps: give the budget max_steps, or the pruner warmup_epochs"
            )


def check_device(name: Any) -> str:
    """A device name torch would accept: auto, cpu, cuda, cuda:N, or mps where torch has it.
    Whether the machine has that device is checked by the pre-flight, on the machine that runs."""
    # local: torch costs +2.6 s on `import rnnbench.experiment` (sweep, ledger, the report and
    # `rnnbench sync` import it); only a device name needs it
    import torch

    if isinstance(name, str) and (
        re.fullmatch(r"auto|cpu|cuda(:\d{1,3})?", name) or (name == "mps" and hasattr(torch.backends, "mps"))
    ):
        return name
    raise ConfigError(f"unknown device {shorten(name)}; expected {DEVICES}")


class Experiment(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    cells: list[str | CellEntry] = Field(min_length=1, max_length=100)
    tasks: list[str | TaskEntry] = Field(min_length=1, max_length=100)
    search: dict[str, SearchParam] = Field({}, max_length=100)
    fixed: dict[str, Any] = Field({}, max_length=100)
    budget: BudgetSpec = BudgetSpec()
    final: FinalSpec = FinalSpec()
    sampler: SamplerSpec = SamplerSpec()
    pruner: PrunerSpec = PrunerSpec()
    device: str = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    deterministic: bool = False  # torch.use_deterministic_algorithms: reproducible, often slower
    parameter_budget: int | None = Field(
        None, ge=1, le=10**9, description="solve hidden_size per architecture"
    )
    skip_invalid: bool = False

    @field_validator("device", mode="after")
    @classmethod
    def _device(cls, device: str) -> str:
        try:
            return check_device(device)
        except ConfigError as err:
            raise ValueError(str(err)) from None

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
        budgeted = self.parameter_budget or any(t.parameter_budget for t in self.tasks)
        if budgeted and "hidden_size" in {**self.search, **self.fixed}:
            raise ValueError(
                "parameter_budget solves hidden_size per architecture: remove hidden_size from search/fixed"
            )
        if overlap := set(self.search) & set(self.fixed):
            raise ValueError(f"{sorted(overlap)} both searched and fixed")
        if self.sampler.name == "grid" and any(
            not isinstance(p, CategoricalParam) for p in self.search.values()
        ):
            raise ValueError("the grid sampler needs every search parameter to be categorical")
        self.sampler.fit_space(self.search)
        for budget in {id(b): b for b in (t.budget or self.budget for t in self.tasks)}.values():
            self.pruner.check_budget(budget)
        schedule = self.search.get("lr_schedule") or self.fixed.get("lr_schedule", "constant")
        decays = schedule != "constant" and not (
            isinstance(schedule, CategoricalParam) and set(schedule.choices) <= {"constant"}
        )
        for budget in {id(b): b for b in (t.budget or self.budget for t in self.tasks)}.values():
            if decays and not (budget.max_steps or budget.steps_per_epoch):
                raise ValueError(
                    "lr_schedule cosine/linear decays to the step cap: give the budget max_steps "
                    "(or steps_per_epoch)"
                )
        per_task = sum(len(c.layers) * len(c.bidirectional) for c in self.cells)
        studies = sum(len(t.architectures) if t.architectures else per_task for t in self.tasks)
        if studies > MAX_STUDIES:
            raise ValueError(
                f"the experiment expands to {studies:,} studies; at most {MAX_STUDIES:,} are run"
            )
        return self


@dataclass(frozen=True)
class Architecture:
    """A cell x layers x direction; the unit every study compares."""

    cell: str
    layers: int = 1
    bidirectional: bool = False

    @property
    def label(self) -> str:
        return f"{self.cell}-{self.layers}L-{'bi' if self.bidirectional else 'uni'}"


class Study:
    """One (architecture, task, dataset): the unit that gets a tuning budget."""

    def __init__(
        self, experiment: Experiment, cell: CellEntry, layers: int, bidirectional: bool, task: TaskEntry
    ):
        self.experiment, self.cell_entry, self.task_entry = experiment, cell, task
        self.arch = Architecture(cell.name, layers, bidirectional)
        arch = self.arch.label if cell.label is None else f"{cell.label}-{self.arch.label.split('-', 1)[1]}"
        self.arch_name = arch
        self.name = f"{experiment.name}/{task.label or f'{task.name}-{task.dataset}'}/{arch}"

    @property
    def fixed_hparams(self) -> dict[str, Any]:
        return {**self.experiment.fixed, **self.cell_entry.hparams, **self.task_entry.hparams}

    @property
    def budget(self) -> BudgetSpec:
        """The task's own budget, else the experiment's: trials, epochs, steps, time."""
        return self.task_entry.budget or self.experiment.budget

    @property
    def parameter_budget(self) -> int | None:
        """The task's own budget, else the experiment's (None: hidden_size is searched or fixed)."""
        return self.task_entry.parameter_budget or self.experiment.parameter_budget

    def make_task(self, seed: int = 0):
        cls = get_task(self.task_entry.name)
        return cls(
            self.task_entry.dataset, data_path=self.task_entry.data_path, seed=seed, **self.task_entry.options
        )

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
        candidates = [
            Study(experiment, cell, layers, bidirectional, task)
            for cell in experiment.cells
            for layers, bidirectional in itertools.product(cell.layers, cell.bidirectional)
        ]
        if task.architectures is not None:
            offered = [s.arch_name for s in candidates]
            if unknown := [a for a in task.architectures if a not in offered]:
                label = task.label or f"{task.name}-{task.dataset}"
                raise ConfigError(
                    f"task {label}: architectures {unknown} are not among the cells' ({', '.join(offered)})"
                )
            candidates = [s for s in candidates if s.arch_name in task.architectures]
        for study in candidates:
            if checker is None:
                checker = study.make_task()
            try:
                checker.check_architecture(bidirectional=study.arch.bidirectional)
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


def _compose(text: str, source: str) -> yaml.Node | None:
    """The YAML node graph, refused when its aliases would expand it beyond any real experiment.

    Composing is linear in the text (an alias is the same node object again); loading or walking
    the expanded tree is not: 9 levels of 9 aliases are 9^9 values. So the expanded size is counted
    on the graph, each node once, before anything walks it.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{source}{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    except RecursionError:
        raise ConfigError(
            f"{source}: not valid YAML: nested more than {MAX_YAML_DEPTH} levels deep"
        ) from None
    if root is None:
        return None
    sizes: dict[int, int] = {}

    def expanded(node, depth: int, open_nodes: set[int]) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(
                f"{source} line {node.start_mark.line + 1}: nested more than {MAX_YAML_DEPTH} levels"
            )
        if id(node) in open_nodes:
            raise ConfigError(
                f"{source} line {node.start_mark.line + 1}: a YAML alias refers to its own parent"
            )
        open_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        size = 1
        for child in children:
            size += expanded(child, depth + 1, open_nodes)
            if size > MAX_YAML_VALUES:
                raise ConfigError(
                    f"{source} line {node.start_mark.line + 1}: this document expands to more than "
                    f"{MAX_YAML_VALUES:,} values through YAML aliases (*name); an experiment needs a few "
                    "hundred: write the values out"
                )
        open_nodes.discard(id(node))
        sizes[id(node)] = size
        return size

    expanded(root, 0, set())
    return root


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first_line: int):
        super().__init__(f"line {line}: duplicate key {shorten(key)} (first on line {first_line})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one, so a
    second `budget:` block would silently replace the first). Keys a merge (`<<: *base`) brings in
    may still be overridden."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    if key in first:
                        raise _DuplicateKey(key, line, first[key])
                    first[key] = line
                except TypeError:  # an unhashable key: SafeLoader refuses it below
                    continue
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str, source: str) -> Any:
    """The document's values (safe tags only), refusing duplicate keys; one ConfigError line."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: plain YAML types only
    except _DuplicateKey as exc:
        raise ConfigError(f"{source} {exc}") from None
    except yaml.YAMLError as exc:  # e.g. a !!python/object tag: SafeLoader constructs no objects
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{source}{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None


def _yaml_lines(root: yaml.Node | None, source: str = "<string>") -> dict[tuple, int]:
    """Map key paths (tuples of keys/indices) to 1-based YAML line numbers, for error messages.

    Refuses any string longer than MAX_STRING (a 10 MB option value would otherwise be carried into
    every trial and echoed in every message). ``root`` must come from :func:`_compose` (bounded).
    """
    lines: dict[tuple, int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                p = (*path, key.value if isinstance(key, yaml.ScalarNode) else str(key.start_mark.line))
                lines[p] = key.start_mark.line + 1
                walk(key, p)
                walk(value, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[(*path, i)] = item.start_mark.line + 1
                walk(item, (*path, i))
        elif len(node.value) > MAX_STRING:
            raise ConfigError(
                f"{source} line {node.start_mark.line + 1}: {_format_loc(path)}: a value of "
                f"{len(node.value):,} characters; at most {MAX_STRING:,} are accepted"
            )

    if root is not None:
        walk(root, ())
    return lines


def _locate(loc: tuple, lines: dict[tuple, int | str]) -> str:
    # pydantic adds union-branch names (e.g. "str", "CellEntry") to paths; drop them for YAML lookup
    path = tuple(
        p for p in loc if isinstance(p, int) or not (p[:1].isupper() or p in ("str", "int", "float"))
    )
    for n in range(len(path), 0, -1):
        if path[:n] in lines:
            where = lines[path[:n]]  # a YAML line, or the override that set this value
            return f" (line {where})" if isinstance(where, int) else f" (from the override `{where}`)"
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


def parse(text: str, source: str = "<string>", overrides: Sequence[str] = ()) -> Experiment:
    """Parse and validate an experiment (schema, bounds, registry names, hyperparameter domains).

    ``overrides`` (``key=value`` strings, see :func:`apply_overrides`) change the document before
    it is validated, so they are checked exactly as the file is, and an error in a value they
    set names the override instead of a line."""
    if len(text) > MAX_FILE_BYTES:
        raise ConfigError(
            f"{source}: {len(text):,} characters; an experiment file is at most {MAX_FILE_BYTES:,}"
        )
    lines = _yaml_lines(_compose(text, source), source)  # bounded before anything expands it
    data = _load_yaml(text, source)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: an experiment file must be a mapping of keys (name, cells, tasks, ...)")
    return _validate(apply_overrides(data, overrides, lines), source, lines)


def parse_mapping(
    data: dict[str, Any], source: str = "<mapping>", overrides: Sequence[str] = ()
) -> Experiment:
    """:func:`parse` for an experiment given as a mapping (the Python API): the same bounds and
    checks; errors name the key path (there is no line to name)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: an experiment must be a mapping of keys (name, cells, tasks, ...)")
    try:
        text = yaml.safe_dump(data, sort_keys=False)  # plain YAML types only, as a file holds
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not plain data (numbers, text, lists, mappings): {exc}") from None
    if len(text) > MAX_FILE_BYTES:
        raise ConfigError(f"{source}: {len(text):,} characters as YAML; at most {MAX_FILE_BYTES:,}")
    _yaml_lines(_compose(text, source), source)  # bounded as a file is
    lines: dict[tuple, int | str] = {}
    return _validate(apply_overrides(_load_yaml(text, source), overrides, lines), source, lines)


def _validate(data: dict[str, Any], source: str, lines: dict[tuple, int | str]) -> Experiment:
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
                fail(
                    ("cells", i, "hparams", key),
                    UnknownNameError(f"hyperparameter of cell {cell.name!r}", key, cls.hparam_names()),
                )
    task_hparams: set[str] = set()
    for i, task in enumerate(e.tasks):
        where = ("tasks", i, "name") if ("tasks", i, "name") in lines else ("tasks", i)
        try:
            cls = reg.task(task.name).cls
            task_hparams |= set(cls.hparam_defaults)
            cls(
                task.dataset, data_path=task.data_path, **task.options
            )  # validates dataset and options; no I/O
        except RnnbenchError as err:
            fail(_overridden_option(lines, i, str(err)) or where, err)
        except Exception as exc:  # a plugin's constructor failing on its own options is its bug, not ours
            fail(
                where,
                ConfigError(
                    f"task {task.name!r} ({reg.task(task.name).source}) raised "
                    f"{type(exc).__name__} checking its options: {exc}"
                ),
            )
        for key in task.hparams:
            if key not in cls.hparam_defaults:
                fail(
                    ("tasks", i, "hparams", key),
                    UnknownNameError(f"hyperparameter of task {task.name!r}", key, cls.hparam_defaults),
                )
    known = set(TRAINER_HPARAMS) | cell_hparams | task_hparams
    for section in ("search", "fixed"):
        for key in getattr(e, section):
            if key not in known:
                fail((section, key), UnknownNameError("hyperparameter", key, known))
    _check_domains(e, reg, fail)


def _overridden_option(lines: dict[tuple, int | str], task: int, message: str) -> tuple | None:
    """The path of an option of task entry ``task`` that an override set and ``message`` names:
    a task checks its options as a whole, so its error points at the entry, not the option."""
    for path, where in lines.items():
        if isinstance(where, str) and path[:3] == ("tasks", task, "options") and len(path) > 3:
            if str(path[3]) in message:
                return path
    return None


def _check_domains(e: Experiment, reg, fail) -> None:
    """Every fixed value and every search range inside the domain of each cell, task or the trainer
    that reads it. A numeric domain is an interval, so a range is checked at its two ends."""
    owners: dict[str, dict[str, Any]] = {k: {"the trainer": d} for k, d in TRAINER_HPARAM_DOMAINS.items()}
    for kind, entries, lookup in (("cell", e.cells, reg.cell), ("task", e.tasks, reg.task)):
        for i, entry in enumerate(entries):
            domains = getattr(lookup(entry.name).cls, "hparam_domains", {}) or {}
            for key, domain in domains.items():
                owners.setdefault(key, {})[f"{kind} {entry.name!r}"] = domain
            for key, value in entry.hparams.items():
                if key in domains and (why := domains[key].problem(value)):
                    fail((f"{kind}s", i, "hparams", key), ConfigError(why))
    for section in ("fixed", "search"):
        for key, value in getattr(e, section).items():
            for owner, domain in owners.get(key, {}).items():
                why = domain.problem(value) if section == "fixed" else domain.search_problem(value)
                if why:
                    by = "" if owner == "the trainer" else f" (as {owner} declares)"
                    fail((section, key), ConfigError(f"{why}{by}"))


def load(path: str | Path, overrides: Sequence[str] = ()) -> Experiment:
    """The experiment file at ``path``, with ``overrides`` (``key=value``) applied, validated."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file {path} does not exist")
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ConfigError(
                f"{path}: {size / 2**20:.1f} MiB; an experiment file is at most {MAX_FILE_BYTES // 2**20} MiB"
            )
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read experiment file {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")  # a BOM from a Windows editor is fine
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path} line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "save the experiment file as UTF-8"
        ) from None
    return parse(text, str(path), overrides)


# ----------------------------------------------------------------------------------------------
# Overrides: `rnnbench run FILE budget.trials=3 cells=[lstm,gru]` (Hydra's spelling, none of Hydra)

MAX_OVERRIDES = 100
_OVERRIDE_KEY = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
# entries that may be written as a bare name (`cells: [gru]`): a dotted key walks into one as
# the mapping it stands for, {name: gru}
_SHORT_FORM = ("cells", "tasks")


def parse_override(text: str) -> tuple[tuple[str | int, ...], Any]:
    """``"budget.trials=3"`` → ``(("budget", "trials"), 3)``: the key's path and the value as
    YAML reads it (``[lstm,gru]`` a list, ``1.0e-3`` a float, ``null`` None, nothing after ``=``
    None too). A digit segment is a list index where the value there is a list."""
    source = f"override `{shorten(text, 60)[1:-1]}`"
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{source}: an override is key=value (e.g. budget.trials=3), not {shorten(text)}")
    if not _OVERRIDE_KEY.fullmatch(key):
        raise ConfigError(
            f"{source}: {shorten(key)} is not a key path: names and list indices joined by dots "
            "(e.g. tasks.0.options.seq_len)"
        )
    if len(value) > MAX_STRING:
        raise ConfigError(f"{source}: a value of {len(value):,} characters; at most {MAX_STRING:,}")
    _yaml_lines(_compose(value, source), source)  # bounded (aliases, depth, strings) before loading
    path = tuple(int(p) if p.isdigit() else p for p in key.split("."))
    return path, _load_yaml(value, source)


def apply_overrides(
    data: dict[str, Any], overrides: Sequence[str], lines: dict[tuple, int | str] | None = None
) -> dict[str, Any]:
    """A copy of the experiment mapping ``data`` with each ``key=value`` of ``overrides`` set, in
    order (a later one wins). Missing mappings on the way are created (``budget.trials=3`` on a
    file without ``budget:``); a bare cell or task name is walked into as ``{name: ...}``
    (``tasks.0.options.seq_len=32`` on ``tasks: [memory]``). Whether a key exists in the schema is
    left to the validation that follows, which then names the override (``lines`` maps each set
    path to its override text, replacing the YAML lines of what it replaced)."""
    if len(overrides) > MAX_OVERRIDES:
        raise ConfigError(f"{len(overrides)} overrides; at most {MAX_OVERRIDES} are accepted")
    data = _unshared(data)
    for text in overrides:
        path, value = parse_override(text)
        source = f"override `{shorten(text, 60)[1:-1]}`"
        node: Any = data
        for depth in range(len(path) - 1):
            node = _step(node, path, depth, source)
        last = path[-1]
        if isinstance(node, list):
            _check_index(node, path, len(path) - 1, source)
            node[last] = value
        else:
            node[str(last)] = value
        if lines is not None:
            where = tuple(str(p) if isinstance(p, int) and not _is_list_step(data, path, i) else p
                          for i, p in enumerate(path))  # fmt: skip
            for known in [k for k in lines if k[: len(where)] == where]:
                del lines[known]  # its YAML lines describe the value the override replaced
            for n in range(1, len(where) + 1):  # and the mappings it created on the way
                lines.setdefault(where[:n], shorten(text, 60)[1:-1])
    return data


def _unshared(value: Any) -> Any:
    """A copy in which no two places share a mapping or list: a YAML alias (``*base``) is one
    object in two places, and an override of one place must not change the other."""
    if isinstance(value, dict):
        return {k: _unshared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unshared(v) for v in value]
    return value


def _is_list_step(data: Any, path: tuple, index: int) -> bool:
    node = data
    for part in path[:index]:
        node = node[part] if isinstance(node, list) else node.get(str(part))
    return isinstance(node, list)


def _check_index(node: list, path: tuple, depth: int, source: str) -> None:
    part = path[depth]
    where = ".".join(map(str, path[:depth])) or "(top level)"
    if not isinstance(part, int):
        raise ConfigError(f"{source}: {where} is a list: index it by number ({where}.0), not {part!r}")
    if part >= len(node):
        raise ConfigError(
            f"{source}: {where} has {len(node)} entr{'y' if len(node) == 1 else 'ies'}; "
            f"index {part} is out of range (indices start at 0)"
        )


def _step(node: Any, path: tuple, depth: int, source: str) -> Any:
    """The value at ``path[depth]`` under ``node``, as a mapping or list to walk further into."""
    part = path[depth]
    where = ".".join(map(str, path[: depth + 1]))
    if isinstance(node, list):
        _check_index(node, path, depth, source)
        child = node[part]
        if isinstance(child, str) and depth == 1 and path[0] in _SHORT_FORM:
            child = node[part] = {"name": child}  # `- gru` stands for `- {name: gru}`
    else:
        child = node.get(str(part))
        if child is None:
            child = node[str(part)] = {}
    if not isinstance(child, (dict, list)):
        raise ConfigError(
            f"{source}: {where} is {shorten(child)}, not a mapping: there is no "
            f"{'.'.join(map(str, path))} to set"
        )
    return child
