"""The sentiment task: learning, padding invariance, readers, user CSV files and the real datasets."""

from __future__ import annotations

import gzip

import pytest
import torch

from rnnbench.data.batching import bucketed_index_batches, padded_batches
from rnnbench.data.vocab import PAD_ID, UNK_ID, Vocab, tokenize, whitespace_tokenize
from rnnbench.encoder import Encoder
from rnnbench.errors import ConfigError, DataError
from rnnbench.tasks import sentiment
from rnnbench.tasks.sentiment import SentimentTask
from tests.helpers import train_briefly

CPU = torch.device("cpu")


# -- tokenizer, vocabulary, batching ----------------------------------------------------------------
def test_tokenize_lowercases_drops_html_and_splits_punctuation():
    assert tokenize("Great film!<br /><br />I didn't LIKE the end...") == [
        "great", "film", "!", "i", "didn't", "like", "the", "end", ".", ".", ".",
    ]  # fmt: skip


def test_whitespace_tokenize_keeps_tokens_that_come_tokenised():
    ptb = "it 's a charming and often affecting journey -- a sci-fi tale , mr. smith . "
    assert whitespace_tokenize(ptb) == [
        "it", "'s", "a", "charming", "and", "often", "affecting", "journey", "--", "a", "sci-fi", "tale",
        ",", "mr.", "smith", ".",
    ]  # fmt: skip
    assert tokenize(ptb)[:3] == ["it", "'", "s"]  # the regex splits the clitic a second time
    assert whitespace_tokenize("Great FILM") == ["great", "film"]  # lowercased, like the regex


def test_tokenizer_default_follows_the_dataset_and_the_option_overrides_it():
    assert SentimentTask("sst2").tokenizer == "whitespace"
    assert SentimentTask("synthetic").tokenizer == "whitespace"
    assert SentimentTask("imdb").tokenizer == "regex"
    assert SentimentTask("csv").tokenizer == "regex"
    assert SentimentTask("sst2", tokenizer="regex").tokenizer == "regex"
    assert SentimentTask("csv", tokenizer="whitespace").tokenizer == "whitespace"
    with pytest.raises(ConfigError, match="tokenizer"):
        SentimentTask("sst2", tokenizer="spacy")


def test_the_synthetic_texts_tokenise_alike_either_way():
    texts = sentiment.synthetic_reviews(300, seed=0, split="train").texts
    assert [whitespace_tokenize(t) for t in texts] == [tokenize(t) for t in texts]
    task = SentimentTask("synthetic", synthetic_size=200, tokenizer="regex")
    task.setup()
    default = SentimentTask("synthetic", synthetic_size=200)
    default.setup()
    assert default.vocab.itos == task.vocab.itos and default.describe()["tokenizer"] == "whitespace"


def test_csv_tokenizer_option_reaches_the_vocabulary(tmp_path):
    rows = [f"it 's sci-fi {w},{label}" for w, label in [("fun", "pos"), ("dull", "neg")] * 20]
    _write_csv(tmp_path / "train.csv", rows)
    _write_csv(tmp_path / "test.csv", rows[:4])
    vocabularies = {}
    for tokenizer in ("regex", "whitespace"):
        task = SentimentTask("csv", data_path=tmp_path, tokenizer=tokenizer)
        task.setup()
        vocabularies[tokenizer] = set(task.vocab.itos)
    assert {"'s", "sci-fi"} <= vocabularies["whitespace"] and not {"'s", "sci-fi"} & vocabularies["regex"]
    assert {"'", "s", "sci", "-", "fi"} <= vocabularies["regex"]


def test_vocab_keeps_frequent_words_with_pad_and_unk_first():
    vocab = Vocab.build([["b", "a", "b", "c"], ["a", "b", "d", "d"]], min_freq=2, max_size=4)
    assert vocab.itos == ["<pad>", "<unk>", "b", "a"]  # d ties a on count and loses on max_size
    assert vocab.encode(["a", "zzz", "b"]).tolist() == [3, UNK_ID, 2]
    assert vocab.index("<pad>") == PAD_ID
    parts = vocab.encode_many([["a"], [], ["b", "c"]])
    assert [p.tolist() for p in parts] == [[3], [], [2, UNK_ID]]


