"""Length-bucketed batches of the padded tasks (sentiment, ner): every training example once per
epoch, reproducible for a seed, a fresh order every epoch; and an evaluation order (sorted by
length, padded) that changes no score and no per-item outcome."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import rnnbench.data.batching as batching
from rnnbench.encoder import Encoder
from rnnbench.tasks import ner
from rnnbench.tasks.ner import NERTask
from rnnbench.tasks.sentiment import SentimentTask

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tasks() -> dict:
    built = {
        "sentiment": SentimentTask("synthetic", synthetic_size=400),
        "ner": NERTask("synthetic", synthetic_size=120),
    }
    for task in built.values():
        task.setup()
    return built


def _epoch(task, seed_or_generator, batch_size=16):
    generator = (
        seed_or_generator
        if isinstance(seed_or_generator, torch.Generator)
        else torch.Generator().manual_seed(seed_or_generator)
    )
    return list(task.batches("train", batch_size, device=CPU, generator=generator))


def _train_size(task) -> int:
    split = task.splits["train"]
    return len(split.ids) if hasattr(split, "ids") else len(split.words)


@pytest.mark.parametrize("name", ["sentiment", "ner"])
def test_every_training_example_once_per_epoch_reproducible_for_a_seed(tasks, name):
    task = tasks[name]
    generator = torch.Generator().manual_seed(7)
    first, second = _epoch(task, generator), _epoch(task, generator)
    for epoch in (first, second):
        seen = torch.cat([b.extra["index"] for b in epoch]).tolist()
        assert sorted(seen) == list(range(_train_size(task)))  # each example exactly once
        for b in epoch:
            assert b.tokens == int(b.lengths.sum()) and b.inputs.shape[1] == int(b.lengths.max())
    order = lambda epoch: [b.extra["index"].tolist() for b in epoch]  # noqa: E731
    assert order(first) != order(second)  # a fresh order every epoch
    assert order(first) == order(_epoch(task, 7))  # the same seed, the same epoch
    assert order(first) != order(_epoch(task, 8))


@pytest.mark.parametrize("name", ["sentiment", "ner"])
def test_training_batches_group_similar_lengths_but_mix_examples(tasks, name):
    task = tasks[name]
    epoch = _epoch(task, 0, batch_size=8)
    real = sum(b.tokens for b in epoch)
    padded = sum(b.inputs.shape[0] * b.inputs.shape[1] for b in epoch)
    lengths = torch.cat([b.lengths for b in epoch]).float()
    # random batches of 8 would pad to about E[max of 8] / E[length]
    shuffled = lengths[torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0))]
    random_padded = sum(len(c) * float(c.max()) for c in shuffled.split(8))
    assert padded - real < 0.5 * (random_padded - real)
    # not the same batches as a global sort: batch composition stays random apart from length
    sorted_batches = {tuple(sorted(b.tolist())) for b in torch.argsort(lengths, stable=True).split(8)}
    assert {tuple(sorted(b.extra["index"].tolist())) for b in epoch} != sorted_batches


def _natural_order(lengths, batch_size, *, generator=None):
    """Evaluation without bucketing: the split's own order, batches as they come."""
    assert generator is None
    return list(torch.arange(len(lengths)).split(batch_size))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "peephole"])
@pytest.mark.parametrize("name", ["sentiment", "ner"])
def test_bucketed_evaluation_changes_no_score_and_no_item(tasks, name, cell, monkeypatch):
    task = tasks[name]
    torch.manual_seed(0)
    model = task.build_model(lambda n: Encoder(cell, n, 12, 1, bidirectional=True), {"embedding_dim": 8})
    model = model.double().eval()  # float64: no near-tie of two logits can flip with the batching
    bucketed = (
        task.evaluate(model, "valid", 16, device=CPU),
        task.evaluate_items(model, "valid", 16, device=CPU),
    )
    one_by_one = task.evaluate(model, "valid", 1, device=CPU)  # no padding at all
    monkeypatch.setattr(batching, "bucketed_index_batches", _natural_order)
    monkeypatch.setattr(ner, "bucketed_index_batches", _natural_order)
    natural = (
        task.evaluate(model, "valid", 16, device=CPU),
        task.evaluate_items(model, "valid", 16, device=CPU),
    )
    assert bucketed[0] == natural[0] == one_by_one
    pd.testing.assert_frame_equal(bucketed[1], natural[1])
