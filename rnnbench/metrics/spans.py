"""Entity-level precision, recall and F1 by the rules of CoNLL's conlleval script.

A span is ``(type, start, end)`` with ``end`` exclusive. Chunking follows conlleval, so IOB1 and
IOB2 tags both work: ``B-X`` always starts an entity, ``I-X`` starts one when it follows ``O`` or
another type, and an entity ends before ``O``, ``B-`` or an ``I-`` of another type. An entity
counts as correct only when its type and both boundaries match.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np


def extract_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """The entities of one tagged sentence as ``{(type, start, end)}``."""
    spans, start, kind = set(), None, None
    for i, tag in enumerate([*tags, "O"]):  # the sentinel O closes an entity at the sentence end
        prefix, _, label = tag.partition("-")
        if tag != "O" and (prefix not in ("B", "I") or not label):
            raise ValueError(f"tag {tag!r} at position {i} is neither O nor B-TYPE/I-TYPE")
        begins = prefix == "B" or (prefix == "I" and label != kind)
        if start is not None and (tag == "O" or begins):
            spans.add((kind, start, i))
            start, kind = None, None
        if begins:
            start, kind = i, label
    return spans


def prf(correct, predicted, gold) -> dict[str, np.ndarray]:
    """Precision, recall and F1 from entity counts: numbers or arrays of any shape, element-wise."""
    correct, predicted, gold = (np.asarray(count, dtype=np.float64) for count in (correct, predicted, gold))
    # conlleval's convention: an empty denominator scores 0, never a division error
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, correct / predicted, 0.0)
        recall = np.where(gold > 0, correct / gold, 0.0)
        both = precision + recall
        f1 = np.where(both > 0, 2 * precision * recall / both, 0.0)
    return {"precision": precision, "recall": recall, "f1": f1}


def _prf(correct: int, predicted: int, gold: int) -> dict[str, float]:
    return {name: float(score) for name, score in prf(correct, predicted, gold).items()}


def sentence_counts(gold_tags: Sequence[str], pred_tags: Sequence[str]) -> tuple[Counter, Counter, Counter]:
    """The entities of one sentence per type: ``(correct, predicted, gold)`` counts."""
    gold_spans, pred_spans = extract_spans(gold_tags), extract_spans(pred_tags)
    return (
        Counter(kind for kind, _, _ in gold_spans & pred_spans),
        Counter(kind for kind, _, _ in pred_spans),
        Counter(kind for kind, _, _ in gold_spans),
    )


def span_f1(gold_sequences: Sequence[Sequence[str]], pred_sequences: Sequence[Sequence[str]]) -> dict:
    """Micro-averaged entity scores over sentences, plus ``per_type`` scores with gold ``support``."""
    if len(gold_sequences) != len(pred_sequences):
        raise ValueError(f"{len(gold_sequences)} gold sentences but {len(pred_sequences)} predicted")
    correct, predicted, gold = Counter(), Counter(), Counter()
    for i, (gold_tags, pred_tags) in enumerate(zip(gold_sequences, pred_sequences)):
        if len(gold_tags) != len(pred_tags):
            raise ValueError(f"sentence {i}: {len(gold_tags)} gold tags but {len(pred_tags)} predicted")
        sentence_correct, sentence_predicted, sentence_gold = sentence_counts(gold_tags, pred_tags)
        correct.update(sentence_correct)
        predicted.update(sentence_predicted)
        gold.update(sentence_gold)
    scores = _prf(sum(correct.values()), sum(predicted.values()), sum(gold.values()))
    scores["per_type"] = {
        kind: {**_prf(correct[kind], predicted[kind], gold[kind]), "support": gold[kind]}
        for kind in sorted(gold.keys() | predicted.keys())
    }
    return scores
