"""Per-item outcomes: every builtin task's items add up to its metrics, on any resample of items.

The report's two-level bootstrap resamples the rows of ``evaluate_items`` and recomputes the metrics
with ``metrics_from_sums``; these tests check that a resample scores what ``evaluate`` gives on the
split made of those very items, duplicates included.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rnnbench.errors import ContractError
from rnnbench.plugins import Registered, get_task
from rnnbench.preflight import SEED_LEVEL_ONLY, check_task
from rnnbench.task import Task, declares_items
from rnnbench.tasks.memory import Memory
from rnnbench.tasks.ner import TaggedSplit
from rnnbench.tasks.sentiment import EncodedSplit
from rnnbench.testing import check_item_outcomes
from tests.helpers import train_briefly

CPU = torch.device("cpu")
SMALL = {"memory": {"train_size": 200, "valid_size": 90, "test_size": 10}}
TASKS = {
    "sentiment": ("sentiment", {"synthetic_size": 400}),
    "ner": ("ner", {"synthetic_size": 400}),
    "forecast": ("forecast", {}),
    "charlm": ("charlm", {}),
    "charlm-stateless": ("charlm", {"mode": "stateless"}),
    "adding": ("memory", SMALL["memory"]),
    "copy": ("memory", {**SMALL["memory"], "problem": "copy", "seq_len": 12}),
}
COLUMNS = {
    "sentiment": ["c_0_0", "c_0_1", "c_1_0", "c_1_1"],
    "ner": ["tp", "fp", "fn"] + [f"{c}_{t}" for t in ("LOC", "ORG", "PER") for c in ("tp", "fp", "fn")],
    "forecast": ["se", "ae", "se_original", "ae_original", "n"] + [f"se_h{k}" for k in range(1, 25)],
    "charlm": ["nll", "n"],
    "charlm-stateless": ["nll", "n"],
    "adding": ["se", "n"],
    "copy": ["nll", "correct", "n"],
}


@pytest.fixture(scope="module", params=list(TASKS))
def trained(request):
    """(label, task, briefly trained model): trained enough that predictions vary between items."""
    name, options = TASKS[request.param]
    task = get_task(name)("synthetic", **options)
    model, _ = train_briefly(task, steps=15, hidden_size=12, batch_size=16)
    return request.param, task, model


def sums_of(items, weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Column sums, or one weighted sum per row of ``weights`` ([..., items])."""
    if weights is None:
        return {c: np.array(items[c].to_numpy(np.float64).sum()) for c in items.columns}
    return {c: weights @ items[c].to_numpy(np.float64) for c in items.columns}


def test_items_are_batch_size_independent_and_add_up_to_evaluate(trained):
    label, task, model = trained
    items = check_item_outcomes(task, model, split="valid", batch_sizes=(1, 7, 64))
    assert list(items.columns) == COLUMNS[label]
    assert {items[c].dtype.name for c in items.columns} <= {"int32", "float32", "float64"}
    # the test split at another batch size; every key evaluate logs (ner's f1_<TYPE> too)
    scores = task.evaluate(model, "test", 5, device=CPU)
    from_items = task.metrics_from_sums(sums_of(task.evaluate_items(model, "test", 5, device=CPU)))
    assert set(from_items) == set(scores)
    for key, value in scores.items():
        assert math.isclose(float(from_items[key]), value, rel_tol=1e-5, abs_tol=1e-6), key


def test_metrics_from_sums_keeps_any_shape(trained):
    _, task, model = trained
    items = task.evaluate_items(model, "valid", 16, device=CPU)
    weights = np.random.default_rng(1).multinomial(len(items), np.full(len(items), 1 / len(items)), (2, 3))
    batched = task.metrics_from_sums(sums_of(items, weights))
    for key, values in batched.items():
        assert np.shape(values) == (2, 3), key
        one = task.metrics_from_sums(sums_of(items, weights[1, 2]))[key]
        assert np.isclose(values[1, 2], one, rtol=1e-12), key


def resampled_split(label: str, task: Task, index: torch.Tensor) -> None:
    """Make ``task``'s valid split the items at ``index`` (repeats included), in that order."""
    if label == "sentiment":
        data = task.splits["valid"]
        ids = [data.ids[i] for i in index.tolist()]
        task.splits["valid"] = EncodedSplit(ids, data.labels[index], 0, 0, sum(len(x) for x in ids))
    elif label == "ner":
        data = task.splits["valid"]
        task.splits["valid"] = TaggedSplit(
            *(
                [values[i] for i in index.tolist()]
                for values in (data.sentences, data.words, data.shapes, data.tags)
            )
        )
    elif label == "forecast":
        windows = task._windows("valid", CPU)
        task._on_device[("valid", str(CPU))] = windows[index]
    else:  # memory
        task._data["valid"] = tuple(t[index] for t in task._data["valid"])
        task._on_device.clear()


