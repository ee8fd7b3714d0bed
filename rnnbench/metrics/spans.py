"""Entity-level precision, recall and F1 by the rules of CoNLL's conlleval script.

A span is ``(type, start, end)`` with ``end`` exclusive. Chunking follows conlleval, so IOB1 and
IOB2 tags both work: ``B-X`` always starts an entity, ``I-X`` starts one when it follows ``O`` or
another type, and an entity ends before ``O``, ``B-`` or an ``I-`` of another type. An entity
counts as correct only when its type and both boundaries match.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


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


def _prf(correct: int, predicted: int, gold: int) -> dict[str, float]:
    # conlleval's convention: an empty denominator scores 0, never a division error
    precision = correct / predicted if predicted else 0.0
    recall = correct / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def span_f1(gold_sequences: Sequence[Sequence[str]], pred_sequences: Sequence[Sequence[str]]) -> dict:
    """Micro-averaged entity scores over sentences, plus ``per_type`` scores with gold ``support``."""
    if len(gold_sequences) != len(pred_sequences):
        raise ValueError(f"{len(gold_sequences)} gold sentences but {len(pred_sequences)} predicted")
    correct, predicted, gold = Counter(), Counter(), Counter()
    for i, (gold_tags, pred_tags) in enumerate(zip(gold_sequences, pred_sequences)):
        if len(gold_tags) != len(pred_tags):
            raise ValueError(f"sentence {i}: {len(gold_tags)} gold tags but {len(pred_tags)} predicted")
        gold_spans, pred_spans = extract_spans(gold_tags), extract_spans(pred_tags)
        gold.update(kind for kind, _, _ in gold_spans)
        predicted.update(kind for kind, _, _ in pred_spans)
        correct.update(kind for kind, _, _ in gold_spans & pred_spans)
    scores = _prf(sum(correct.values()), sum(predicted.values()), sum(gold.values()))
    scores["per_type"] = {
        kind: {**_prf(correct[kind], predicted[kind], gold[kind]), "support": gold[kind]}
        for kind in sorted(gold.keys() | predicted.keys())
    }
    return scores
