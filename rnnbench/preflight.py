"""Pre-flight: everything a run needs, tried once at a tiny size before any store exists.

``rnnbench run`` calls :func:`check_experiment` after validating the experiment file and before
the MLflow store, the Optuna journal or the run lock are created. It

- loads every dataset the experiment names (``setup()`` once per distinct task entry), so a NaN in
  a CSV or a missing column is one line with exit code 2, and nothing is written;
- builds every (cell, task, variant) with hidden size 4 and runs one forward and backward pass on a
  batch of 2, checking the Cell and Task contracts on the way: shapes, dtypes and devices of
  outputs and states, a finite scalar loss, and gradients reaching every parameter of the cell
  (the task's side, its metrics, first batch, model and training step, through the checks of
  :mod:`rnnbench.testing`: one implementation, so a run and ``rnnbench check`` name a rule alike);
- moves every searched hyperparameter across its search range in every study, tiny, and refuses a
  knob that changes neither the model's training loss nor the optimizer (:func:`inert_knobs`):
  a sweep would spend its trials on it and the importance table would credit it with noise.

A plugin that breaks a rule is refused with a :class:`ContractError` naming its distribution, entry
point, class and the rule, in seconds instead of failing every trial of its budget. ``rnnbench
check`` runs the same checks on every installed cell and task, plus a deeper Task check on the
task's synthetic data (:func:`check_task`: :func:`rnnbench.testing.check_task_contract`, the checks
plugin authors run in their tests, at a tiny size).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from rnnbench.cells.base import build_cell
from rnnbench.devices import resolve_device
from rnnbench.encoder import Encoder
from rnnbench.errors import ConfigError, ContractError, DataError, RnnbenchError, clip_message, shorten
from rnnbench.plugins import get_cell, registry
from rnnbench.task import declares_items
from rnnbench.testing import (
    ContractViolation,
    _built_model,
    _check_metric_declarations,
    _check_training_step,
    _first_batch,
    check_task_contract,
)
from rnnbench.trainer import make_optimizer, seed_everything, split_hparams

TINY_BATCH, TINY_INPUT, TINY_HIDDEN, TINY_STEPS = 2, 3, 4, 5
REFERENCE_CELL = "lstm"  # the builtin cell a task plugin is checked with (its state is a tuple)
# check_task's tolerance for evaluate at two batch sizes: looser than rnnbench.testing's CPU one,
# as it may run on a GPU, where TF32 kernels round more (a real bug is orders of magnitude larger)
CONTRACT_TOL = 1e-4
SEED_LEVEL_ONLY = "seed-level statistics only (the task declares no per-item outcomes: evaluate_items)"


class _Broken(Exception):
    """One rule of the contract, broken; turned into a ContractError naming the plugin."""


def _rule(broken: _Broken | ContractViolation) -> str:
    """The broken rule in one line: the task checks shared with rnnbench.testing raise its
    ContractViolation, whose message names the task; the pre-flight names the plugin instead."""
    return broken.rule if isinstance(broken, ContractViolation) else str(broken)


@contextmanager
def _step(what: str) -> Iterator[None]:
    """Name the contract method being called, so an exception inside it says where it came from."""
    try:
        yield
    except (RnnbenchError, _Broken):
        raise
    except Exception as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), "")
        raise _Broken(f"{what} raised {type(exc).__name__}: {first}") from exc


def _contract(kind: str, entry, rule: str) -> ContractError:
    return ContractError(
        clip_message(
            f"{kind} {entry.name!r} ({entry.origin}) breaks the {kind.capitalize()} contract: {rule}"
        )
    )


# -- cells ----------------------------------------------------------------------------------------
def check_cell(
    entry, hparams: dict[str, Any] | None = None, *, device=None, layers: int = 2, bidirectional: bool = True
) -> None:
    """The Cell contract, on ``entry`` (a registry entry) built with ``hparams``: alone, then in an
    encoder of ``layers`` layers (both directions if ``bidirectional``) with padded sequences."""
    device = torch.device(device or "cpu")
    try:
        _cell_alone(entry.cls, dict(hparams or {}), device)
        _cell_in_encoder(entry.cls, dict(hparams or {}), device, layers, bidirectional)
    except ConfigError as err:  # the cell refused a hyperparameter value: the experiment's mistake
        raise ConfigError(f"cell {entry.name!r}: {err}") from None
    except _Broken as rule:
        raise _contract("cell", entry, str(rule)) from None


def _tensors(state) -> list[Tensor] | None:
    if isinstance(state, Tensor):
        return [state]
    if isinstance(state, tuple) and state and all(isinstance(s, Tensor) for s in state):
        return list(state)
    return None


def _check_state(state, what: str, like=None, *, device) -> None:
    parts = _tensors(state)
    if parts is None:
        raise _Broken(f"{what} must be a tensor or a tuple of tensors, got {_kind(state)}")
    for t in parts:
        if t.dim() != 2 or t.shape[0] != TINY_BATCH:
            raise _Broken(
                f"{what} must hold tensors of shape [batch, n] = [{TINY_BATCH}, n], got {list(t.shape)}"
            )
        if t.dtype != torch.float32 or t.device.type != device.type:
            raise _Broken(
                f"{what} must be float32 on {device.type} as asked, got {t.dtype} on {t.device.type}"
            )
    if like is not None:
        before = [list(t.shape) for t in _tensors(like)]
        after = [list(t.shape) for t in parts]
        if type(state) is not type(like) or before != after:
            raise _Broken(
                f"{what} must have the structure and shapes of the state it got: {before}, got {after}"
            )


def _check_output(out, state, what: str, *, device) -> tuple[Tensor, Any]:
    if not (isinstance(out, tuple) and len(out) == 2):
        raise _Broken(f"{what} must return (h_t, new_state), got {_kind(out)}")
    h, new = out
    if not isinstance(h, Tensor) or list(h.shape) != [TINY_BATCH, TINY_HIDDEN]:
        got = list(h.shape) if isinstance(h, Tensor) else _kind(h)
        raise _Broken(
            f"{what} must return h_t of shape [batch, hidden] = [{TINY_BATCH}, {TINY_HIDDEN}], got {got}"
        )
    if h.dtype != torch.float32:
        raise _Broken(f"{what} must return h_t in the input's dtype float32, got {h.dtype}")
    if not bool(torch.isfinite(h).all()):
        raise _Broken(f"{what} returned non-finite values from a random input and a zero state")
    _check_state(new, f"the new state of {what}", like=state, device=device)
    return h, new


def _cell_alone(cls: type, hparams: dict[str, Any], device: torch.device) -> None:
    with _step(f"__init__({TINY_INPUT}, {TINY_HIDDEN})"):
        cell = build_cell(cls, TINY_INPUT, TINY_HIDDEN, **hparams)
    cell.to(device)
    params = [(n, p) for n, p in cell.named_parameters() if p.requires_grad]
    if not params:
        raise _Broken("the cell has no trainable parameters (nn.Parameter or layers built in __init__)")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(TINY_BATCH, 2, TINY_INPUT, generator=generator).to(device)
    with _step(f"init_state({TINY_BATCH}, device=..., dtype=float32)"):
        state = cell.init_state(TINY_BATCH, device=device, dtype=torch.float32)
    _check_state(state, f"init_state({TINY_BATCH})", device=device)
    with _step("forward(x_t, state)"):
        h1, s1 = _check_output(cell(x[:, 0], state), state, "forward(x_t, state)", device=device)
    with _step("forward(x_t, state) from its own new state"):
        h2, _ = _check_output(cell(x[:, 1], s1), state, "forward(x_t, state)", device=device)
    if hasattr(cell, "project_input") and hasattr(cell, "forward_projected"):
        with _step("project_input(x) on [batch, time, input]"):
            projected = cell.project_input(x)
        if not isinstance(projected, Tensor) or list(projected.shape[:2]) != [TINY_BATCH, 2]:
            raise _Broken("project_input(x) must keep the leading dimensions of x ([batch, time, ...])")
        with _step("forward_projected(project_input(x_t), state)"):  # from a non-zero state
            hp, _ = _check_output(
                cell.forward_projected(projected[:, 1], s1), state, "forward_projected", device=device
            )
        if not torch.allclose(hp, h2, rtol=1e-4, atol=1e-5):
            raise _Broken("forward(x_t, state) must equal forward_projected(project_input(x_t), state)")
    with _step("backward through two steps"):
        (h1.sum() + h2.sum()).backward()
    if missing := [n for n, p in params if p.grad is None]:
        raise _Broken(f"parameters {missing} get no gradient from h_t over two steps (unused, or detached)")
    if bad := [n for n, p in params if not bool(torch.isfinite(p.grad).all())]:
        raise _Broken(f"parameters {bad} get non-finite gradients")


def _cell_in_encoder(cls: type, hparams: dict[str, Any], device, layers: int, bidirectional: bool) -> None:
    with _step(f"the encoder ({layers} layers{', bidirectional' if bidirectional else ''})"):
        encoder = Encoder(cls, TINY_INPUT, TINY_HIDDEN, layers, bidirectional, **hparams).to(device)
        x = torch.randn(TINY_BATCH, TINY_STEPS, TINY_INPUT, generator=torch.Generator().manual_seed(1)).to(
            device
        )
        lengths = torch.tensor([TINY_STEPS, TINY_STEPS - 2])
        out, finals = encoder(x, lengths)
    directions = 2 if bidirectional else 1
    if (
        list(out.shape) != [TINY_BATCH, TINY_STEPS, TINY_HIDDEN * directions]
        or len(finals) != layers * directions
    ):
        raise _Broken(f"the encoder's output has shape {list(out.shape)} with {len(finals)} final states")
    if bool((out[1, TINY_STEPS - 2 :] != 0).any()) or not bool(torch.isfinite(out).all()):
        raise _Broken(
            "in an encoder with padded sequences, outputs must be finite and padding must stay zero"
        )
    with _step("backward through the encoder"):
        out.sum().backward()
    if missing := [n for n, p in encoder.named_parameters() if p.requires_grad and p.grad is None]:
        raise _Broken(f"in a {layers}-layer encoder, parameters {missing} get no gradient")


# -- tasks ----------------------------------------------------------------------------------------
def check_task(entry, *, device=None) -> str | None:
    """The Task contract (:func:`rnnbench.testing.check_task_contract`, the checks plugin authors
    run in their tests) on ``entry``'s synthetic dataset with default options, at pre-flight size:
    the reference cell at hidden size 4, one training step on a batch of 2 (loss and gradients
    checked, nothing updated, as the pre-flight of a run does), then the valid split
    evaluated at batch sizes 8 (twice) and 3 within CONTRACT_TOL. The first broken rule becomes a
    one-line ContractError naming the plugin. Returns a note for the user (a task without items
    gets seed-level statistics only), or None."""
    try:
        check_task_contract(
            entry.cls,
            cell=REFERENCE_CELL,
            hidden_size=TINY_HIDDEN,
            train_steps=0,  # the checked first step alone: Adam would import torch._dynamo (seconds)
            batch_size=TINY_BATCH,
            batch_sizes=(8, 3),
            splits=("valid",),
            device=device or "cpu",
            rel_tol=CONTRACT_TOL,
            abs_tol=CONTRACT_TOL,
        )
    except ConfigError as err:
        raise ConfigError(f"task {entry.name!r}: {err}") from None
    except ContractViolation as broken:
        raise _contract("task", entry, broken.rule) from None
    return None if declares_items(entry.cls) else SEED_LEVEL_ONLY


# -- an experiment --------------------------------------------------------------------------------
@dataclass
class Summary:
    datasets: int
    models: int
    seconds: float
    tasks: dict[str, Any] = field(default_factory=dict, repr=False)  # set-up tasks, by task entry
    warnings: list[str] = field(default_factory=list)  # refusals that skip_invalid let through

    def line(self) -> str:
        """The summary line, then one ``warning:`` line for each refusal skip_invalid let through."""
        summary = (
            f"pre-flight: {self.datasets} dataset(s) loaded and checked, {self.models} model(s) built and "
            f"trained one step ({self.seconds:.1f} s)"
        )
        return "\n".join([summary, *(f"warning: {w}" for w in self.warnings)])


def _tiny_hparams(study) -> dict[str, Any]:
    """The study's fixed values, the low end (or first choice) of each searched one, hidden size 4.
    A searched value overrides a cell's or task's fixed one, as in the trials (runner._hparams)."""
    searched = {
        k: spec.choices[0] if spec.type == "categorical" else spec.low
        for k, spec in study.experiment.search.items()
    }
    return {**study.fixed_hparams, **searched, "hidden_size": TINY_HIDDEN}


@contextmanager
def _one_thread() -> Iterator[None]:
    # Tiny models gain nothing from threads, and on a busy machine OpenMP threads spin and wait.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def check_experiment(experiment, studies, *, device: str | None = None) -> Summary:
    """Load every dataset of ``studies`` and run each (cell, task, variant) once, tiny. Raises
    DataError, ConfigError or ContractError (all exit code 2) before anything is written."""
    with _one_thread():
        return _check_experiment(experiment, studies, device)


def _check_experiment(experiment, studies, device: str | None) -> Summary:
    started = time.perf_counter()
    target = resolve_device(device or experiment.device)
    reg = registry()
    tasks: dict[str, Any] = {}
    checked_cells: set[str] = set()
    first: dict[str, Any] = {}
    inert: list[tuple[str, str, str, str]] = []  # (knob, architecture, task, reason) skip_invalid lets by
    for study in studies:
        entry = study.task_entry
        key = json.dumps(entry.model_dump(), sort_keys=True, default=str)
        if key in tasks:
            continue
        task_entry = reg.task(entry.name)
        label = entry.label or f"{entry.name}-{entry.dataset}"
        try:
            with _step("setup()"):
                task = study.make_task()
                task.setup()
            _check_metric_declarations(task)
            # read once per task entry: bucketing a large split is slow
            first[key] = batch = _first_batch(task, TINY_BATCH, target, seed=0)
            if batch is None:
                raise DataError(f"task {task.name!r}: the train split yields no batch")
        except DataError as err:
            raise DataError(f"task {label}: {err}") from None
        except (_Broken, ContractViolation) as broken:
            if task_entry.source == "builtin":
                raise (broken.__cause__ or broken) from None  # a bug of ours: report it as one
            raise _contract("task", task_entry, _rule(broken)) from None
        tasks[key] = task
    models = 0
    for study in studies:
        arch = study.arch
        cell_entry, task_entry = reg.cell(arch.cell), reg.task(study.task_entry.name)
        key = json.dumps(study.task_entry.model_dump(), sort_keys=True, default=str)
        task = tasks[key]
        hparams = _tiny_hparams(study)
        _, cell_hp, _ = split_hparams(hparams, cell_entry.cls, task)
        cell_key = json.dumps(
            [arch.cell, cell_hp, arch.layers, arch.bidirectional], sort_keys=True, default=str
        )
        if cell_key not in checked_cells:
            check_cell(
                cell_entry, cell_hp, device=target, layers=arch.layers, bidirectional=arch.bidirectional
            )
            checked_cells.add(cell_key)
        seed_everything(0)
        try:
            task.check_architecture(bidirectional=arch.bidirectional)
            model = _built_model(task, arch, hparams)
            _check_training_step(task, model.to(target), first[key])
            # without a search (trials: 0) nothing searched is ever drawn
            found = inert_knobs(study, task, first[key], target) if study.budget.trials else []
        except (_Broken, ContractViolation) as broken:
            # The cell passed its own checks above, so what breaks here is the task's (or ours).
            rule = f"{study.name}: {_rule(broken)}"
            if task_entry.source != "builtin":
                raise _contract("task", task_entry, rule) from None
            if cell_entry.source != "builtin":
                raise _contract("cell", cell_entry, rule) from None
            raise (broken.__cause__ or broken) from None
        models += 1
        task_label = study.task_entry.label or f"{study.task_entry.name}-{study.task_entry.dataset}"
        for knob, reason in found:
            if not experiment.skip_invalid:
                line = _inert_lines([(knob, arch.label, task_label, reason)])[0]
                raise ConfigError(f"{line} (or set skip_invalid: true to run it anyway)")
            inert.append((knob, arch.label, task_label, reason))
    return Summary(len(tasks), models, time.perf_counter() - started, tasks, _inert_lines(inert))


# -- searched knobs that act ----------------------------------------------------------------------
# Trainer hyperparameters by how a change of them shows. The model's: its training loss changes.
MODEL_KNOBS = ("dropout",)
# make_optimizer's: the optimizer it builds changes (its class or a param group's settings).
OPTIMIZER_KNOBS = ("optimizer", "lr", "weight_decay", "momentum")
# Acting by construction, with the reason: the tiny model and one loss cannot show them.
ACTING_KNOBS = {
    "batch_size": "the trainer cuts the training data into batches of it",
    "clip_norm": "the trainer clips the gradient norm to it",
    "lr_schedule": "the trainer changes the learning rate over the steps by it",
    "warmup_steps": "the trainer warms the learning rate up over them",
    "hidden_size": "it sets the encoder's width (the pre-flight builds width 4)",
}
MAX_ALTERNATIVES = 4  # values of a categorical knob tried against its first choice
# How to make an inert knob act, where we know a way.
KNOB_FIXES = {
    "momentum": "search it with optimizer sgd or rmsprop (adam and adamw do not read it)",
    "dropout": "search it with layers >= 2 (the encoder drops only between layers; this task's model "
    "applies none of its own)",
}


def _range_ends(spec) -> list[Any]:
    """The values a knob moves to from its low end (or first choice), as a trial could draw them."""
    if spec.type == "categorical":
        first = spec.choices[0]
        return [c for c in spec.choices[1:] if c != first][:MAX_ALTERNATIVES]
    high = spec.high
    if spec.type == "int" and not spec.log:
        high = spec.low + (spec.high - spec.low) // spec.step * spec.step  # the step grid's top
    return [high] if high != spec.low else []


def inert_knobs(study, task, batch, device) -> list[tuple[str, str]]:
    """(knob, reason) for each searched hyperparameter that changes nothing in ``study``'s model.

    Each knob moves from its low end to its high end (a categorical one from its first choice to
    the others) with everything else at the low end; a knob that still changes nothing there gets
    a second chance with each other searched knob moved (momentum acts when optimizer sgd is one
    of the choices). Acting means a different optimizer for make_optimizer's knobs, and for every
    other knob a different training loss on one batch: the model rebuilt from the same init seed
    and its dropout masks drawn from the same seed, so only the knob differs."""
    search = {k: spec for k, spec in study.experiment.search.items() if k not in ACTING_KNOBS}
    base = _tiny_hparams(study)
    cell = get_cell(study.arch.cell)
    arch = study.arch
    seen: dict[str, Any] = {}

    def effect(name: str, hparams: dict[str, Any]) -> Any:
        key = json.dumps([name in OPTIMIZER_KNOBS, hparams], sort_keys=True, default=str)
        if key in seen:
            return seen[key]
        if name in OPTIMIZER_KNOBS:  # what the optimizer does, without the parameters it updates
            hp = split_hparams(hparams, cell, task)[0]
            optimizer = make_optimizer([nn.Parameter(torch.zeros(1))], hp)
            groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            seen[key] = (type(optimizer).__name__, groups)
        else:
            seed_everything(0)
            model = _built_model(task, arch, hparams)
            model.to(device).train()
            torch.manual_seed(1)
            with torch.no_grad(), _step(f"training_loss(model, batch, None) at {shorten(hparams, 200)}"):
                seen[key] = float(task.training_loss(model, batch, None)[0])
        return seen[key]

    def acts(name: str, context: dict[str, Any]) -> bool:
        return any(
            effect(name, {**context, name: value}) != effect(name, context)
            for value in _range_ends(search[name])
        )

    inert = []
    for name, spec in search.items():
        if not _range_ends(spec):
            continue  # one value: nothing to move
        contexts = [base] + [
            {**base, other: value}
            for other, other_spec in search.items()
            if other != name
            for value in _range_ends(other_spec)
        ]
        if any(acts(name, context) for context in contexts):
            continue
        low = spec.choices[0] if spec.type == "categorical" else spec.low
        ends = ", ".join(repr(v) for v in _range_ends(spec))
        what = "optimizer" if name in OPTIMIZER_KNOBS else "training loss"
        fix = KNOB_FIXES.get(name, "remove it from search")
        if name == "dropout" and arch.layers > 1:
            fix = "remove it from search"  # between-layer dropout would act: something else is wrong
        inert.append((name, f"{name} {low!r} and {ends} give the same {what}; {fix}, or fix it"))
    return inert


def _inert_lines(found: list[tuple[str, str, str, str]]) -> list[str]:
    """One line per (knob, task, reason), naming every architecture it holds for."""
    by_reason: dict[tuple[str, str, str], list[str]] = {}
    for knob, arch, task, reason in found:
        by_reason.setdefault((knob, task, reason), []).append(arch)
    return [
        f"searched {knob!r} changes nothing in {', '.join(archs)} on {task}: {reason}"
        for (knob, task, reason), archs in by_reason.items()
    ]


# -- every installed plugin -----------------------------------------------------------------------
@dataclass
class Verdict:
    kind: str
    name: str
    origin: str
    seconds: float
    error: str | None = None
    note: str | None = None  # worth telling the user although nothing is broken


def check_installed(*, device: str = "cpu") -> list[Verdict]:
    """:func:`check_cell` on every registered cell and :func:`check_task` on every task."""
    reg = registry()
    target = resolve_device(device)
    verdicts = []
    with _one_thread():
        _check_all(reg, target, verdicts)
    return verdicts


def _check_all(reg, target, verdicts: list[Verdict]) -> None:
    for kind, entries, check in (("cell", reg.cells, check_cell), ("task", reg.tasks, check_task)):
        for entry in entries.values():
            started = time.perf_counter()
            error = note = None
            try:
                note = check(entry, device=target)
            except RnnbenchError as err:
                error = str(err)
            verdicts.append(
                Verdict(kind, entry.name, entry.origin, time.perf_counter() - started, error, note)
            )


def _kind(value) -> str:
    if isinstance(value, tuple):
        return f"a tuple of {len(value)}"
    return type(value).__name__
