"""Contract checks for task authors: call them from your plugin's own tests (public API).

::

    from rnnbench.testing import check_task_contract

    def test_my_task_keeps_the_rnnbench_contract():
        check_task_contract(MyTask)              # on its synthetic dataset, CPU, a few seconds

Each check raises :class:`ContractViolation` (an AssertionError) with a readable one-line message,
so it works under pytest or any runner. ``rnnbench check`` and the pre-flight run these very checks
at a tiny size (:func:`rnnbench.preflight.check_task`), so a task that passes here passes there.
The central rule (see :mod:`rnnbench.task`): ``evaluate`` scores every position of a split exactly
once and gives the same numbers whatever batch size it is called with, because the evaluation
batch size follows the searched training batch size and must not change what is measured. A task
that declares per-item outcomes (``evaluate_items``) must also give items that add up to its
metrics (:func:`check_item_outcomes`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from rnnbench.encoder import Encoder
from rnnbench.errors import RnnbenchError, shorten
from rnnbench.models import serve
from rnnbench.task import Batch, Metric, Task, declares_items
from rnnbench.trainer import Architecture, build_model

__all__ = [
    "ContractViolation",
    "check_evaluate_batch_independence",
    "check_item_outcomes",
    "check_task_contract",
]
# How far two evaluations of one model may differ: float rounding of batched kernels on a CPU. A
# dropped batch, a per-batch mean or padding read as data is far larger. On a GPU with TF32
# (cuDNN's default) pass a looser rel_tol.
REL_TOL, ABS_TOL = 1e-5, 1e-6
REPLICATES = 4  # resamples the vectorised check of metrics_from_sums draws
VECTOR_RTOL = 1e-9  # metrics_from_sums on [R] sums against one replicate: the same float64 arithmetic
MLFLOW_PARAM_KEY = re.compile(r"^[\w\-. /]+$")  # what MLflow accepts as a param name
MLFLOW_PARAM_VALUE = 6000  # characters MLflow keeps of a param value


class ContractViolation(AssertionError):
    """A task breaks one rule of its contract. ``rule`` is that rule in one line; the message names
    the task too (the pre-flight names the plugin instead, so it reads ``rule``)."""

    def __init__(self, task: Task | type[Task], rule: str):
        self.rule = rule
        super().__init__(f"task {_name(task)!r}: {rule}")


@contextmanager
def _calling(task: Task | type[Task], what: str, hint: str = "") -> Iterator[None]:
    """Name the task method being called, so an exception inside it says where it came from.
    rnnbench's own errors (a refused option, unreadable data) pass unchanged."""
    try:
        yield
    except (ContractViolation, RnnbenchError):
        raise
    except Exception as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), "")
        raise ContractViolation(task, f"{what} raised {type(exc).__name__}: {first}{hint}") from exc


