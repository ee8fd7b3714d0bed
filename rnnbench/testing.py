"""Contract checks for task authors: call them from your plugin's own tests (public API).

::

    from rnnbench.testing import check_task_contract

    def test_my_task_keeps_the_rnnbench_contract():
        check_task_contract(MyTask)              # on its synthetic dataset, CPU, a few seconds

Each check raises AssertionError with a readable message, so it works under pytest or any runner.
The central rule (see :mod:`rnnbench.task`): ``evaluate`` scores every position of a split exactly
once and gives the same numbers whatever batch size it is called with, because the evaluation
batch size follows the searched training batch size and must not change what is measured.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from rnnbench.task import Task

__all__ = ["check_evaluate_batch_independence", "check_task_contract"]


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
    context, then runs :func:`check_evaluate_batch_independence` on each of ``splits``.
    Returns the scores per split and batch size.
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
    return {
        split: check_evaluate_batch_independence(
            task, model, split=split, batch_sizes=batch_sizes, device=device, rel_tol=rel_tol, abs_tol=abs_tol
        )
        for split in splits
    }


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
