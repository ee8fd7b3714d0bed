"""Entity spans and F1 by conlleval's rules, on cases worked out by hand."""

from __future__ import annotations

import pytest

from rnnbench.metrics.spans import extract_spans, span_f1


def test_iob2_entities_with_exclusive_ends():
    tags = ["B-PER", "I-PER", "O", "B-LOC", "O"]
    assert extract_spans(tags) == {("PER", 0, 2), ("LOC", 3, 4)}


def test_stray_inside_tag_starts_an_entity():
    # IOB1 style: I-X after O, or after another type, opens a new entity (conlleval's rule)
    assert extract_spans(["O", "I-ORG", "I-ORG", "O"]) == {("ORG", 1, 3)}
    assert extract_spans(["B-PER", "I-LOC", "I-LOC"]) == {("PER", 0, 1), ("LOC", 1, 3)}
    assert extract_spans(["I-MISC"]) == {("MISC", 0, 1)}


def test_adjacent_entities_of_the_same_type_stay_apart():
    assert extract_spans(["B-PER", "B-PER", "I-PER"]) == {("PER", 0, 1), ("PER", 1, 3)}


def test_entity_at_the_end_of_the_sentence_is_closed():
    assert extract_spans(["O", "O", "B-LOC", "I-LOC"]) == {("LOC", 2, 4)}


def test_types_with_hyphens_keep_their_full_name():
    assert extract_spans(["B-creative-work", "I-creative-work"]) == {("creative-work", 0, 2)}


def test_unsupported_tag_is_refused():
    with pytest.raises(ValueError, match="S-PER"):
        extract_spans(["S-PER"])


def test_all_correct_scores_one():
    gold = [["B-PER", "I-PER", "O"], ["B-LOC", "O", "B-ORG"]]
    scores = span_f1(gold, gold)
    assert (scores["precision"], scores["recall"], scores["f1"]) == (1.0, 1.0, 1.0)
    assert scores["per_type"]["ORG"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}


def test_empty_predictions_score_zero_without_dividing_by_zero():
    gold = [["B-PER", "I-PER", "O"]]
    scores = span_f1(gold, [["O", "O", "O"]])
    assert (scores["precision"], scores["recall"], scores["f1"]) == (0.0, 0.0, 0.0)
    assert scores["per_type"]["PER"]["support"] == 1
    nothing = span_f1([["O"]], [["O"]])
    assert nothing["f1"] == 0.0 and nothing["per_type"] == {}


def test_boundary_error_is_both_a_false_positive_and_a_false_negative():
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    pred = [["B-PER", "O", "O", "B-LOC"]]  # PER cut short: wrong; LOC right
    scores = span_f1(gold, pred)
    # 1 correct of 2 predicted, 1 found of 2 gold
    assert scores["precision"] == pytest.approx(0.5)
    assert scores["recall"] == pytest.approx(0.5)
    assert scores["f1"] == pytest.approx(0.5)
    assert scores["per_type"]["PER"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert scores["per_type"]["LOC"]["f1"] == 1.0


def test_micro_average_counts_entities_not_sentences():
    gold = [["B-PER", "O"], ["B-ORG", "B-ORG", "B-ORG"]]
    pred = [["B-PER", "O"], ["B-ORG", "O", "B-LOC"]]
    scores = span_f1(gold, pred)
    # 2 correct (PER, first ORG) of 3 predicted; 4 gold (three one-token ORGs)
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 4)
    assert scores["per_type"]["ORG"]["recall"] == pytest.approx(1 / 3)
    assert scores["per_type"]["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="sentence 0"):
        span_f1([["O", "O"]], [["O"]])
    with pytest.raises(ValueError, match="gold sentences"):
        span_f1([["O"]], [])