# -- the whole contract ---------------------------------------------------------------------------
def check_task_contract(
    task: Task | type[Task],
    *,
    cell: str = "lstm",
    hidden_size: int = 16,
    hparams: dict[str, Any] | None = None,
    train_steps: int = 30,
    batch_size: int = 16,
    batch_sizes: Sequence[int] = (1, 7, 64),
    splits: Sequence[str] = ("valid", "test"),
    seed: int = 0,
    device: str | torch.device = "cpu",
    rel_tol: float = REL_TOL,
    abs_tol: float = ABS_TOL,
) -> dict[str, dict[int, dict[str, float]]]:
    """Check a task end to end on a small model: declarations, training, serving, evaluation rules.

    ``task`` is a Task subclass (built on its ``synthetic`` dataset with ``seed``) or an instance
    (for other datasets or options). The check reads its metrics (a non-empty tuple of
    :class:`rnnbench.Metric`, distinct names), sets it up, builds a ``cell`` encoder of
    ``hidden_size`` through the trainer's own model builder (``hparams`` over the trainer's and the
    task's defaults), checks one training step on a batch of ``batch_size`` (a finite scalar loss
    whose gradient reaches the encoder), then trains ``train_steps`` Adam steps so that the model
    reads its context (0: the checked step alone). It runs the serving form on the serving example,
    then on each of ``splits`` :func:`check_evaluate_batch_independence`,
    :func:`check_item_outcomes` (at the two largest batch sizes) and the baseline (its keys are
    metric names); last, ``describe()`` must fit MLflow params. Returns the scores per split and
    batch size.
    """
    device = torch.device(device)
    if isinstance(task, type):
        if "synthetic" not in task.datasets:
            raise ContractViolation(task, "'synthetic' must be one of its datasets (tests run on it)")
        with _calling(task, "__init__('synthetic')"):
            task = task("synthetic", seed=seed)
    _check_metric_declarations(task)
    with _calling(task, "check_architecture(bidirectional=False)"):
        task.check_architecture(bidirectional=False)  # before setup(), as the experiment parser calls it
    with _calling(task, "setup()"):
        task.setup()
    torch.manual_seed(seed)
    model = _built_model(
        task, Architecture(cell), {"hidden_size": hidden_size, "dropout": 0.0, **(hparams or {})}
    )
    batch = _first_batch(task, batch_size, device, seed)
    if batch is None:
        raise ContractViolation(task, f"batches('train', {batch_size}) yielded no batch")
    _check_training_step(task, model.to(device), batch)
    if train_steps:
        _train_briefly(task, model, steps=train_steps, batch_size=batch_size, seed=seed, device=device)
    _check_serving(task, model.eval().cpu())
    model.to(device)
    largest = sorted(set(batch_sizes))[-2:]  # evaluate's check covers the others, and batch size 1 is slow
    scores = {}
    for split in splits:
        scores[split] = check_evaluate_batch_independence(
            task, model, split=split, batch_sizes=batch_sizes, device=device, rel_tol=rel_tol, abs_tol=abs_tol
        )
        check_item_outcomes(
            task, model, split=split, batch_sizes=largest, device=device, rel_tol=rel_tol, abs_tol=abs_tol
        )
        _check_baseline(task, split)
    _check_describe(task)
    return scores


# -- evaluation -----------------------------------------------------------------------------------
def check_evaluate_batch_independence(
    task: Task,
    model: nn.Module,
    *,
    split: str = "valid",
    batch_sizes: Sequence[int] = (1, 7, 64),
    device: str | torch.device = "cpu",
    rel_tol: float = REL_TOL,
    abs_tol: float = ABS_TOL,
) -> dict[int, dict[str, float]]:
    """Evaluate ``model`` on ``split`` at every batch size and assert that nothing measured changes.

    Checks that each call returns every metric of ``task.metrics`` (and anything else) as a
    finite float; that the largest batch size, evaluated twice, gives the same scores (batches may
    be iterated more than once); that all the values agree within ``rel_tol``/``abs_tol``
    (:data:`REL_TOL`, :data:`ABS_TOL`); and that the evaluation batches (``task.batches(split, b)``
    without a generator) cover the same number of positions. Pick batch sizes that do not divide
    the split's size, so an uneven last batch shows. ``task`` must be set up. Returns the scores per
    batch size.
    """
    device = torch.device(device)

    def close(a: float, b: float) -> bool:
        return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)

    repeated = max(batch_sizes)  # the cheapest evaluation to repeat
    with _evaluating(model):
        once = _evaluate(task, model, split, repeated, device)
        twice = _evaluate(task, model, split, repeated, device)
        scores = {b: once if b == repeated else _evaluate(task, model, split, b, device) for b in batch_sizes}
    if set(twice) != set(once) or not all(close(twice[k], once[k]) for k in once):
        changed = next((k for k in once if k in twice and not close(twice[k], once[k])), None)
        what = (
            f"{split} {changed}: {once[changed]:.8g}, then {twice[changed]:.8g}"
            if changed is not None
            else "its keys"
        )
        raise ContractViolation(
            task,
            f"evaluate must give the same scores when called twice ({what} at batch size {repeated}); "
            "batches may be iterated more than once",
        )
    positions = {
        b: sum(batch.tokens for batch in _checked_batches(task, split, b, device)) for b in batch_sizes
    }
    if len(set(positions.values())) > 1:
        raise ContractViolation(
            task,
            f"the {split} evaluation batches cover a different number of positions at each batch size "
            f"({_per_size(positions)}): every position must be scored exactly once",
        )
    first = batch_sizes[0]
    if any(set(result) != set(scores[first]) for result in scores.values()):
        raise ContractViolation(task, "evaluate returns different keys at different batch sizes")
    for key in scores[first]:  # every number evaluate returns is logged, not only the declared metrics
        values = {b: scores[b][key] for b in batch_sizes}
        if not all(close(v, values[first]) for v in values.values()):
            raise ContractViolation(
                task,
                f"{split} {key} depends on the evaluation batch size ({_per_size(values)}); evaluate "
                "must give the same result whatever batch size it is called with (sum over items and "
                "divide once; no padding, dropped or partial batches)",
            )
    return scores


