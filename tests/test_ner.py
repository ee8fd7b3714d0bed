"""The NER task: learning, padding invariance, the CoNLL reader, user files and the real datasets."""

from __future__ import annotations

import pytest
import torch

from rnnbench.data.readers import read_conll
from rnnbench.encoder import Encoder
from rnnbench.errors import ConfigError, DataError
from rnnbench.tasks import ner
from rnnbench.tasks.ner import NERTask, word_shape
from tests.helpers import train_briefly

CPU = torch.device("cpu")


# -- reader -----------------------------------------------------------------------------------------
def test_reader_skips_docstart_and_splits_sentences_at_blank_lines(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_bytes(
        b"-DOCSTART- -X- -X- O\n\n"
        b"EU NNP B-NP B-ORG\r\nrejects VBZ B-VP O\n"  # CRLF is tolerated
        b" \t\n"  # a line of only spaces and tabs ends a sentence too
        b"Peter\tNNP B-NP  B-PER\nBlackburn NNP I-NP I-PER\n\n\n"
    )
    sentences = read_conll(path)
    assert [s.tokens for s in sentences] == [("EU", "rejects"), ("Peter", "Blackburn")]
    assert [s.tags for s in sentences] == [("B-ORG", "O"), ("B-PER", "I-PER")]
    assert [s.line for s in sentences] == [3, 6]


def test_tab_separated_tokens_keep_spaces_and_invisible_characters(tmp_path):
    path = tmp_path / "tweets.conll"
    path.write_text("watched\u200bwas\tO\nDubbz\ufeff\tB-person\nNew York\tB-location\n\n", encoding="utf-8")
    (sentence,) = read_conll(path, delimiter="\t")
    assert sentence.tokens == ("watched\u200bwas", "Dubbz\ufeff", "New York")
    # split on any whitespace, a no-break space stays inside its token
    path.write_text("10\u00a0000 CD O\n", encoding="utf-8")
    assert read_conll(path)[0].tokens == ("10\u00a0000",)


def test_short_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.txt"
    path.write_text("EU B-ORG\nrejects O\n\nGerman\nbeef O\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.txt line 4 has 1 column"):
        read_conll(path)
    with pytest.raises(DataError, match=r"line 1 has 2 column\(s\), needs 4"):
        read_conll(path, tag_column=3)


def test_file_that_is_not_utf8_is_a_data_error(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"caf\xe9 O\n")
    with pytest.raises(DataError, match=r"latin1\.txt is not valid UTF-8"):
        read_conll(path)


def test_word_shapes():
    shapes = {t: word_shape(t) for t in ("the", "EU", "U.S.", "Peter", "I", "1996", "A4", ",", "iPhone")}
    assert shapes == {
        "the": "lower", "EU": "upper", "U.S.": "upper", "Peter": "title", "I": "title",
        "1996": "digit", "A4": "digit", ",": "other", "iPhone": "other",
    }  # fmt: skip


# -- learning -------------------------------------------------------------------------------------
def test_registered_through_the_plugin_hook():
    assert ner.rnnbench_tasks() == {"ner": NERTask}


@pytest.mark.parametrize(
    ("cell", "bidirectional", "char_features"), [("lstm", False, "shape"), ("gru", True, "none")]
)
def test_synthetic_f1_far_above_the_all_o_baseline(cell, bidirectional, char_features):
    task = NERTask("synthetic", seed=2, char_features=char_features, synthetic_size=600)
    _, scores = train_briefly(task, cell, steps=120, bidirectional=bidirectional, hidden_size=24)
    baseline = task.baseline("valid")
    assert baseline["f1"] == 0.0 and baseline["recall"] == 0.0
    assert scores["f1"] > 0.7, scores
    assert {"f1", "precision", "recall", "f1_PER", "f1_LOC", "f1_ORG"} <= set(scores)


def test_synthetic_data_is_deterministic_by_seed():
    a = ner.synthetic_sentences(30, seed=5, split="valid")
    assert a == ner.synthetic_sentences(30, seed=5, split="valid")
    assert a != ner.synthetic_sentences(30, seed=6, split="valid")


@pytest.mark.parametrize("cell", ["peephole", "lstm"])  # generic masked loop and fused packed kernel
def test_padding_never_changes_a_tag_score(cell):
    task = NERTask("synthetic", synthetic_size=40)
    task.setup()
    torch.manual_seed(0)
    model = task.build_model(
        lambda n: Encoder(cell, n, 8, 2, bidirectional=True), {"embedding_dim": 6}
    ).eval()
    data = task.splits["valid"]
    words, shapes = data.words[:5], data.shapes[:5]
    lengths = torch.tensor([len(w) for w in words])
    padded_words = torch.zeros(len(words), int(lengths.max()) + 4, dtype=torch.long)
    padded_shapes = torch.zeros_like(padded_words)
    for row in range(len(words)):
        padded_words[row, : lengths[row]] = words[row]
        padded_shapes[row, : lengths[row]] = shapes[row]
    with torch.no_grad():
        batched = model(padded_words, lengths, padded_shapes)
        for row in range(len(words)):
            alone = model(words[row][None], lengths[row : row + 1], shapes[row][None])[0]
            torch.testing.assert_close(batched[row, : lengths[row]], alone, atol=1e-5, rtol=1e-5)


def test_loss_ignores_padded_positions():
    task = NERTask("synthetic", synthetic_size=40)
    task.setup()
    torch.manual_seed(0)
    model = task.build_model(lambda n: Encoder("gru", n, 8), {}).eval()
    batch = next(task.batches("valid", 8, device=CPU))
    assert batch.targets[batch.inputs == 0].eq(-100).all()
    with torch.no_grad():
        loss, _ = task.training_loss(model, batch)
        logits = model(batch.inputs, batch.lengths, batch.extra["shapes"])
    real = batch.targets != -100
    expected = torch.nn.functional.cross_entropy(logits[real], batch.targets[real])
    torch.testing.assert_close(loss, expected)


def test_misplaced_options_are_refused():
    with pytest.raises(ConfigError, match="delimiter"):
        NERTask("conll2003", delimiter="\t")
    with pytest.raises(ConfigError, match="tag_column"):
        NERTask("synthetic", tag_column=2)


# -- user CoNLL files -----------------------------------------------------------------------------
TRAIN = "Anna B-PER\nvisited O\nOslo B-LOC\n\nAcme B-ORG\nCorp I-ORG\nhired O\nBoris B-PER\n\n"


def test_too_few_sentences_to_hold_out_validation(tmp_path):
    (tmp_path / "train.txt").write_text("EU B-ORG\n", encoding="utf-8")
    (tmp_path / "test.txt").write_text("EU B-ORG\n", encoding="utf-8")
    with pytest.raises(DataError, match="cannot hold out 10% of 1 training examples"):
        NERTask("conll", data_path=tmp_path).setup()


def test_user_conll_files_with_a_held_out_validation_split(tmp_path):
    (tmp_path / "train.conll").write_text(TRAIN * 10, encoding="utf-8")
    (tmp_path / "test.conll").write_text("Boris B-PER\nleft O\nOslo B-LOC\n", encoding="utf-8")
    task = NERTask("conll", data_path=tmp_path, valid_fraction=0.2)
    _, scores = train_briefly(task, "gru", steps=20, hidden_size=8, batch_size=4)
    facts = task.describe()
    assert facts["sentences"] == {"train": 16, "valid": 4, "test": 1}
    assert facts["entity_types"] == ["LOC", "ORG", "PER"]
    assert facts["tags"] == ["O", "B-LOC", "B-ORG", "I-ORG", "B-PER"]
    assert set(task.evaluate(task.build_model(lambda n: Encoder("rnn", n, 4), {}), "test", 2, device=CPU)) == {
        "f1", "precision", "recall", "f1_LOC", "f1_ORG", "f1_PER",
    }  # fmt: skip
    assert 0.0 <= scores["f1"] <= 1.0


def test_unknown_tag_names_the_file_and_line(tmp_path):
    (tmp_path / "train.txt").write_text(TRAIN, encoding="utf-8")
    (tmp_path / "dev.txt").write_text(TRAIN, encoding="utf-8")
    (tmp_path / "test.txt").write_text("Boris B-PER\n\nin O\nParis B-GPE\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"test\.txt line 4: tag 'B-GPE' does not occur in the training data"):
        NERTask("conll", data_path=tmp_path).setup()


def test_a_column_that_is_not_iob_tags_is_refused(tmp_path):
    for split in ("train", "valid", "test"):
        (tmp_path / f"{split}.txt").write_text("EU NNP B-ORG\nrejects VBZ O\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.txt line 1: tag 'NNP' is not O, B-TYPE or I-TYPE"):
        NERTask("conll", data_path=tmp_path, tag_column=1).setup()


# -- the real datasets ----------------------------------------------------------------------------
def test_conll2003_sentences_tokens_and_entities(shared_data):
    task = NERTask("conll2003")
    task.setup()
    facts = task.describe()
    assert facts["sentences"] == {"train": 14_041, "valid": 3_250, "test": 3_453}
    assert facts["tokens"] == {"train": 203_621, "valid": 51_362, "test": 46_435}
    assert facts["entities"] == {
        "train": 7_140 + 3_438 + 6_321 + 6_600, "valid": 1_837 + 922 + 1_341 + 1_842,
        "test": 1_668 + 702 + 1_661 + 1_617,
    }  # fmt: skip
    assert len(facts["tags"]) == 9 and facts["entity_types"] == ["LOC", "MISC", "ORG", "PER"]
    baseline = task.baseline("test")
    assert baseline["f1"] == 0.0 and baseline["f1_PER"] == 0.0


def test_wnut17_sentences_and_zero_width_tokens(shared_data):
    task = NERTask("wnut17")
    task.setup()
    facts = task.describe()
    assert facts["sentences"] == {"train": 3_394, "valid": 1_009, "test": 1_287}
    assert facts["tokens"] == {"train": 62_730, "valid": 15_733, "test": 23_394}
    assert len(facts["tags"]) == 13
    assert facts["entities"]["train"] == 221 + 140 + 264 + 548 + 660 + 142
    dev = {token: tag for s in task.splits["valid"].sentences for token, tag in zip(s.tokens, s.tags)}
    assert dev["watched\u200bwas"] == "O"
    assert dev["Dubbz\ufeff"] == "B-person"
