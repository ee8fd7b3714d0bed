"""Contract checks for task authors: call them from your plugin's own tests (public API).

::

    from rnnbench.testing import check_task_contract

    def test_my_task_keeps_the_rnnbench_contract():
        check_task_contract(MyTask)              # on its synthetic dataset, CPU, a few seconds

Each check raises AssertionError with a readable message, so it works under pytest or any runner.
The central rule (see :mod:`rnnbench.task`): ``evaluate`` scores every position of a split exactly
once and gives the same numbers whatever batch size it is called with, because the evaluation
batch size follows the searched training batch size and must not change what is measured. A task
that declares per-item outcomes (``evaluate_items``) must also give items that add up to its
metrics (:func:`check_item_outcomes`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from rnnbench.task import Task, declares_items

__all__ = ["check_evaluate_batch_independence", "check_item_outcomes", "check_task_contract"]
REPLICATES = 4  # resamples the vectorised check of metrics_from_sums draws


def check_evaluate_batch_independence(
    task: Task,
    model: nn.Module,
    *,
    split: str = "valid",
    batch_sizes: Sequence[int] = (1, 7, 64),
    device: str | torch.device = "cpu",
    rel_tol: float = 1e-5,
    abs_tol: float = 1e-7,
) -> dict[int, dict[str, float]]:
    """Evaluate ``model`` on ``split`` at every batch size and assert that nothing measured changes.

    Checks that each call returns every metric of ``task.metrics`` (and anything else) as a
    finite float, that all the values agree within ``rel_tol``/``abs_tol`` (float rounding of
    batched kernels; a dropped batch, a per-batch mean or padding read as data is far larger), and
    that the evaluation batches (``task.batches(split, b)`` without a generator) cover the same
    number of positions. Pick batch sizes that do not divide the split's size, so an uneven last
    batch shows; on a GPU with TF32 (cuDNN's default) loosen ``rel_tol``. ``task`` must be set up.
    Returns the scores per batch size.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    scores: dict[int, dict[str, float]] = {}
    positions: dict[int, int] = {}
    try:
        for batch_size in batch_sizes:
            with torch.no_grad():
                scores[batch_size] = task.evaluate(model, split, batch_size, device=device)
            positions[batch_size] = sum(b.tokens for b in task.batches(split, batch_size, device=device))
    finally:
        model.train(was_training)
    name = task.name or type(task).__name__
    for batch_size, result in scores.items():
        _check_metrics(task, result, f"task {name!r} evaluate({split!r}, batch_size={batch_size})")
    if len(set(positions.values())) > 1:
        raise AssertionError(
            f"task {name!r}: the {split} evaluation batches cover a different number of positions at "
            f"each batch size ({_per_size(positions)}): every position must be scored exactly once"
        )
    first = batch_sizes[0]
    if any(set(result) != set(scores[first]) for result in scores.values()):
        raise AssertionError(f"task {name!r}: evaluate returns different keys at different batch sizes")
    for key in scores[first]:  # every number evaluate returns is logged, not only the declared metrics
        values = {b: float(scores[b][key]) for b in batch_sizes}
        if not all(math.isclose(v, values[first], rel_tol=rel_tol, abs_tol=abs_tol) for v in values.values()):
            raise AssertionError(
                f"task {name!r}: {split} {key} depends on the evaluation batch size "
                f"({_per_size(values)}); evaluate must give the same result whatever batch size it is "
                "called with (sum over items and divide once; no padding, dropped or partial batches)"
            )
    return scores


def check_item_outcomes(
    task: Task,
    model: nn.Module,
    *,
    split: str = "valid",
    batch_sizes: Sequence[int] = (1, 7),
    device: str | torch.device = "cpu",
    rel_tol: float = 1e-5,
    abs_tol: float = 1e-6,
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
    name = task.name or type(task).__name__
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            items = {b: task.evaluate_items(model, split, b, device=device) for b in batch_sizes}
            scores = task.evaluate(model, split, batch_sizes[0], device=device)
    finally:
        model.train(was_training)
    for batch_size, table in items.items():
        where = f"task {name!r}: evaluate_items({split!r}, batch_size={batch_size})"
        if not isinstance(table, pd.DataFrame) or table.empty:
            raise AssertionError(
                f"{where} must return a non-empty pandas DataFrame, got {type(table).__name__}"
            )
        if not_numeric := [c for c in table.columns if table[c].dtype.kind not in "iuf"]:
            raise AssertionError(f"{where}: columns {not_numeric} are not integer or float columns")
    first = items[batch_sizes[0]]
    for batch_size, table in items.items():
        if list(table.columns) != list(first.columns) or len(table) != len(first):
            raise AssertionError(
                f"task {name!r}: evaluate_items gives {len(first)} rows of {list(first.columns)} at batch "
                f"size {batch_sizes[0]} but {len(table)} rows of {list(table.columns)} at {batch_size}"
            )
        for column in first.columns:
            a, b = first[column].to_numpy(np.float64), table[column].to_numpy(np.float64)
            if not np.allclose(a, b, rtol=rel_tol, atol=abs_tol):
                row = int(np.argmax(~np.isclose(a, b, rtol=rel_tol, atol=abs_tol)))
                raise AssertionError(
                    f"task {name!r}: {split} item {row} has {column} = {a[row]:.6g} at batch size "
                    f"{batch_sizes[0]} but {b[row]:.6g} at {batch_size}: items must not depend on the "
                    "batch size, and keep the split's order"
                )
    values = {c: first[c].to_numpy(np.float64) for c in first.columns}
    whole = task.metrics_from_sums({c: np.array(v.sum()) for c, v in values.items()})
    if missing := [m.name for m in task.metrics if m.name not in whole]:
        raise AssertionError(f"task {name!r}: metrics_from_sums is missing metrics {missing}")
    for key in sorted(set(whole) & set(scores)):
        got = np.asarray(whole[key])
        if got.shape != () or not math.isclose(float(got), scores[key], rel_tol=rel_tol, abs_tol=abs_tol):
            raise AssertionError(
                f"task {name!r}: {split} {key} is {scores[key]:.6g} by evaluate but {got} by "
                "metrics_from_sums of the sums of evaluate_items: the items must add up to the metrics"
            )
    rows = len(first)
    weights = np.random.default_rng(0).multinomial(rows, np.full(rows, 1.0 / rows), size=REPLICATES)
    weights[0] = 1  # the first replicate is the split itself
    resampled = task.metrics_from_sums({c: weights @ v for c, v in values.items()})
    for r in range(REPLICATES):
        alone = task.metrics_from_sums({c: np.array(weights[r] @ v) for c, v in values.items()})
        for key, value in resampled.items():
            value = np.asarray(value)
            if value.shape != (REPLICATES,) or not np.isclose(
                value[r], alone[key], rtol=1e-9, equal_nan=True
            ):
                raise AssertionError(
                    f"task {name!r}: metrics_from_sums on sums of shape [{REPLICATES}] must return arrays "
                    f"of that shape, element by element its result on each replicate; {key} is {value}"
                )
    return first


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
        for batch in task.batches("train", batch_size, device=device, generator=generator):
            loss, carry = task.training_loss(model, batch, carry)
            if loss.dim() != 0 or not loss.requires_grad:
                raise AssertionError(
                    f"task {task.name!r}: training_loss must return a scalar tensor that requires grad, "
                    f"got shape {list(loss.shape)}, requires_grad={loss.requires_grad}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            done += 1
            if done >= steps:
                break
        if done == before:
            raise AssertionError(f"task {task.name!r}: batches('train', {batch_size}) yielded no batch")
    model.eval()
    return float(loss.detach())


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
    rel_tol: float = 1e-5,
    abs_tol: float = 1e-7,
) -> dict[str, dict[int, dict[str, float]]]:
    """Check a task end to end on a small model: declarations, training, evaluation rules.

    ``task`` is a Task subclass (built on its ``synthetic`` dataset with ``seed``) or an instance
    (for other datasets or options). The check sets it up, builds a ``cell`` encoder of
    ``hidden_size`` through ``build_model``, trains it ``train_steps`` steps so that it uses its
    context, then runs :func:`check_evaluate_batch_independence` and :func:`check_item_outcomes` on
    each of ``splits``. Returns the scores per split and batch size.
    """
    from rnnbench.encoder import Encoder

    if isinstance(task, type):
        if "synthetic" not in task.datasets:
            raise AssertionError(
                f"task {task.name!r}: 'synthetic' must be one of its datasets (tests run on it)"
            )
        task = task("synthetic", seed=seed)
    name = task.name or type(task).__name__
    if not task.metrics or len({m.name for m in task.metrics}) != len(task.metrics):
        raise AssertionError(f"task {name!r}: metrics must be a non-empty tuple of distinct names")
    task.check_architecture(bidirectional=False)  # before setup(), as the experiment parser calls it
    task.setup()
    torch.manual_seed(seed)
    model = task.build_model(
        lambda input_size: Encoder(cell, input_size, hidden_size),
        {"hidden_size": hidden_size, "dropout": 0.0, **(hparams or {})},
    ).to(device)
    _train_briefly(task, model, steps=train_steps, batch_size=batch_size, seed=seed, device=device)
    _check_serving(task, model.cpu())
    model.to(device)
    scores = {}
    for split in splits:
        scores[split] = check_evaluate_batch_independence(
            task, model, split=split, batch_sizes=batch_sizes, device=device, rel_tol=rel_tol, abs_tol=abs_tol
        )
        # the two largest batch sizes: evaluate's check covers the others, and batch size 1 is slow
        largest = sorted(batch_sizes)[-2:]
        check_item_outcomes(task, model, split=split, batch_sizes=largest, device=device, rel_tol=rel_tol)
    return scores


def _check_serving(task: Task, model: nn.Module) -> None:
    """The logged MLflow model is ``serving_model(model)``: it must run on ``serving_example()``."""
    from rnnbench.models import serve

    try:
        serve(task, model)
    except Exception as exc:
        raise AssertionError(
            f"task {task.name!r}: serving_model(model)(serving_example()) raised "
            f"{type(exc).__name__}: {exc}; override serving_model/serving_example (see rnnbench.Task)"
        ) from exc


def _check_metrics(task: Task, result: Any, where: str) -> None:
    if not isinstance(result, dict):
        raise AssertionError(
            f"{where} must return a dict of metric name -> float, got {type(result).__name__}"
        )
    missing = [m.name for m in task.metrics if m.name not in result]
    if missing:
        raise AssertionError(f"{where} is missing metrics {missing} (got {sorted(result)})")
    for key, value in result.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise AssertionError(f"{where}: metric {key!r} must be a finite Python float, got {value!r}")


def _per_size(values: dict[int, Any]) -> str:
    return ", ".join(f"batch size {b}: {v}" for b, v in values.items())