def _evaluate(task: Task, model: nn.Module, split: str, batch_size: int, device) -> dict[str, float]:
    """``task.evaluate`` once, its result checked: every metric, and every value a finite float."""
    what = f"evaluate(model, {split!r}, {batch_size})"
    with _calling(task, what):
        result = task.evaluate(model, split, batch_size, device=device)
    if not isinstance(result, dict):
        raise ContractViolation(
            task, f"{what} must return a dict of metric name -> float, got {_kind(result)}"
        )
    if missing := [m.name for m in task.metrics if m.name not in result]:
        raise ContractViolation(
            task, f"{what} is missing metrics {missing} (got {shorten(list(result), 200)})"
        )
    for key, value in result.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ContractViolation(
                task, f"{what}: metric {key!r} must be a finite Python float, got {value!r}"
            )
    return result


# -- per-item outcomes ----------------------------------------------------------------------------
def check_item_outcomes(
    task: Task,
    model: nn.Module,
    *,
    split: str = "valid",
    batch_sizes: Sequence[int] = (1, 7),
    device: str | torch.device = "cpu",
    rel_tol: float = REL_TOL,
    abs_tol: float = ABS_TOL,
) -> pd.DataFrame | None:
    """Check ``evaluate_items`` and ``metrics_from_sums`` of ``model`` on ``split``; None (and nothing
    checked) when the task declares no items.

    Asserts that ``evaluate_items`` returns a non-empty DataFrame of integer or float columns, with
    the same rows and values (within ``rel_tol``/``abs_tol``) at every batch size; that
    ``metrics_from_sums`` of the columns' sums (in float64) gives every metric of ``task.metrics``
    and agrees with ``evaluate`` on every key both return; and that on sums of shape ``[R]``
    (``R`` resamples of the rows, the first the split itself) it returns arrays of shape ``[R]``
    equal to its result on each replicate alone. ``task`` must be set up. Returns the item table.
    """
    if not declares_items(task):
        return None
    device = torch.device(device)
    items = {}
    with _evaluating(model):
        for batch_size in batch_sizes:
            with _calling(task, f"evaluate_items(model, {split!r}, {batch_size})"):
                items[batch_size] = task.evaluate_items(model, split, batch_size, device=device)
        scores = _evaluate(task, model, split, batch_sizes[0], device)
    for batch_size, table in items.items():
        where = f"evaluate_items(model, {split!r}, {batch_size})"
        if not isinstance(table, pd.DataFrame) or table.empty:
            raise ContractViolation(
                task, f"{where} must return a non-empty pandas DataFrame, got {_kind(table)}"
            )
        if not_numeric := [c for c in table.columns if table[c].dtype.kind not in "iuf"]:
            raise ContractViolation(task, f"{where}: columns {not_numeric} are not integer or float columns")
    first = items[batch_sizes[0]]
    for batch_size, table in items.items():
        if list(table.columns) != list(first.columns) or len(table) != len(first):
            raise ContractViolation(
                task,
                f"evaluate_items gives {len(first)} rows of {list(first.columns)} at batch size "
                f"{batch_sizes[0]} but {len(table)} rows of {list(table.columns)} at {batch_size}",
            )
        for column in first.columns:
            a, b = first[column].to_numpy(np.float64), table[column].to_numpy(np.float64)
            if not np.allclose(a, b, rtol=rel_tol, atol=abs_tol):
                row = int(np.argmax(~np.isclose(a, b, rtol=rel_tol, atol=abs_tol)))
                raise ContractViolation(
                    task,
                    f"{split} item {row} has {column} = {a[row]:.6g} at batch size {batch_sizes[0]} but "
                    f"{b[row]:.6g} at {batch_size}: items must not depend on the batch size, and keep "
                    "the split's order",
                )
    values = {c: first[c].to_numpy(np.float64) for c in first.columns}
    with _calling(task, "metrics_from_sums(sums of evaluate_items)"):
        whole = task.metrics_from_sums({c: np.array(v.sum()) for c, v in values.items()})
    if missing := [m.name for m in task.metrics if m.name not in whole]:
        raise ContractViolation(task, f"metrics_from_sums is missing metrics {missing}")
    for key in sorted(set(whole) & set(scores)):
        got = np.asarray(whole[key])
        if got.shape != () or not math.isclose(float(got), scores[key], rel_tol=rel_tol, abs_tol=abs_tol):
            raise ContractViolation(
                task,
                f"{split} {key} is {scores[key]:.6g} by evaluate but {got} by metrics_from_sums of the "
                "sums of evaluate_items: the items must add up to the metrics",
            )
    _check_vectorised_sums(task, values)
    return first


