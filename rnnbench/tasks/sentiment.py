"""Sentiment classification: embed words, encode the sentence, pool, classify.

Batches hold variable-length texts bucketed by length. The true lengths go to the encoder and
every pooling mode ignores padded positions, so padding never changes a prediction.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from rnnbench import hookimpl
from rnnbench.data.batching import padded_batches, to_device
from rnnbench.data.readers import (
    LabelledTexts,
    find_split_files,
    holdout_split,
    read_aclimdb,
    read_labelled_texts,
)
from rnnbench.data.resolve import DataFile
from rnnbench.data.vocab import TOKENIZERS, UNK, UNK_ID, Vocab
from rnnbench.errors import ConfigError, DataError
from rnnbench.hparams import positive_int
from rnnbench.task import SHARE, SPLITS, Batch, EncoderFactory, Metric, Task, TaskOptions

# The SST-2 test labels and the IMDB CSVs were built for this project: no canonical URL to fetch.
SST2_FILES = {
    "train": DataFile(
        "sentiment/sst2/train.tsv", "48eac26399f8456935f81dd9e3a745c1430adb6c62e233ccfe22db4a0d15d1d1"
    ),
    "valid": DataFile(
        "sentiment/sst2/dev.tsv", "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0"
    ),
    "test": DataFile(
        "sentiment/sst2/test.tsv", "4c395e34c8ae196d76abc3724c42336f2e17ad6dab6977be7a690f4c36b140ca"
    ),
}
IMDB_FILES = {
    "train": DataFile(
        "sentiment/imdb/train.csv.gz", "abaaae4488bf0ea13abe2ce1bcb893ab75f3039bf2541b6f5823188d320b1754"
    ),
    "test": DataFile(
        "sentiment/imdb/test.csv.gz", "fa1c8a39aad42af21bc209b054b7a3b2916d7ce9b876db1cbf5fbc0eb002801d"
    ),
}
USER_FILE_EXTENSIONS = (".csv", ".tsv", ".csv.gz", ".tsv.gz")
USER_FILE_OPTIONS = ("train_file", "valid_file", "test_file", "text_column", "label_column", "delimiter")
# SST-2 comes PTB-tokenised and the synthetic texts are words joined by spaces: split them as they
# are. IMDB reviews and user files are raw text.
DEFAULT_TOKENIZER = {"synthetic": "whitespace", "sst2": "whitespace", "imdb": "regex", "csv": "regex"}


class SentimentOptions(TaskOptions):
    pooling: Literal["final", "mean", "max"] = "final"
    max_len: int = Field(400, ge=1, description="tokens kept from the start of each text")
    tokenizer: Literal["whitespace", "regex"] | None = Field(
        None,
        description="whitespace: split pre-tokenised text as it is (default for sst2 and synthetic); "
        "regex: words and punctuation of raw text, HTML tags dropped (default for imdb and csv); "
        "both lowercase",
    )
    min_freq: int = Field(2, ge=1, description="training-split count a word needs to enter the vocabulary")
    max_vocab: int = Field(30000, ge=3, description="vocabulary size including <pad> and <unk>")
    valid_fraction: float = Field(
        0.1,
        gt=0.0,
        lt=1.0,
        description="share of train held out (stratified) when a dataset has no valid file",
    )
    synthetic_size: int = Field(
        2000, ge=40, le=1_000_000, description="synthetic training texts; valid and test get a quarter each"
    )
    # dataset "csv" only
    train_file: str | None = None
    valid_file: str | None = None
    test_file: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    delimiter: str | None = Field(None, description="default: tab for .tsv files, comma otherwise")


@dataclass
class EncodedSplit:
    """Token ids of each example (truncated to max_len) and class indices."""

    ids: list[Tensor]
    labels: Tensor
    truncated: int
    unknown_tokens: int
    tokens: int


def pool(outputs: Tensor, lengths: Tensor, mode: str, num_directions: int) -> Tensor:
    """``[B, T, F]`` encoder outputs -> ``[B, F]``, reading real positions only.

    ``final`` concatenates the forward direction at the last real position with the backward
    direction at position 0, where each has read the whole sequence.
    """
    steps = torch.arange(outputs.shape[1], device=outputs.device)
    real = (steps.unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(-1)
    if mode == "mean":
        return (outputs * real).sum(1) / lengths.unsqueeze(1).to(outputs.dtype)
    if mode == "max":
        return outputs.masked_fill(~real, float("-inf")).amax(1)
    last = outputs[torch.arange(outputs.shape[0], device=outputs.device), lengths - 1]
    if num_directions == 1:
        return last
    forward_size = outputs.shape[-1] // num_directions
    return torch.cat([last[:, :forward_size], outputs[:, 0, forward_size:]], dim=-1)


class SentimentClassifier(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        embedding_dim: int,
        make_encoder: EncoderFactory,
        num_classes: int,
        *,
        pooling: str,
        dropout: float,
    ):
        super().__init__()
        self.pooling = pooling
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=0)
        self.encoder = make_encoder(embedding_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.encoder.output_size, num_classes)

    def forward(self, tokens: Tensor, lengths: Tensor | None) -> Tensor:
        """Class logits ``[B, classes]`` of ``tokens [B, T]`` with true ``lengths [B]`` (CPU)."""
        if lengths is None:
            lengths = torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.long)
        outputs, _ = self.encoder(self.dropout(self.embedding(tokens)), lengths)
        pooled = pool(outputs, to_device(lengths, tokens.device), self.pooling, self.encoder.num_directions)
        return self.head(self.dropout(pooled))


class PaddedTextClassifier(nn.Module):
    """Serving form: token ids ``[B, T]`` padded with 0 at the end -> class logits ``[B, classes]``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor) -> Tensor:
        lengths = (tokens != 0).sum(dim=1).clamp(min=1).cpu()
        return self.model(tokens, lengths)


