"""rnnbench.testing: every builtin task keeps the evaluation rule, and the check catches the usual bugs.

The rule (rnnbench/task.py): evaluate scores every position once and gives the same numbers whatever
batch size it is called with. The "catches" tests break one task in one classic way each and assert
that the public check fails on it, so a passing check means something.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rnnbench.plugins import get_task
from rnnbench.tasks.charlm import CharLM, _contiguous_window_batches, _stream_batches
from rnnbench.tasks.memory import Memory
from rnnbench.tasks.ner import NERTask
from rnnbench.tasks.sentiment import SentimentTask
from rnnbench.testing import check_evaluate_batch_independence, check_task_contract

CPU = torch.device("cpu")
BATCH_SIZES = (1, 7, 64)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("charlm", {}),
        ("charlm", {"mode": "stateless"}),
        ("sentiment", {}),
        ("sentiment", {"pooling": "mean"}),
        ("sentiment", {"pooling": "max"}),
        ("ner", {}),
        ("forecast", {}),
        ("memory", {}),
        ("memory", {"problem": "copy", "seq_len": 20}),
    ],
)
def test_every_builtin_task_evaluates_the_same_at_any_batch_size(name, options):
    scores = check_task_contract(get_task(name)("synthetic", **options), batch_sizes=BATCH_SIZES)
    assert set(scores) == {"valid", "test"} and set(scores["valid"]) == set(BATCH_SIZES)


@pytest.mark.parametrize("name", ["charlm", "sentiment"])
def test_the_generic_time_loop_keeps_the_rule_too(name):
    # peephole has no fused kernel: padding goes through the masked update instead of packing
    check_task_contract(get_task(name), cell="peephole", batch_sizes=BATCH_SIZES, splits=("valid",))


# -- the check catches the classic bugs -----------------------------------------------------------
def trained(task, steps=60):
    """A briefly trained LSTM (it reads its context), through the public check's own path."""
    from rnnbench.encoder import Encoder
    from rnnbench.testing import _train_briefly

    task.setup()
    torch.manual_seed(0)
    model = task.build_model(lambda n: Encoder("lstm", n, 16), {"hidden_size": 16})
    _train_briefly(task, model, steps=steps)
    return model


class StreamsPerBatchCharLM(CharLM):
    """The old stateful evaluation: the split laid out as batch_size streams."""

    def batches(self, split, batch_size, *, device, generator=None):
        if generator is not None:
            yield from super().batches(split, batch_size, device=device, generator=generator)
            return
        yield from _stream_batches(self._device_ids(split, device), batch_size, self.options.seq_len)


class ContextPerBatchCharLM(CharLM):
    """Every character scored once, but from a zero state every batch_size characters."""

    def batches(self, split, batch_size, *, device, generator=None):
        if generator is not None:
            yield from super().batches(split, batch_size, device=device, generator=generator)
            return
        yield from _contiguous_window_batches(self._device_ids(split, device), 64, batch_size)


def test_catches_batch_size_streams_in_charlm():
    task = StreamsPerBatchCharLM("synthetic", seq_len=16)
    with pytest.raises(AssertionError, match="different number of positions"):
        check_evaluate_batch_independence(task, trained(task), batch_sizes=BATCH_SIZES)


def test_catches_a_context_that_depends_on_the_batch_size():
    task = ContextPerBatchCharLM("synthetic", seq_len=16, mode="stateless")
    with pytest.raises(AssertionError, match="perplexity depends on the evaluation batch size"):
        check_evaluate_batch_independence(task, trained(task), batch_sizes=BATCH_SIZES)


class MeanOfBatchMeansMemory(Memory):
    """Averages per-batch MSEs: the last, smaller batch weighs as much as a full one."""

    def evaluate(self, model, split, batch_size, *, device):
        means = [
            F.mse_loss(model(b.inputs), b.targets).item()
            for b in self.batches(split, batch_size, device=device)
        ]
        return {"mse": sum(means) / len(means)}


def test_catches_a_mean_of_per_batch_means():
    task = MeanOfBatchMeansMemory(seq_len=10, train_size=256, valid_size=100, test_size=100)
    with pytest.raises(AssertionError, match="mse depends on the evaluation batch size"):
        check_evaluate_batch_independence(task, trained(task), batch_sizes=BATCH_SIZES)


class PaddingReadingSentiment(SentimentTask):
    """Forgets the lengths at evaluation: padded positions are read as words."""

    def evaluate(self, model, split, batch_size, *, device):
        classes = len(self.classes)
        confusion = torch.zeros(classes, classes, dtype=torch.long)
        for batch in self.batches(split, batch_size, device=device):
            predicted = model(batch.inputs, None).argmax(-1)
            confusion.index_put_((batch.targets, predicted), torch.ones_like(predicted), accumulate=True)
        from rnnbench.tasks.sentiment import classification_scores

        return classification_scores(confusion)


def test_catches_padding_read_as_data():
    task = PaddingReadingSentiment("synthetic")
    with pytest.raises(AssertionError, match="depends on the evaluation batch size"):
        check_evaluate_batch_independence(task, trained(task, steps=100), batch_sizes=BATCH_SIZES)


class DropLastNer(NERTask):
    """Drops the last, incomplete evaluation batch (DataLoader's drop_last=True)."""

    def batches(self, split, batch_size, *, device, generator=None):
        batches = list(super().batches(split, batch_size, device=device, generator=generator))
        yield from (
            batches if generator is not None else batches[: len(self._split(split).words) // batch_size]
        )


def test_catches_a_dropped_last_batch():
    task = DropLastNer("synthetic")
    with pytest.raises(AssertionError, match="different number of positions"):
        check_evaluate_batch_independence(task, trained(task), batch_sizes=BATCH_SIZES)


def test_catches_a_missing_metric():
    class Forgetful(Memory):
        def evaluate(self, model, split, batch_size, *, device):
            return {}

    with pytest.raises(AssertionError, match=r"missing metrics \['mse'\]"):
        check_task_contract(Forgetful, splits=("valid",), train_steps=1)