def _check_vectorised_sums(task: Task, values: dict[str, np.ndarray]) -> None:
    """metrics_from_sums on sums of shape [R] (R resamples of the rows, the first the split itself)
    must give, element by element, its result on each replicate alone: the bootstrap relies on it."""
    rows = len(next(iter(values.values())))
    weights = np.random.default_rng(0).multinomial(rows, np.full(rows, 1.0 / rows), size=REPLICATES)
    weights[0] = 1  # the first replicate is the split itself
    with _calling(task, f"metrics_from_sums(sums of shape [{REPLICATES}])"):
        resampled = task.metrics_from_sums({c: weights @ v for c, v in values.items()})
        alone = [task.metrics_from_sums({c: np.array(w @ v) for c, v in values.items()}) for w in weights]
    for r in range(REPLICATES):
        for key, value in resampled.items():
            value = np.asarray(value)
            if value.shape != (REPLICATES,) or not np.isclose(
                value[r], alone[r][key], rtol=VECTOR_RTOL, equal_nan=True
            ):
                raise ContractViolation(
                    task,
                    f"metrics_from_sums on sums of shape [{REPLICATES}] must return arrays of that "
                    f"shape, element by element its result on each replicate; {key} is {value}",
                )


# -- declarations, model, training ----------------------------------------------------------------
def _check_metric_declarations(task: Task) -> None:
    metrics = task.metrics
    if not metrics or not all(isinstance(m, Metric) for m in metrics):
        raise ContractViolation(
            task, "metrics must be a non-empty tuple of rnnbench.Metric, the primary one first"
        )
    if len({m.name for m in metrics}) != len(metrics) or any(
        m.direction not in ("minimize", "maximize") for m in metrics
    ):
        raise ContractViolation(task, "metric names must be distinct and directions 'minimize' or 'maximize'")


def _built_model(task: Task, arch: Architecture, hparams: dict[str, Any]) -> nn.Module:
    """The trainer's model for ``hparams`` (trainer.build_model), checked: an nn.Module whose
    encoder make_encoder built."""
    with _calling(task, "build_model(make_encoder, hparams)"):
        model = build_model(task, arch, hparams)
    if not isinstance(model, nn.Module):
        raise ContractViolation(task, f"build_model must return an nn.Module, got {_kind(model)}")
    if not any(isinstance(m, Encoder) for m in model.modules()):
        raise ContractViolation(task, "build_model must build its encoder with make_encoder(input_size)")
    return model