class SentimentTask(Task):
    """Sentiment classification of texts (SST-2, IMDB, your CSV): accuracy."""

    name = "sentiment"
    metrics = (
        # margin 0.005: half an accuracy point, below which SST-2 papers do not claim a difference
        Metric("accuracy", "maximize", "share of texts classified correctly", SHARE, 0.005),
        Metric("f1", "maximize", "macro-averaged F1 over classes", SHARE),
    )
    causal = False
    datasets = ("synthetic", "sst2", "imdb", "csv")
    Options = SentimentOptions
    hparam_defaults = {"embedding_dim": 64}
    hparam_domains = {"embedding_dim": positive_int()}

    def __init__(self, dataset: str = "synthetic", *, data_path=None, seed: int = 0, **options):
        super().__init__(dataset, data_path=data_path, seed=seed, **options)
        if dataset != "csv" and (misplaced := sorted(set(USER_FILE_OPTIONS) & self.options.model_fields_set)):
            raise ConfigError(
                f"task 'sentiment' options {misplaced} only apply to dataset 'csv', not {dataset!r}"
            )
        self.tokenizer: str = self.options.tokenizer or DEFAULT_TOKENIZER[dataset]
        self.vocab: Vocab | None = None
        self.classes: list[str] = []
        self.splits: dict[str, EncodedSplit] = {}

    # -- data -----------------------------------------------------------------------------------
    def setup(self) -> None:
        raw = self.read_raw_splits()
        for texts in raw.values():
            if not texts.texts:
                raise DataError(f"{texts.path} holds no examples")
        self.classes = _sorted_labels(raw["train"].labels)
        if len(self.classes) < 2:  # it would "score" accuracy 1.0 by always answering that class
            raise DataError(
                f"{raw['train'].path}: every training example has label {self.classes[0]!r}; "
                f"a classifier needs two or more classes (check label_column and the file)"
            )
        class_index = {label: i for i, label in enumerate(self.classes)}
        for split in ("valid", "test"):
            _check_labels(raw[split], class_index)
        tokenize = TOKENIZERS[self.tokenizer]
        tokens = {split: [tokenize(text) or [UNK] for text in raw[split].texts] for split in SPLITS}
        self.vocab = Vocab.build(
            tokens["train"], min_freq=self.options.min_freq, max_size=self.options.max_vocab
        )
        self.splits = {
            split: self._encode(tokens[split], [class_index[label] for label in raw[split].labels])
            for split in SPLITS
        }

    def _encode(self, token_lists: list[list[str]], labels: list[int]) -> EncodedSplit:
        max_len = self.options.max_len
        ids = self.vocab.encode_many([tokens[:max_len] for tokens in token_lists])
        flat = torch.cat(ids)
        return EncodedSplit(
            ids=ids,
            labels=torch.tensor(labels, dtype=torch.long),
            truncated=sum(len(tokens) > max_len for tokens in token_lists),
            unknown_tokens=int((flat == UNK_ID).sum()),
            tokens=len(flat),
        )

    def read_raw_splits(self) -> dict[str, LabelledTexts]:
        """The texts and label strings of each split as read, before tokenization (fast: no vocabulary)."""
        if self.dataset == "synthetic":
            return {
                split: synthetic_reviews(size, seed=self.seed, split=split)
                for split, size in self._synthetic_sizes().items()
            }
        if self.dataset == "sst2":
            return {
                split: read_labelled_texts(self.named_file(file), "sentence", "label", delimiter="\t")
                for split, file in SST2_FILES.items()
            }
        if self.dataset == "imdb":
            root = self._aclimdb_root()
            if root is not None:
                train, test = read_aclimdb(root, "train"), read_aclimdb(root, "test")
            else:
                train, test = (
                    read_labelled_texts(self.named_file(IMDB_FILES[s]), "text", "label")
                    for s in ("train", "test")
                )
            return {**self._hold_out_valid(train), "test": test}
        return self._read_user_files()

    def _synthetic_sizes(self) -> dict[str, int]:
        size = self.options.synthetic_size
        return {"train": size, "valid": size // 4, "test": size // 4}

    def _aclimdb_root(self) -> Path | None:
        if self.data_path is None:
            return None
        for root in (self.data_path, self.data_path / "aclImdb"):
            if (root / "train" / "pos").is_dir():
                return root
        return None

    def _hold_out_valid(self, train: LabelledTexts) -> dict[str, LabelledTexts]:
        kept, held = holdout_split(
            len(train.labels), self.options.valid_fraction, seed=self.seed, strata=train.labels
        )
        return {"train": _subset(train, kept), "valid": _subset(train, held)}

    def _read_user_files(self) -> dict[str, LabelledTexts]:
        opts = self.options
        files = find_split_files(
            self.data_path,
            {"train": opts.train_file, "valid": opts.valid_file, "test": opts.test_file},
            USER_FILE_EXTENSIONS,
        )
        if files["train"] is None or files["test"] is None:
            missing = [s for s in ("train", "test") if files[s] is None]
            raise DataError(
                f"dataset 'csv' found no {' or '.join(missing)} file: give options train_file and "
                f"test_file (valid_file is optional), or a data_path directory holding train.csv and "
                f"test.csv (or .tsv, .csv.gz; dev.csv or valid.csv for validation)"
                + (f"; looked in {self.data_path}" if self.data_path else "")
            )
        read = {
            split: read_labelled_texts(path, opts.text_column, opts.label_column, delimiter=opts.delimiter)
            for split, path in files.items()
            if path is not None
        }
        if "valid" in read:
            return read
        return {**self._hold_out_valid(read["train"]), "test": read["test"]}

    def batches(
        self, split: str, batch_size: int, *, device: torch.device, generator: torch.Generator | None = None
    ) -> Iterator[Batch]:
        """Batches of ``[B, T]`` token ids and ``[B]`` labels; ``lengths`` stays on the CPU, where
        the encoder needs it for packing, so reading it never waits for the device;
        ``extra["index"]``: the texts' indices in the split (CPU)."""
        data = self._split(split)
        for index, tokens, lengths in padded_batches(data.ids, batch_size, generator=generator):
            yield Batch(
                inputs=to_device(tokens, device),  # pinned + asynchronous on CUDA
                targets=to_device(data.labels[index], device),
                lengths=lengths,
                tokens=int(lengths.sum()),
                extra={"index": index},
            )

    def _split(self, split: str) -> EncodedSplit:
        return self.pick_split(self.splits, split)

    # -- model ----------------------------------------------------------------------------------
    def build_model(self, make_encoder: EncoderFactory, hparams: dict[str, Any]) -> nn.Module:
        if self.vocab is None:
            raise RuntimeError("call setup() before build_model()")
        hp = {**self.hparam_defaults, **hparams}
        return SentimentClassifier(
            len(self.vocab),
            int(hp["embedding_dim"]),
            make_encoder,
            len(self.classes),
            pooling=self.options.pooling,
            dropout=float(hp.get("dropout", 0.0)),
        )

    def training_loss(self, model: nn.Module, batch: Batch, carry: Any = None) -> tuple[Tensor, Any]:
        return F.cross_entropy(model(batch.inputs, batch.lengths), batch.targets), None

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, split: str, batch_size: int, *, device: torch.device
    ) -> dict[str, float]:
        classes = len(self.classes)
        confusion = torch.zeros(classes, classes, dtype=torch.long, device=device)
        for batch, predicted in self._predictions(model, split, batch_size, device):
            # index_put_ accumulates on the device; bincount would sync to size its output
            confusion.index_put_((batch.targets, predicted), torch.ones_like(predicted), accumulate=True)
        return classification_scores(confusion.cpu())

    @torch.no_grad()
    def evaluate_items(
        self, model: nn.Module, split: str, batch_size: int, *, device: torch.device
    ) -> pd.DataFrame:
        """One row per text: ``c_<t>_<p>`` (int32) is 1 where the true class is ``t`` and the predicted
        one ``p`` (indices into ``classes``), so the columns' sums are the confusion matrix."""
        indices, guesses = [], []
        for batch, predicted in self._predictions(model, split, batch_size, device):
            indices.append(batch.extra["index"])
            guesses.append(predicted)  # stays on the device: one transfer at the end
        index, order = torch.sort(torch.cat(indices))  # batches come by length: back to the split's order
        predicted = torch.cat(guesses).cpu()[order]
        classes = len(self.classes)
        cells = F.one_hot(self._split(split).labels[index] * classes + predicted, classes * classes)
        return pd.DataFrame(cells.to(torch.int32).numpy(), columns=_confusion_columns(classes))

    def metrics_from_sums(self, sums: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # the class count from the columns, not from setup(): the report has no data loaded
        classes = math.isqrt(sum(1 for c in sums if c.startswith("c_")))
        cells = np.stack([np.asarray(sums[c], dtype=np.float64) for c in _confusion_columns(classes)], -1)
        return confusion_scores(cells.reshape(*cells.shape[:-1], classes, classes))

    def _predictions(
        self, model: nn.Module, split: str, batch_size: int, device: torch.device
    ) -> Iterator[tuple[Batch, Tensor]]:
        """Each evaluation batch with its predicted classes ``[B]``, on the device."""
        for batch in self.batches(split, batch_size, device=device):
            yield batch, model(batch.inputs, batch.lengths).argmax(-1)

    def baseline(self, split: str) -> dict[str, float]:
        """Always predict the most frequent training class."""
        train_labels, labels = self._split("train").labels, self._split(split).labels
        majority = int(torch.bincount(train_labels, minlength=len(self.classes)).argmax())
        confusion = torch.zeros(len(self.classes), len(self.classes), dtype=torch.long)
        confusion[:, majority] = torch.bincount(labels, minlength=len(self.classes))
        return classification_scores(confusion)

    def export_state(self) -> dict[str, Any]:
        assert self.vocab is not None, "call setup() first"
        return {
            "input": "token ids [B, T] (int64), 0-padded at the end; output: class logits [B, classes]",
            "tokenizer": self.tokenizer,
            "max_len": self.options.max_len,
            "vocabulary": self.vocab.itos,
            "classes": [str(c) for c in self.classes],
        }

    def serving_model(self, model: nn.Module) -> nn.Module:
        return PaddedTextClassifier(model)

    def describe(self) -> dict[str, Any]:
        if not self.splits:
            return {"dataset": self.dataset}
        return {
            "dataset": self.dataset,
            "classes": self.classes,
            "examples": {s: len(d.ids) for s, d in self.splits.items()},
            "class_counts": {
                s: torch.bincount(d.labels, minlength=len(self.classes)).tolist()
                for s, d in self.splits.items()
            },
            "vocab_size": len(self.vocab),
            "tokenizer": self.tokenizer,
            "max_len": self.options.max_len,
            "truncated": {s: d.truncated for s, d in self.splits.items()},
            "mean_tokens": {s: d.tokens / max(len(d.ids), 1) for s, d in self.splits.items()},
            "unknown_token_rate": {s: d.unknown_tokens / max(d.tokens, 1) for s, d in self.splits.items()},
        }


def classification_scores(confusion: Tensor) -> dict[str, float]:
    """Accuracy and macro F1 from a ``[true, predicted]`` count matrix."""
    return {name: float(score) for name, score in confusion_scores(confusion.double().numpy()).items()}


def confusion_scores(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy and macro F1 of ``[..., true, predicted]`` count matrices (any leading shape)."""
    correct = np.diagonal(confusion, axis1=-2, axis2=-1)
    true_counts, predicted_counts = confusion.sum(-1), confusion.sum(-2)
    f1 = 2 * correct / np.maximum(true_counts + predicted_counts, 1)  # F1 = 2TP / (2TP + FP + FN)
    return {
        "accuracy": correct.sum(-1) / np.maximum(confusion.sum((-2, -1)), 1),
        "f1": f1.mean(-1),
    }


def _confusion_columns(classes: int) -> list[str]:
    """Item columns ``c_<true>_<predicted>``, row-major: reshaped they give the confusion matrix."""
    return [f"c_{true}_{predicted}" for true in range(classes) for predicted in range(classes)]


def _sorted_labels(labels: list[str]) -> list[str]:
    """Distinct labels in sorted order, numerically when every label is a number ("2" before "10")."""
    distinct = set(labels)
    try:
        return sorted(distinct, key=float)
    except ValueError:
        return sorted(distinct)


def _check_labels(texts: LabelledTexts, class_index: dict[str, int]) -> None:
    for row, (label, line) in enumerate(zip(texts.labels, texts.lines), start=1):
        if label not in class_index:
            raise DataError(
                f"{texts.path} line {line} (row {row}): label {label!r} does not occur in the training "
                f"data, whose labels are {list(class_index)}"
            )


def _subset(texts: LabelledTexts, index: list[int]) -> LabelledTexts:
    return LabelledTexts(
        texts.path,
        [texts.texts[i] for i in index],
        [texts.labels[i] for i in index],
        [texts.lines[i] for i in index],
    )


# -- synthetic data -------------------------------------------------------------------------------
POSITIVE_WORDS = ("good", "great", "excellent", "wonderful", "brilliant", "enjoyable", "charming", "moving")
NEGATIVE_WORDS = ("bad", "awful", "boring", "dull", "terrible", "weak", "clumsy", "tedious")
NEGATORS = ("not", "never", "hardly")
NEUTRAL_WORDS = (
    "the", "a", "film", "movie", "plot", "acting", "story", "cast", "script", "music", "ending", "scenes",
    "was", "is", "seems", "and", "but", "with", "quite", "really", "rather", "overall", "director", "it",
    "this", "of", "its", "some", "long", "new", "old", ",", ".",
)  # fmt: skip


def synthetic_reviews(count: int, *, seed: int, split: str) -> LabelledTexts:
    """Texts of neutral filler with one to three sentiment words, some negated ("not good").

    The label is the sign of the summed polarity, a negator flipping the word right after it, so a
    model must count and read word order; ties are re-drawn, so classes are close to balanced.
    """
    rng = random.Random(f"sentiment-{seed}-{split}")
    texts, labels = [], []
    while len(texts) < count:
        phrases, score = [], 0
        for _ in range(rng.randint(1, 3)):
            polarity = rng.choice((1, -1))
            word = rng.choice(POSITIVE_WORDS if polarity > 0 else NEGATIVE_WORDS)
            if rng.random() < 0.3:
                phrases.append([rng.choice(NEGATORS), word])
                polarity = -polarity
            else:
                phrases.append([word])
            score += polarity
        if score == 0:
            continue
        # Shuffle whole phrases among the filler so a negator always stays before its own word.
        units = phrases + [[rng.choice(NEUTRAL_WORDS)] for _ in range(rng.randint(4, 16))]
        rng.shuffle(units)
        texts.append(" ".join(word for unit in units for word in unit))
        labels.append("pos" if score > 0 else "neg")
    return LabelledTexts(Path(f"<synthetic {split}>"), texts, labels, list(range(1, count + 1)))


@hookimpl
def rnnbench_tasks():
    return {"sentiment": SentimentTask}