@pytest.mark.parametrize("label", ["sentiment", "ner", "forecast", "adding", "copy"])
def test_a_resample_of_items_scores_the_split_of_those_items(label):
    name, options = TASKS[label]
    task = get_task(name)("synthetic", **options)
    model, _ = train_briefly(task, steps=15, hidden_size=12, batch_size=16)
    items = task.evaluate_items(model, "valid", 16, device=CPU)
    index = torch.from_numpy(np.random.default_rng(2).integers(0, len(items), len(items)))
    weights = np.bincount(index.numpy(), minlength=len(items))
    assert weights.max() > 1  # duplicates are what a bootstrap draws
    from_items = task.metrics_from_sums(sums_of(items, weights))
    resampled_split(label, task, index)
    for key, value in task.evaluate(model, "valid", 16, device=CPU).items():
        assert math.isclose(float(from_items[key]), value, rel_tol=1e-5, abs_tol=1e-6), key


def test_charlm_blocks_are_the_stream_scored_in_one_pass_cut_every_1000_characters():
    # A resample of blocks is not a text the model could read (the context would change), so the
    # blocks are checked against the per-character costs of the whole stream read in one call.
    task = get_task("charlm")("synthetic")
    model, _ = train_briefly(task, steps=15, hidden_size=12, batch_size=16)
    items = task.evaluate_items(model, "valid", 16, device=CPU)
    ids = task._ids["valid"]
    with torch.no_grad():
        logits, _ = model(ids[:-1].unsqueeze(0))
    nll = torch.nn.functional.cross_entropy(logits[0], ids[1:], reduction="none").double()
    assert items["n"].tolist() == [len(block) for block in nll.split(1000)]
    assert len(items) == 3 and items["n"].iloc[-1] < 1000
    expected = torch.stack([block.sum() for block in nll.split(1000)]).numpy()
    assert np.allclose(items["nll"].to_numpy(), expected, rtol=1e-5)
    index = np.array([0, 0, 2])
    mean = nll.split(1000)[0].sum() * 2 + nll.split(1000)[2].sum()
    mean = float(mean) / (2 * 1000 + len(nll.split(1000)[2]))
    got = task.metrics_from_sums(sums_of(items, np.bincount(index, minlength=3)))
    assert math.isclose(float(got["perplexity"]), math.exp(mean), rel_tol=1e-5)
    assert math.isclose(float(got["bits_per_char"]), mean / math.log(2), rel_tol=1e-5)


def test_ner_items_count_entities_by_conlleval_rules():
    task = get_task("ner")("synthetic", synthetic_size=40)
    model, _ = train_briefly(task, steps=1, hidden_size=4)
    items = task.evaluate_items(model, "valid", 4, device=CPU)
    gold = [sentence.tags for sentence in task.splits["valid"].sentences]
    guessed = list(task._predicted_tags(model, "valid", 4, CPU).values())
    from rnnbench.metrics.spans import extract_spans

    for row, (g, p) in enumerate(zip(gold, guessed)):
        right = len(extract_spans(g) & extract_spans(p))
        assert (items.loc[row, "tp"], items.loc[row, "fp"], items.loc[row, "fn"]) == (
            right,
            len(extract_spans(p)) - right,
            len(extract_spans(g)) - right,
        )
    per_type = items[[c for c in items.columns if c.startswith("tp_")]].sum(axis=1)
    assert (per_type == items["tp"]).all()


# -- tasks without items, and tasks whose items disagree with their metrics -------------------------
class WithoutItems(Memory):
    """Memory as a plugin without per-item outcomes."""

    evaluate_items = Task.evaluate_items


class ItemsMissingTheLastSequence(Memory):
    """The classic bug: the last, shorter batch never reaches the item table."""

    def evaluate_items(self, model, split, batch_size, *, device):
        return super().evaluate_items(model, split, batch_size, device=device).iloc[:-1]


def test_declares_items_tells_builtin_tasks_from_tasks_without_items():
    assert all(
        declares_items(get_task(name)) for name in ("sentiment", "ner", "forecast", "charlm", "memory")
    )
    assert declares_items(Memory("synthetic"))
    assert not declares_items(WithoutItems) and not declares_items(WithoutItems("synthetic"))
    task = WithoutItems("synthetic", **SMALL["memory"])
    model, _ = train_briefly(task, steps=1, hidden_size=4)
    assert check_item_outcomes(task, model) is None
    assert task.evaluate_items(model, "valid", 8, device=CPU) is None


def test_check_task_notes_seed_level_statistics_and_refuses_items_that_disagree():
    ok = check_task(Registered("mem", WithoutItems, "rnnbench-mem 1.0", "mem = mem_plugin"))
    assert ok == SEED_LEVEL_ONLY
    assert check_task(Registered("memory", Memory, "builtin")) is None
    with pytest.raises(ContractError, match="breaks the Task contract") as info:
        check_task(Registered("mem", ItemsMissingTheLastSequence, "rnnbench-mem 1.0", "mem = mem_plugin"))
    assert "evaluate_items" in str(info.value), str(info.value)