def _train_briefly(
    task: Task,
    model: nn.Module,
    *,
    steps: int = 30,
    batch_size: int = 16,
    lr: float = 1e-2,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> float:
    """``steps`` Adam steps through the Task contract (batches + training_loss), as the trainer
    takes them; returns the last loss. A model that has learnt a little reads its context, so a
    context that depends on the batch size shows in the scores."""
    device = torch.device(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    done, loss = 0, torch.tensor(float("nan"))
    while done < steps:
        carry, before = None, done
        for batch in _checked_batches(task, "train", batch_size, device, generator):
            loss, carry = _training_loss(task, model, batch, carry, step=done + 1)
            optimizer.zero_grad(set_to_none=True)
            with _calling(task, "backward of training_loss"):
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            done += 1
            if done >= steps:
                break
        if done == before:
            raise ContractViolation(task, f"batches('train', {batch_size}) yielded no batch")
    model.eval()
    return float(loss.detach())


def _first_batch(task: Task, batch_size: int, device, seed: int) -> Any:
    """The first training batch, checked to be a Batch; None when the train split yields none (the
    caller says whose fault that is: the task's on its synthetic data, the data's in a run)."""
    generator = torch.Generator().manual_seed(seed)
    return next(_checked_batches(task, "train", batch_size, device, generator), None)


def _check_training_step(task: Task, model: nn.Module, batch) -> None:
    """The trainer's first step on ``batch``, checked: a finite scalar loss that requires grad, and
    a gradient that reaches the encoder. Nothing is updated."""
    model.train()
    loss, _ = _training_loss(task, model, batch, None, step=1)
    with _calling(task, "backward of training_loss"):
        loss.backward()
    _check_gradient_reaches_encoder(task, model)
    model.zero_grad(set_to_none=True)


def _checked_batches(task: Task, split: str, batch_size: int, device, generator=None) -> Iterator[Any]:
    """``task.batches(...)``, each checked to be a Batch; an exception inside is named as batches()'s."""
    what = f"batches({split!r}, {batch_size})"
    with _calling(task, what):
        batches = iter(task.batches(split, batch_size, device=device, generator=generator))
    while True:
        with _calling(task, what):
            batch = next(batches, None)
        if batch is None:
            return
        if not isinstance(batch, Batch):
            raise ContractViolation(
                task, f"{what} must yield rnnbench.task.Batch objects, got {_kind(batch)}"
            )
        yield batch


def _training_loss(task: Task, model: nn.Module, batch, carry, *, step: int) -> tuple[Tensor, Any]:
    with _calling(task, "training_loss(model, batch, carry)"):
        result = task.training_loss(model, batch, carry)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise ContractViolation(task, f"training_loss must return (loss, carry), got {_kind(result)}")
    loss = result[0]
    if not isinstance(loss, Tensor) or loss.dim() != 0 or not loss.requires_grad:
        got = (
            f"shape {list(loss.shape)}, requires_grad={loss.requires_grad}"
            if isinstance(loss, Tensor)
            else _kind(loss)
        )
        raise ContractViolation(
            task, f"training_loss must return a scalar loss tensor that requires grad (no .item()), got {got}"
        )
    if not math.isfinite(value := float(loss.detach())):
        where = "on the first batch of a freshly built model" if step == 1 else f"at training step {step}"
        raise ContractViolation(task, f"training_loss is {value} {where}")
    return result


def _check_gradient_reaches_encoder(task: Task, model: nn.Module) -> None:
    encoder = next(m for m in model.modules() if isinstance(m, Encoder))
    if any(p.grad is None for p in encoder.parameters() if p.requires_grad):
        raise ContractViolation(task, "the gradient of training_loss does not reach the encoder's cells")


# -- serving, baseline, describe ------------------------------------------------------------------
def _check_serving(task: Task, model: nn.Module) -> None:
    """The logged MLflow model is ``serving_model(model)``: it must run on ``serving_example()``."""
    hint = "; override serving_model/serving_example (see rnnbench.Task)"
    with _calling(task, "serving_model(model)(serving_example())", hint):
        serve(task, model)


def _check_baseline(task: Task, split: str) -> None:
    with _calling(task, f"baseline({split!r})"):
        baseline = task.baseline(split)
    names = [m.name for m in task.metrics]
    if not isinstance(baseline, dict) or (baseline and not set(baseline) & set(names)):
        raise ContractViolation(
            task, f"baseline keys must be metric names ({', '.join(names)}), got {shorten(baseline, 200)}"
        )


def _check_describe(task: Task) -> None:
    """describe()'s facts are logged as MLflow params ``data.<key>``: keys and values must fit."""
    with _calling(task, "describe()"):
        facts = task.describe()
    if not isinstance(facts, dict):
        raise ContractViolation(
            task, f"describe() must return a dict (its values become MLflow params), got {_kind(facts)}"
        )
    for key, value in facts.items():
        if not isinstance(key, str) or not MLFLOW_PARAM_KEY.match(f"data.{key}"):
            raise ContractViolation(
                task,
                f"describe() keys become MLflow param names (letters, digits, _ - . / space): {shorten(key)}",
            )
        if len(str(value)) > MLFLOW_PARAM_VALUE:
            raise ContractViolation(
                task,
                f"describe()[{key!r}] becomes an MLflow param of at most {MLFLOW_PARAM_VALUE} characters, "
                f"got {len(str(value)):,}",
            )


# -- small helpers ----------------------------------------------------------------------------------
@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode without gradients, the model's training mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _name(task: Task | type[Task]) -> str:
    return task.name or (task.__name__ if isinstance(task, type) else type(task).__name__)


def _kind(value: Any) -> str:
    return f"a tuple of {len(value)}" if isinstance(value, tuple) else type(value).__name__


def _per_size(values: dict[int, Any]) -> str:
    return ", ".join(f"{v:.8g} at batch size {b}" for b, v in values.items())