def test_bucketed_batches_cover_every_example_once_with_little_padding():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 200, (1000,), generator=generator)
    batches = bucketed_index_batches(lengths, 16, generator=generator)
    assert sorted(torch.cat(batches).tolist()) == list(range(1000))
    padded = sum(len(b) * int(lengths[b].max()) for b in batches)
    assert padded < 1.15 * int(lengths.sum())  # random batches would pad to ~1.9x
    again = bucketed_index_batches(lengths, 16, generator=generator)
    assert [b.tolist() for b in again] != [b.tolist() for b in batches]  # a new order every epoch
    fixed = bucketed_index_batches(lengths, 16)
    assert [b.tolist() for b in fixed] == [b.tolist() for b in bucketed_index_batches(lengths, 16)]


def test_padded_batches_return_true_lengths():
    sequences = [torch.tensor([5, 6, 7]), torch.tensor([8]), torch.tensor([9, 10])]
    ((index, padded, lengths),) = padded_batches(sequences, 3)
    for row, i in enumerate(index.tolist()):
        assert lengths[row] == len(sequences[i])
        assert padded[row, : lengths[row]].tolist() == sequences[i].tolist()
        assert padded[row, lengths[row] :].eq(PAD_ID).all()


# -- learning -------------------------------------------------------------------------------------
def test_registered_through_the_plugin_hook():
    assert sentiment.rnnbench_tasks() == {"sentiment": SentimentTask}


@pytest.mark.parametrize(
    ("cell", "bidirectional", "pooling"),
    [("lstm", False, "final"), ("gru", True, "final"), ("lstm", True, "mean")],
)
def test_synthetic_learns_well_beyond_the_majority_class(cell, bidirectional, pooling):
    task = SentimentTask("synthetic", seed=1, pooling=pooling, synthetic_size=1200)
    _, scores = train_briefly(task, cell, steps=120, bidirectional=bidirectional, hidden_size=24)
    majority = task.baseline("valid")["accuracy"]
    assert majority < 0.6
    assert scores["accuracy"] > majority + 0.25, scores
    assert set(scores) == {m.name for m in task.metrics}


def test_baseline_is_the_majority_training_class():
    task = SentimentTask("synthetic", synthetic_size=400)
    task.setup()
    train = task.splits["train"].labels
    majority = int(torch.bincount(train).argmax())
    valid = task.splits["valid"].labels
    assert task.baseline("valid")["accuracy"] == pytest.approx(float((valid == majority).double().mean()))


def test_synthetic_data_is_deterministic_by_seed():
    a = sentiment.synthetic_reviews(50, seed=3, split="train")
    b = sentiment.synthetic_reviews(50, seed=3, split="train")
    c = sentiment.synthetic_reviews(50, seed=4, split="train")
    assert a.texts == b.texts and a.labels == b.labels
    assert a.texts != c.texts


@pytest.mark.parametrize("cell", ["peephole", "lstm"])  # generic masked loop and fused packed kernel
@pytest.mark.parametrize("pooling", ["final", "mean", "max"])
def test_padding_never_changes_a_prediction(cell, pooling):
    task = SentimentTask("synthetic", synthetic_size=40, pooling=pooling)
    task.setup()
    torch.manual_seed(0)
    model = task.build_model(
        lambda n: Encoder(cell, n, 8, 2, bidirectional=True), {"embedding_dim": 6}
    ).eval()
    examples = task.splits["valid"].ids[:6]
    lengths = torch.tensor([len(x) for x in examples])
    padded = torch.zeros(len(examples), int(lengths.max()) + 7, dtype=torch.long)  # longer than needed
    for row, ids in enumerate(examples):
        padded[row, : len(ids)] = ids
    with torch.no_grad():
        batched = model(padded, lengths)
        alone = torch.cat([model(ids.unsqueeze(0), torch.tensor([len(ids)])) for ids in examples])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_truncation_is_counted():
    task = SentimentTask("synthetic", synthetic_size=200, max_len=8)
    task.setup()
    texts = task.read_raw_splits()
    assert task.describe()["truncated"] == {
        s: sum(len(tokenize(t)) > 8 for t in r.texts) for s, r in texts.items()
    }
    assert task.describe()["truncated"]["train"] > 0
    assert max(int(b.lengths.max()) for b in task.batches("train", 32, device=CPU)) == 8


