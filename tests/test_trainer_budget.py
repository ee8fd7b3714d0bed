"""Budgets in steps: max_steps, and validation (pruning, early stopping, best checkpoint) every
eval_every steps, across epoch boundaries."""

from __future__ import annotations

from rnnbench.trainer import Architecture, Callback, Trainer


class _Seen(Callback):
    def __init__(self):
        self.rounds: list[tuple[int, float]] = []

    def on_epoch_end(self, epoch, metrics):
        self.rounds.append((epoch, metrics["steps"]))


def _memory_task():
    from rnnbench.plugins import get_task

    # 256 training sequences at batch 32: 8 steps per pass
    return get_task("memory")(
        "synthetic", problem="adding", seq_len=6, train_size=256, valid_size=64, test_size=64
    )


HP = {"hidden_size": 8, "lr": 0.01, "batch_size": 32}


def test_eval_every_validates_every_n_steps_across_passes():
    seen = _Seen()
    result = Trainer({"max_steps": 30, "eval_every": 12, "epochs": 100}, {"device": "cpu"}).fit(
        _memory_task(), Architecture("gru"), HP, callbacks=[seen]
    )
    # 12 and 24 steps span passes of 8 steps; the last round is the 6 steps up to max_steps
    assert seen.rounds == [(1, 12.0), (2, 24.0), (3, 30.0)]
    assert result.stop_reason == "max_steps" and result.summary["steps"] == 30


def test_epochs_bound_passes_when_validating_by_steps():
    seen = _Seen()
    result = Trainer({"epochs": 2, "eval_every": 5}, {"device": "cpu"}).fit(
        _memory_task(), Architecture("gru"), HP, callbacks=[seen]
    )
    assert [s for _, s in seen.rounds] == [5.0, 10.0, 15.0, 16.0]  # two passes of 8 steps
    assert result.summary["steps"] == 16


def test_patience_counts_validations():
    seen = _Seen()
    hp = {**HP, "lr": 0.0}  # nothing improves after the first validation
    result = Trainer({"max_steps": 100, "eval_every": 4, "patience": 2}, {"device": "cpu"}).fit(
        _memory_task(), Architecture("gru"), hp, callbacks=[seen]
    )
    assert result.stop_reason == "early_stopping" and len(seen.rounds) == 3 and result.best_epoch == 1


def test_max_steps_without_eval_every_keeps_epochs():
    seen = _Seen()
    Trainer({"max_steps": 20, "epochs": 10}, {"device": "cpu"}).fit(
        _memory_task(), Architecture("gru"), HP, callbacks=[seen]
    )
    assert [s for _, s in seen.rounds] == [8.0, 16.0, 20.0]


def test_experiment_step_budget_reaches_the_trainer():
    from rnnbench.experiment import BudgetSpec

    assert BudgetSpec(max_steps=1000).epochs_limit() == 10**9  # epochs unlimited under max_steps
    assert BudgetSpec(max_steps=1000, epochs=3).epochs_limit() == 3
    assert BudgetSpec(max_steps=1000, eval_every=300).validations() == 4
    assert BudgetSpec(epochs=7).validations() == 7
