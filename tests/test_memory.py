"""The memory task: adding problem and copy memory, their data, metrics and computed baselines."""

from __future__ import annotations

import math

import pluggy
import pytest
import torch

from rnnbench import hookspecs
from rnnbench.encoder import Encoder
from rnnbench.errors import ConfigError, UnknownNameError
from rnnbench.tasks import memory as memory_module
from rnnbench.tasks.memory import Memory
from tests.helpers import train_briefly

CPU = torch.device("cpu")
SMALL = {"train_size": 4000, "valid_size": 1000, "test_size": 500}


def test_registers_through_the_task_hook():
    pm = pluggy.PluginManager("rnnbench")
    pm.add_hookspecs(hookspecs)
    pm.register(memory_module)
    assert pm.hook.rnnbench_tasks() == [{"memory": Memory}]
    assert Memory.causal and Memory.datasets == ("synthetic",)


def test_each_problem_has_its_own_metrics():
    assert [m.name for m in Memory(problem="adding").metrics] == ["mse"]
    copy = Memory(problem="copy")
    assert [m.name for m in copy.metrics] == ["cross_entropy", "accuracy"]
    assert copy.primary_metric.name == "cross_entropy"
    assert copy.metric("accuracy").direction == "maximize"


def test_adding_problem_data():
    task = Memory(problem="adding", seq_len=30, **SMALL)
    batch = next(iter(task.batches("valid", 64, device=CPU)))
    assert batch.inputs.shape == (64, 30, 2) and batch.targets.shape == (64,)
    assert batch.tokens == 64 * 30
    values, markers = batch.inputs[..., 0], batch.inputs[..., 1]
    assert torch.equal(markers.sum(1), torch.full((64,), 2.0))
    assert torch.equal(markers[:, :15].sum(1), torch.ones(64))  # one marker in each half
    assert torch.allclose((values * markers).sum(1), batch.targets)
    assert ((values >= 0) & (values < 1)).all()


def test_adding_baseline_is_computed_on_the_split():
    task = Memory(problem="adding", seq_len=20, **SMALL)
    valid, test = task.baseline("valid")["mse"], task.baseline("test")["mse"]
    assert valid != test  # measured on each split, not a constant
    assert valid == pytest.approx(1 / 6, abs=0.02)  # Var(U1 + U2) = 2/12
    _, targets = task._split("valid")
    assert valid == pytest.approx(((targets.double() - 1) ** 2).mean().item())


def test_lstm_solves_the_short_adding_problem():
    task = Memory(problem="adding", seq_len=20, **SMALL)
    _, scores = train_briefly(task, steps=300, hidden_size=32, batch_size=64)
    baseline = task.baseline("valid")["mse"]
    assert scores["mse"] < 0.3 * baseline


def test_copy_memory_layout_follows_bai_et_al():
    gap = 7
    task = Memory(problem="copy", seq_len=gap, **SMALL)
    batch = next(iter(task.batches("valid", 32, device=CPU)))
    length = gap + 20
    assert batch.inputs.shape == (32, length) and batch.inputs.dtype == torch.long
    assert batch.targets.shape == (32, 10) and batch.tokens == 32 * length
    symbols = batch.inputs[:, :10]
    assert ((symbols >= 1) & (symbols <= 8)).all()
    assert (batch.inputs[:, 10 : 10 + gap - 1] == 0).all()  # T - 1 blanks
    assert (batch.inputs[:, 10 + gap - 1 :] == 9).all()  # delimiter, then 10 recall steps
    assert torch.equal(batch.targets, symbols - 1)
    assert task.describe()["sequence_length"] == length


def test_copy_baseline_is_the_memoryless_entropy():
    task = Memory(problem="copy", seq_len=30, **SMALL)
    baseline = task.baseline("valid")
    _, targets = task._split("valid")
    freqs = torch.bincount(targets.reshape(-1), minlength=8).double() / targets.numel()
    assert baseline["cross_entropy"] == pytest.approx(-(freqs * freqs.log()).sum().item())
    assert baseline["cross_entropy"] == pytest.approx(math.log(8), abs=0.01)
    assert baseline["accuracy"] == pytest.approx(freqs.max().item())
    assert baseline["accuracy"] == pytest.approx(1 / 8, abs=0.02)
    # Bai et al.'s all-steps form: 10 ln(8) / (T + 20) for uniform symbols.
    assert baseline["cross_entropy_all_steps"] == pytest.approx(10 * baseline["cross_entropy"] / 50)
    assert baseline["cross_entropy_all_steps"] == pytest.approx(10 * math.log(8) / 50, abs=0.01)


def test_copy_metrics_are_sane_and_a_short_gap_is_learnt():
    task = Memory(problem="copy", seq_len=5, **SMALL)
    task.setup()
    torch.manual_seed(0)
    untrained = task.build_model(lambda n: Encoder("lstm", n, 16), {}).eval()
    scores = task.evaluate(untrained, "valid", 128, device=CPU)
    assert set(scores) == {"cross_entropy", "accuracy"}
    assert scores["cross_entropy"] == pytest.approx(math.log(8), abs=0.3)
    assert 0.0 <= scores["accuracy"] <= 0.3
    _, trained = train_briefly(task, steps=300, hidden_size=32)
    assert trained["accuracy"] > 2 * task.baseline("valid")["accuracy"]
    assert trained["cross_entropy"] < task.baseline("valid")["cross_entropy"]


def test_valid_and_test_sets_are_fixed_by_the_seed():
    first = Memory(problem="copy", seq_len=10, seed=5, **SMALL)
    # Iterating training batches with a generator must not move the evaluation sets.
    for _ in first.batches("train", 64, device=CPU, generator=torch.Generator().manual_seed(9)):
        pass
    second = Memory(problem="copy", seq_len=10, seed=5, train_size=100, valid_size=1000, test_size=500)
    other_seed = Memory(problem="copy", seq_len=10, seed=6, **SMALL)
    for split in ("valid", "test"):
        for a, b in zip(first._split(split), second._split(split)):
            assert torch.equal(a, b)
        assert not torch.equal(first._split(split)[0], other_seed._split(split)[0])
    assert not torch.equal(first._split("valid")[0], first._split("test")[0][:1000])


def test_training_batches_are_shuffled_by_the_generator():
    task = Memory(problem="adding", seq_len=10, **SMALL)
    order = [
        b.targets for b in task.batches("train", 100, device=CPU, generator=torch.Generator().manual_seed(1))
    ]
    again = [
        b.targets for b in task.batches("train", 100, device=CPU, generator=torch.Generator().manual_seed(1))
    ]
    fixed = [b.targets for b in task.batches("train", 100, device=CPU)]
    assert all(torch.equal(a, b) for a, b in zip(order, again))
    assert not torch.equal(order[0], fixed[0])
    assert torch.equal(torch.cat(order).sort().values, torch.cat(fixed).sort().values)  # a permutation


def test_refusals_are_clear():
    with pytest.raises(ConfigError, match="carries information forward"):
        Memory().check_architecture(bidirectional=True)
    with pytest.raises(UnknownNameError, match="synthetic"):
        Memory("adding")
    with pytest.raises(ConfigError, match="generates its data"):
        Memory(data_path="/tmp/data.txt")
    with pytest.raises(ConfigError, match="seq_len >= 2"):
        Memory(problem="adding", seq_len=1)
    with pytest.raises(ConfigError, match="problem"):
        Memory(problem="copying")
    Memory(problem="copy", seq_len=1).setup()  # copy: no blanks, delimiter right after the symbols