def test_misplaced_and_invalid_options_are_refused():
    with pytest.raises(ConfigError, match="text_column"):
        SentimentTask("sst2", text_column="review")
    with pytest.raises(ConfigError, match="pooling"):
        SentimentTask("synthetic", pooling="last")


# -- user CSV files -------------------------------------------------------------------------------
def _write_csv(path, rows, header="text,label"):
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")


def test_user_csv_dataset_trains_and_holds_out_validation(tmp_path):
    good = ['"a truly great, moving film",good', "great fun,good", "wonderful cast,good"]
    bad = ["dull and boring,bad", "awful script,bad", '"bad, bad acting",bad']
    _write_csv(tmp_path / "train.csv", (good + bad) * 10)
    _write_csv(tmp_path / "test.csv", ["great film,good", "boring film,bad"])
    task = SentimentTask("csv", data_path=tmp_path, valid_fraction=0.2)
    _, scores = train_briefly(task, "gru", steps=30, hidden_size=8, batch_size=8)
    facts = task.describe()
    assert facts["classes"] == ["bad", "good"]
    assert facts["examples"] == {"train": 48, "valid": 12, "test": 2}
    assert facts["class_counts"]["valid"] == [6, 6]  # stratified hold-out
    assert 0.0 <= scores["accuracy"] <= 1.0


def test_user_tsv_with_named_files_and_columns(tmp_path):
    (tmp_path / "mine").mkdir()
    rows = ["1\tnice\t5", "2\tterrible\t1", "3\tfine\t10"]
    for name in ("a.tsv", "b.tsv", "c.tsv"):
        _write_csv(tmp_path / "mine" / name, rows, header="id\treview\tstars")
    task = SentimentTask(
        "csv", data_path=tmp_path / "mine", train_file="a.tsv", valid_file="b.tsv",
        test_file=str(tmp_path / "mine" / "c.tsv"), text_column="review", label_column="stars",
    )  # fmt: skip
    task.setup()
    assert task.classes == ["1", "5", "10"]  # numeric labels sort as numbers
    assert task.describe()["examples"] == {"train": 3, "valid": 3, "test": 3}


def test_wrong_column_names_the_file_the_column_and_the_columns_present(tmp_path):
    _write_csv(tmp_path / "train.csv", ["hello,pos"], header="review,label")
    _write_csv(tmp_path / "test.csv", ["hello,pos"], header="review,label")
    with pytest.raises(DataError) as info:
        SentimentTask("csv", data_path=tmp_path).setup()
    message = str(info.value)
    assert "train.csv" in message and "'text'" in message and "['review', 'label']" in message


def test_unknown_label_names_the_file_and_row(tmp_path):
    _write_csv(tmp_path / "train.csv", ["good film,pos", "bad film,neg"])
    _write_csv(tmp_path / "valid.csv", ["good film,pos"])
    _write_csv(tmp_path / "test.csv", ["good film,pos", "odd film,neutral"])
    with pytest.raises(DataError, match=r"test\.csv line 3 \(row 2\): label 'neutral'"):
        SentimentTask("csv", data_path=tmp_path).setup()


def test_short_row_and_missing_files_are_data_errors(tmp_path):
    _write_csv(tmp_path / "train.csv", ["good film,pos", "no label here"])
    _write_csv(tmp_path / "test.csv", ["good film,pos"])
    with pytest.raises(DataError, match=r"train\.csv line 3 \(row 2\) has 1 fields"):
        SentimentTask("csv", data_path=tmp_path).setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no train or test file"):
        SentimentTask("csv", data_path=tmp_path / "empty").setup()


