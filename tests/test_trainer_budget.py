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
    assert result.stop_reason == "converged" and len(seen.rounds) == 3 and result.best_epoch == 1


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


def test_min_improvement_counts_small_gains_as_none():
    """Patience resets only on a gain of at least min_improvement: with a huge one, every
    validation after the first is "no improvement", even when the checkpoint still improves."""
    seen = _Seen()
    budget = {"max_steps": 100, "eval_every": 4, "patience": 2, "min_improvement": 1e9}
    result = Trainer(budget, {"device": "cpu"}).fit(_memory_task(), Architecture("gru"), HP, callbacks=[seen])
    assert result.stop_reason == "converged" and len(seen.rounds) == 3
    relative = Trainer(
        {**budget, "min_improvement": 0.5, "min_improvement_relative": True}, {"device": "cpu"}
    )
    assert relative.budget.improves(0.4, 1.0, lambda a, b: a < b)  # 60% better
    assert not relative.budget.improves(0.6, 1.0, lambda a, b: a < b)  # 40% better


def test_lr_schedule_warms_up_then_decays_to_zero_at_the_cap():
    import math

    import torch

    from rnnbench.errors import ConfigError
    from rnnbench.trainer import make_lr_schedule

    def rates(kind, warmup=4, cap=20):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        schedule = make_lr_schedule(opt, {"lr_schedule": kind, "warmup_steps": warmup}, cap)
        out = []
        for _ in range(cap):
            out.append(opt.param_groups[0]["lr"])  # the rate the next step uses
            opt.step()
            schedule.step()
        return out

    cosine, linear = rates("cosine"), rates("linear")
    assert cosine[:4] == linear[:4] == [0.25, 0.5, 0.75, 1.0]
    assert linear[12] == 1 - 8 / 16 and math.isclose(cosine[12], 0.5)  # half way through the decay
    assert math.isclose(cosine[-1], 0.5 * (1 + math.cos(math.pi * 15 / 16)))  # → 0 at step 20
    assert rates("constant") == [0.25, 0.5, 0.75] + [1.0] * 17
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert make_lr_schedule(opt, {"lr_schedule": "constant", "warmup_steps": 0}, None) is None
    for hp, cap in (({"lr_schedule": "cosine"}, None), ({"lr_schedule": "linear", "warmup_steps": 20}, 20)):
        try:
            make_lr_schedule(opt, hp, cap)
        except ConfigError:
            continue
        raise AssertionError(f"{hp} with cap {cap} was accepted")


def test_a_run_records_its_schedule_and_evaluation_cost():
    seen = []

    class Rates(Callback):
        def on_epoch_end(self, epoch, metrics):
            seen.append(metrics["lr"])

    hp = {**HP, "lr_schedule": "linear", "warmup_steps": 0}
    result = Trainer({"max_steps": 24, "eval_every": 8}, {"device": "cpu"}).fit(
        _memory_task(), Architecture("gru"), hp, callbacks=[Rates()]
    )
    assert seen == [0.01 * (1 - 8 / 24), 0.01 * (1 - 16 / 24), 0.0]
    assert result.stop_reason == "max_steps"
    assert 0 < result.summary["eval_time_s"] < result.summary["wall_time_s"]
    assert result.summary["validations"] == 3


def test_budget_refusals():
    import pytest

    from rnnbench.errors import ConfigError
    from rnnbench.experiment import parse

    base = "name: b\ncells: [gru]\ntasks: [memory]\n"
    for budget, words in (
        ("{patience: 0}", "at least 1"),
        ("{max_steps: 50, eval_every: 100}", "below one validation"),
        ("{max_steps: 50, steps_per_epoch: 100}", "below one validation"),
        ("{epochs: 3, patience: 3}", "can never stop"),
        ("{epochs: 3, min_improvement: -1}", "margin"),
    ):
        with pytest.raises(ConfigError, match=words):
            parse(base + f"budget: {budget}\n", "x.yaml")
    with pytest.raises(ConfigError, match="decays to the step cap"):
        parse(base + "fixed: {lr_schedule: cosine}\n", "x.yaml")
    parse(
        base + "fixed: {lr_schedule: cosine}\nbudget: {max_steps: 100, eval_every: 10, patience: 3, "
        "min_improvement: '1%'}\n",
        "x.yaml",
    )