def test_aclimdb_folder_layout(tmp_path):
    root = tmp_path / "aclImdb"
    reviews = {"pos": ["A gem.<br />Loved it", "Superb"], "neg": ["Dreadful", "A mess<br />really"]}
    for split in ("train", "test"):
        for label, texts in reviews.items():
            (root / split / label).mkdir(parents=True)
            for i, text in enumerate(texts * 10):
                (root / split / label / f"{i}_{8 if label == 'pos' else 2}.txt").write_text(text)
    task = SentimentTask("imdb", data_path=tmp_path)  # the parent of aclImdb works too
    task.setup()
    facts = task.describe()
    assert facts["examples"] == {"train": 36, "valid": 4, "test": 40}
    assert facts["class_counts"]["valid"] == [2, 2]
    assert "br" not in task.vocab


def test_offline_missing_file_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("RNNBENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("RNNBENCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match="sentiment/sst2/train.tsv not found and it has no download source"):
        SentimentTask("sst2").setup()


# -- the real datasets ----------------------------------------------------------------------------
def test_sst2_rows_and_label_balance(shared_data):
    task = SentimentTask("sst2")
    task.setup()
    facts = task.describe()
    assert facts["examples"] == {"train": 67_349, "valid": 872, "test": 1_821}
    assert facts["class_counts"] == {"train": [29_780, 37_569], "valid": [428, 444], "test": [912, 909]}
    assert facts["classes"] == ["0", "1"]
    raw = task.read_raw_splits()
    assert raw["train"].texts[0] == "hide new secretions from the parental units"  # trailing space gone
    assert facts["truncated"] == {"train": 0, "valid": 0, "test": 0}
    assert task.baseline("valid")["accuracy"] == pytest.approx(444 / 872)  # positive is the majority


def test_sst2_is_split_as_it_was_tokenised(shared_data):
    raw = SentimentTask("sst2").read_raw_splits()["train"].texts
    changed = [t for t in raw if tokenize(t) != whitespace_tokenize(t)]
    # Sentences the regex would re-split ('s -> ' s, -- -> - -, sci-fi -> sci - fi, mr. -> mr .)
    assert (len(changed), len(raw)) == (19_634, 67_349)
    clitic = [t for t in raw if any("'" in w and tokenize(w) != [w] for w in t.split())]
    assert len(clitic) == 9_666  # 9,666 of them over apostrophes: 's, 're, '' (n't stays whole)
    task = SentimentTask("sst2")
    task.setup()
    assert {"'s", "--", "sci-fi"} <= set(task.vocab.itos) and task.describe()["tokenizer"] == "whitespace"
    first = task.splits["train"].ids[0]
    assert task.vocab.decode(first) == raw[0].split()  # every word of the first sentence is in the vocabulary


def test_imdb_train_is_split_into_train_and_valid(shared_data):
    raw = SentimentTask("imdb", seed=0).read_raw_splits()
    assert (len(raw["train"].texts), len(raw["valid"].texts), len(raw["test"].texts)) == (
        22_500,
        2_500,
        25_000,
    )
    for split, half in (("train", 11_250), ("valid", 1_250), ("test", 12_500)):
        assert raw[split].labels.count("neg") == raw[split].labels.count("pos") == half
    # the hold-out is a partition of the 25,000 training rows, by file line
    assert sorted(raw["train"].lines + raw["valid"].lines) == list(range(2, 25_002))
    with gzip.open(shared_data / "sentiment/imdb/train.csv.gz", "rt", encoding="utf-8") as fh:
        assert fh.readline().strip() == "id,rating,label,text"


@pytest.mark.slow
def test_imdb_setup_truncates_long_reviews(shared_data):
    task = SentimentTask("imdb")
    task.setup()
    facts = task.describe()
    assert facts["examples"] == {"train": 22_500, "valid": 2_500, "test": 25_000}
    assert 0 < facts["truncated"]["test"] < 25_000
    assert facts["vocab_size"] == 30_000
