"""Named-entity recognition: tag every token, score whole entities by conlleval's rules.

Words are lowercased for the vocabulary; the optional ``shape`` feature gives back what lowercasing
hides (capitalisation, digits), which is most of the signal for spotting names.
"""

from __future__ import annotations

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
from rnnbench.data.batching import bucketed_index_batches, pad_batch, to_device
from rnnbench.data.readers import TaggedSentence, find_split_files, holdout_split, read_conll
from rnnbench.data.resolve import DataFile
from rnnbench.data.vocab import UNK_ID, Vocab
from rnnbench.errors import ConfigError, DataError
from rnnbench.hparams import Domain, positive_int
from rnnbench.metrics.spans import extract_spans, prf, sentence_counts, span_f1
from rnnbench.task import SHARE, Batch, EncoderFactory, Metric, Task, TaskOptions

CONLL2003_URL = (
    "https://raw.githubusercontent.com/kamalkraj/BERT-NER/e5be564156f194f1becb0d82aeaf6e762d9eb9ed/data"
)
WNUT17_URL = (
    "https://raw.githubusercontent.com/leondz/emerging_entities_17/e52a2d2a71ac1a051ca2d532eef28653c5c02603"
)
CONLL2003_FILES = {
    "train": DataFile(
        "ner/conll2003/train.txt",
        "213953b5522fb7924802d883e50f027b2c6ffb5d4d0e63368ed82909f9b60423",
        f"{CONLL2003_URL}/train.txt",
    ),
    "valid": DataFile(
        "ner/conll2003/valid.txt",
        "c02eb19809eafb83998326a0481942eb37d96f31826ae387cfe8773699969f5b",
        f"{CONLL2003_URL}/valid.txt",
    ),
    "test": DataFile(
        "ner/conll2003/test.txt",
        "dc4ac7f3d6d01a6bec59261814561da3b287b6b493b97d1f69c580b52ec1831b",
        f"{CONLL2003_URL}/test.txt",
    ),
}
WNUT17_FILES = {
    "train": DataFile(
        "ner/wnut17/train.conll",
        "731820e13f71af324c6b55a1575ec2ce59fbaa2a0806f8f0400b98d56cd6a7a5",
        f"{WNUT17_URL}/wnut17train.conll",
    ),
    "valid": DataFile(
        "ner/wnut17/dev.conll",
        "e053b752b8155113ca66e7db08af5f2f5f43ab993694e4774f1ec5bad42312d8",
        f"{WNUT17_URL}/emerging.dev.conll",
    ),
    "test": DataFile(
        "ner/wnut17/test.conll",
        "2aa79b764e56ec9264a1b30fdd9b70195bd00ff400b62edd8f399d5f13c178f0",
        f"{WNUT17_URL}/emerging.test.annotated",
    ),
}
# WNUT-17 is strictly tab-separated; its tokens may hold characters Python counts as spaces.
NAMED_DATASETS = {"conll2003": (CONLL2003_FILES, None), "wnut17": (WNUT17_FILES, "\t")}
USER_FILE_EXTENSIONS = (".txt", ".conll", ".tsv", ".iob", ".bio")
USER_FILE_OPTIONS = ("train_file", "valid_file", "test_file", "delimiter")
COLUMN_OPTIONS = ("token_column", "tag_column")
IGNORE = -100  # target at padded positions: cross_entropy skips it
ENTITY_COUNTS = ("tp", "fp", "fn")  # item columns: correct, spurious and missed entities

SHAPES = ("<pad>", "lower", "upper", "title", "digit", "other")


def word_shape(token: str) -> str:
    """Capitalisation pattern of a token: lower, upper ("EU", "U.S."), title, digit or other."""
    if any(ch.isdigit() for ch in token):
        return "digit"
    if token.islower():
        return "lower"
    if token.isupper() and sum(ch.isalpha() for ch in token) > 1:
        return "upper"
    if token.istitle():
        return "title"
    return "other"  # punctuation, mixed case such as "iPhone"


class NEROptions(TaskOptions):
    char_features: Literal["none", "shape"] = "shape"
    min_freq: int = Field(2, ge=1, description="training count a word needs; rarer words train <unk>")
    max_vocab: int | None = Field(None, ge=3, description="vocabulary size including <pad> and <unk>")
    valid_fraction: float = Field(
        0.1, gt=0.0, lt=1.0, description="share of train held out when a dataset has no valid file"
    )
    synthetic_size: int = Field(
        1000,
        ge=40,
        le=1_000_000,
        description="synthetic training sentences; valid and test get a quarter each",
    )
    token_column: int = 0
    tag_column: int = -1
    # dataset "conll" only
    train_file: str | None = None
    valid_file: str | None = None
    test_file: str | None = None
    delimiter: str | None = Field(None, description="default: any run of spaces and tabs")


@dataclass
class TaggedSplit:
    """One split: the sentences as read (gold tags) and their id tensors."""

    sentences: list[TaggedSentence]
    words: list[Tensor]
    shapes: list[Tensor]
    tags: list[Tensor]


class Tagger(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        embedding_dim: int,
        shape_dim: int,
        make_encoder: EncoderFactory,
        num_tags: int,
        *,
        dropout: float,
    ):
        super().__init__()
        self.words = nn.Embedding(vocab_size, embedding_dim, padding_idx=0)
        self.shapes = nn.Embedding(len(SHAPES), shape_dim, padding_idx=0) if shape_dim else None
        self.encoder = make_encoder(embedding_dim + shape_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.encoder.output_size, num_tags)

    def forward(self, words: Tensor, lengths: Tensor | None, shapes: Tensor | None = None) -> Tensor:
        """Tag logits ``[B, T, tags]`` of ``words [B, T]``; padded positions give garbage to ignore."""
        x = self.words(words)
        if self.shapes is not None:
            x = torch.cat([x, self.shapes(shapes)], dim=-1)
        outputs, _ = self.encoder(self.dropout(x), lengths)
        return self.head(self.dropout(outputs))


class PaddedTagger(nn.Module):
    """Serving form: ``[B, T, 2]`` int64 (word id, shape id), 0-padded at the end -> tag logits
    ``[B, T, tags]``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, words_and_shapes: Tensor) -> Tensor:
        words, shapes = words_and_shapes[..., 0], words_and_shapes[..., 1]
        lengths = (words != 0).sum(dim=1).clamp(min=1).cpu()
        return self.model(words, lengths, shapes)


class NERTask(Task):
    """Named-entity recognition (CoNLL-2003, WNUT-17, your CoNLL files): entity-level F1."""

    name = "ner"
    metrics = (
        # margin 0.005: half an F1 point, about the seed spread of published CoNLL-2003 BiLSTM taggers
        Metric(
            "f1",
            "maximize",
            "entity-level micro F1 (conlleval rules); f1_<TYPE> per entity type",
            SHARE,
            0.005,
        ),
        Metric("precision", "maximize", "share of predicted entities that are exactly right", SHARE),
        Metric("recall", "maximize", "share of gold entities found exactly", SHARE),
    )
    causal = False
    datasets = ("synthetic", "conll2003", "wnut17", "conll")
    Options = NEROptions
    hparam_defaults = {"embedding_dim": 64, "shape_dim": 8}
    hparam_domains = {"embedding_dim": positive_int(), "shape_dim": Domain("int", 0, 1024)}

    def __init__(self, dataset: str = "synthetic", *, data_path=None, seed: int = 0, **options):
        super().__init__(dataset, data_path=data_path, seed=seed, **options)
        given = self.options.model_fields_set
        if dataset != "conll" and (misplaced := sorted(set(USER_FILE_OPTIONS) & given)):
            raise ConfigError(
                f"task 'ner' options {misplaced} only apply to dataset 'conll', not {dataset!r}"
            )
        if dataset == "synthetic" and (misplaced := sorted(set(COLUMN_OPTIONS) & given)):
            raise ConfigError(f"task 'ner' options {misplaced} only apply to datasets read from files")
        self.vocab: Vocab | None = None
        self.tag_names: list[str] = []
        self.entity_types: list[str] = []
        self.splits: dict[str, TaggedSplit] = {}

    # -- data -----------------------------------------------------------------------------------
    def read_raw_splits(self) -> dict[str, tuple[Path, list[TaggedSentence]]]:
        """The file and sentences of each split as read, before any vocabulary is built."""
        if self.dataset == "synthetic":
            size = self.options.synthetic_size
            sizes = {"train": size, "valid": size // 4, "test": size // 4}
            return {
                s: (Path(f"<synthetic {s}>"), synthetic_sentences(n, seed=self.seed, split=s))
                for s, n in sizes.items()
            }
        if self.dataset in NAMED_DATASETS:
            files, delimiter = NAMED_DATASETS[self.dataset]
            paths = {split: self.named_file(file) for split, file in files.items()}
        else:
            opts = self.options
            delimiter = opts.delimiter
            paths = find_split_files(
                self.data_path,
                {"train": opts.train_file, "valid": opts.valid_file, "test": opts.test_file},
                USER_FILE_EXTENSIONS,
            )
            if paths["train"] is None or paths["test"] is None:
                missing = [s for s in ("train", "test") if paths[s] is None]
                raise DataError(
                    f"dataset 'conll' found no {' or '.join(missing)} file: give options train_file and "
                    "test_file (valid_file is optional), or a data_path directory holding train.txt and "
                    "test.txt (or .conll; dev.txt or valid.txt for validation)"
                    + (f"; looked in {self.data_path}" if self.data_path else "")
                )
        read = {
            split: (
                path,
                read_conll(
                    path,
                    token_column=self.options.token_column,
                    tag_column=self.options.tag_column,
                    delimiter=delimiter,
                ),
            )
            for split, path in paths.items()
            if path is not None
        }
        if "valid" not in read:
            path, sentences = read["train"]
            kept, held = holdout_split(len(sentences), self.options.valid_fraction, seed=self.seed)
            read["train"] = (path, [sentences[i] for i in kept])
            read["valid"] = (path, [sentences[i] for i in held])
        return read

    def setup(self) -> None:
        raw = self.read_raw_splits()
        train_tags = {tag for sentence in raw["train"][1] for tag in sentence.tags}
        self.tag_names = sorted(train_tags, key=lambda t: (t != "O", t[2:], t[:1]))  # O, then B-/I- by type
        self.entity_types = sorted({tag[2:] for tag in train_tags if tag != "O"})
        tag_index = {tag: i for i, tag in enumerate(self.tag_names)}
        for path, sentences in raw.values():
            if not sentences:
                raise DataError(f"{path} holds no sentences")
            _check_tags(path, sentences, tag_index)
        self.vocab = Vocab.build(
            (_words(s) for s in raw["train"][1]),
            min_freq=self.options.min_freq,
            max_size=self.options.max_vocab,
        )
        self.splits = {split: self._encode(sentences, tag_index) for split, (_, sentences) in raw.items()}

    def _encode(self, sentences: list[TaggedSentence], tag_index: dict[str, int]) -> TaggedSplit:
        shape_index = {shape: i for i, shape in enumerate(SHAPES)}
        return TaggedSplit(
            sentences=sentences,
            words=self.vocab.encode_many([_words(s) for s in sentences]),
            shapes=[torch.tensor([shape_index[word_shape(t)] for t in s.tokens]) for s in sentences],
            tags=[torch.tensor([tag_index[t] for t in s.tags]) for s in sentences],
        )

    def batches(
        self, split: str, batch_size: int, *, device: torch.device, generator: torch.Generator | None = None
    ) -> Iterator[Batch]:
        """``inputs``: word ids ``[B, T]``; ``extra["shapes"]``: shape ids ``[B, T]``; ``targets``: tag ids
        with -100 at padding; ``extra["index"]``: sentence indices (CPU); ``lengths`` on the CPU."""
        data = self._split(split)
        lengths = torch.tensor([len(s) for s in data.words], dtype=torch.long)
        for index in bucketed_index_batches(lengths, batch_size, generator=generator):
            words, batch_lengths = pad_batch(data.words, index)
            extra = {"index": index}
            if self.options.char_features == "shape":
                extra["shapes"] = to_device(pad_batch(data.shapes, index)[0], device)
            yield Batch(
                inputs=to_device(words, device),  # pinned + asynchronous on CUDA
                targets=to_device(pad_batch(data.tags, index, IGNORE)[0], device),
                lengths=batch_lengths,
                tokens=int(batch_lengths.sum()),
                extra=extra,
            )

    def _split(self, split: str) -> TaggedSplit:
        return self.pick_split(self.splits, split)

    # -- model ----------------------------------------------------------------------------------
    def build_model(self, make_encoder: EncoderFactory, hparams: dict[str, Any]) -> nn.Module:
        if self.vocab is None:
            raise RuntimeError("call setup() before build_model()")
        hp = {**self.hparam_defaults, **hparams}
        return Tagger(
            len(self.vocab),
            int(hp["embedding_dim"]),
            int(hp["shape_dim"]) if self.options.char_features == "shape" else 0,
            make_encoder,
            len(self.tag_names),
            dropout=float(hp.get("dropout", 0.0)),
        )

    def training_loss(self, model: nn.Module, batch: Batch, carry: Any = None) -> tuple[Tensor, Any]:
        logits = model(batch.inputs, batch.lengths, batch.extra.get("shapes"))
        # mean over real tokens only: padded targets are IGNORE
        return F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE), None

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, split: str, batch_size: int, *, device: torch.device
    ) -> dict[str, float]:
        sentences = self._split(split).sentences
        predicted = self._predicted_tags(model, split, batch_size, device)
        return self._scores([sentences[i].tags for i in predicted], list(predicted.values()))

    @torch.no_grad()
    def evaluate_items(
        self, model: nn.Module, split: str, batch_size: int, *, device: torch.device
    ) -> pd.DataFrame:
        """One row per sentence, entity counts by conlleval's rules (int32): ``tp``, ``fp``, ``fn`` over
        all types, then ``tp_<TYPE>``, ``fp_<TYPE>``, ``fn_<TYPE>`` for each training entity type."""
        sentences = self._split(split).sentences
        guesses = self._predicted_tags(model, split, batch_size, device)
        # Every gold and predicted type is a training type (setup checks the gold tags).
        per_type = np.zeros((len(guesses), len(self.entity_types), 3), dtype=np.int32)
        for row, (i, guessed) in enumerate(guesses.items()):
            correct, predicted, gold = sentence_counts(sentences[i].tags, guessed)
            for column, kind in enumerate(self.entity_types):
                per_type[row, column] = (
                    correct[kind],
                    predicted[kind] - correct[kind],
                    gold[kind] - correct[kind],
                )
        counts = np.concatenate([per_type.sum(1, keepdims=True, dtype=np.int32), per_type], axis=1)
        columns = [*ENTITY_COUNTS] + [
            f"{count}_{kind}" for kind in self.entity_types for count in ENTITY_COUNTS
        ]
        return pd.DataFrame(counts.reshape(len(guesses), -1), columns=columns)

    def metrics_from_sums(self, sums: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        def scores(suffix: str) -> dict[str, np.ndarray]:
            tp, fp, fn = (np.asarray(sums[f"{count}{suffix}"], dtype=np.float64) for count in ENTITY_COUNTS)
            return prf(tp, tp + fp, tp + fn)

        result = scores("")
        # the entity types from the columns, not from setup(): the report has no data loaded
        for kind in sorted(c.removeprefix("tp_") for c in sums if c.startswith("tp_")):
            result[f"f1_{kind}"] = scores(f"_{kind}")["f1"]
        return result

    def _predicted_tags(
        self, model: nn.Module, split: str, batch_size: int, device: torch.device
    ) -> dict[int, list[str]]:
        """Sentence index -> predicted tags, for every sentence the evaluation batches hold, in the
        split's order."""
        predicted, layout = [], []
        for batch in self.batches(split, batch_size, device=device):
            logits = model(batch.inputs, batch.lengths, batch.extra.get("shapes"))
            predicted.append(logits.argmax(-1).flatten())  # stays on the device: one transfer at the end
            layout.append((batch.extra["index"], batch.lengths, batch.inputs.shape[1]))
        guessed: dict[int, list[str]] = {}
        sizes = [len(index) * steps for index, _, steps in layout]
        for flat, (index, lengths, steps) in zip(torch.cat(predicted).cpu().split(sizes), layout):
            rows = flat.view(len(index), steps).tolist()
            for tag_ids, i, n in zip(rows, index.tolist(), lengths.tolist()):
                guessed[i] = [self.tag_names[t] for t in tag_ids[:n]]
        return dict(sorted(guessed.items()))

    def _scores(self, gold: list, predicted: list) -> dict[str, float]:
        scores = span_f1(gold, predicted)
        result = {name: scores[name] for name in ("f1", "precision", "recall")}
        for kind in self.entity_types:  # every training type, so each run logs the same metric names
            result[f"f1_{kind}"] = scores["per_type"].get(kind, {}).get("f1", 0.0)
        return result

    def baseline(self, split: str) -> dict[str, float]:
        """Tag every token O: no entity is predicted, so F1 is 0 (computed, not assumed)."""
        gold = [s.tags for s in self._split(split).sentences]
        return self._scores(gold, [["O"] * len(tags) for tags in gold])

    def export_state(self) -> dict[str, Any]:
        assert self.vocab is not None, "call setup() first"
        return {
            "input": "[B, T, 2] int64: lowercased word id and word-shape id, 0-padded at the end; "
            "output: tag logits [B, T, tags]",
            "vocabulary": self.vocab.itos,
            "shapes": list(SHAPES),
            "tags": self.tag_names,
        }

    def serving_model(self, model: nn.Module) -> nn.Module:
        return PaddedTagger(model)

    def serving_example(self) -> Tensor:
        batch = next(iter(self.batches("test", 2, device=torch.device("cpu"))))
        shapes = batch.extra.get("shapes", torch.zeros_like(batch.inputs))
        return torch.stack([batch.inputs, shapes], dim=-1)

    def describe(self) -> dict[str, Any]:
        if not self.splits:
            return {"dataset": self.dataset}
        return {
            "dataset": self.dataset,
            "sentences": {s: len(d.sentences) for s, d in self.splits.items()},
            "tokens": {s: sum(len(x) for x in d.words) for s, d in self.splits.items()},
            "tags": self.tag_names,
            "entity_types": self.entity_types,
            "vocab_size": len(self.vocab),
            "unknown_token_rate": {
                s: float(torch.cat(d.words).eq(UNK_ID).float().mean()) for s, d in self.splits.items()
            },
            "entities": {
                s: sum(len(extract_spans(sentence.tags)) for sentence in d.sentences)
                for s, d in self.splits.items()
            },
            "char_features": self.options.char_features,
        }


def _words(sentence: TaggedSentence) -> list[str]:
    return [token.lower() for token in sentence.tokens]


def _is_iob(tag: str) -> bool:
    return tag == "O" or (tag[:2] in ("B-", "I-") and len(tag) > 2)


def _check_tags(path: Path, sentences: list[TaggedSentence], tag_index: dict[str, int]) -> None:
    """Name the first tag that is not O/B-TYPE/I-TYPE or that the training data never uses."""
    usable = {tag for tag in tag_index if _is_iob(tag)}
    for sentence in sentences:
        for offset, tag in enumerate(sentence.tags):
            if tag in usable:
                continue
            line = sentence.line + offset
            if not _is_iob(tag):
                raise DataError(
                    f"{path} line {line}: tag {tag!r} is not O, B-TYPE or I-TYPE (IOB1/IOB2 tags are "
                    "supported; check tag_column)"
                )
            raise DataError(
                f"{path} line {line}: tag {tag!r} does not occur in the training data "
                f"(training tags: {list(tag_index)})"
            )


# -- synthetic data -------------------------------------------------------------------------------
# "Jordan" and "Morgan" belong to two types each, so the context has to decide.
PERSON_FIRST = ("Anna", "Boris", "Chen", "Dara", "Emil", "Farah", "Jordan", "Morgan")
PERSON_LAST = ("Ito", "Jones", "Kowalski", "Larsen", "Moreau", "Novak")
PLACES = ("Paris", "Lagos", "Oslo", "Lima", "Hanoi", "Quito", "Jordan", "Perth")
COMPANIES = ("Acme", "Globex", "Initech", "Vandelay", "Morgan", "Hooli")
COMPANY_SUFFIX = ("Corp", "Bank", "Group")
CUES = {
    "PER": ("said", "met", "thanked", "asked"),
    "LOC": ("in", "from", "to", "near"),
    "ORG": ("at", "joined", "by", "sued"),
}
FILLER = ("the", "a", "report", "team", "was", "is", "and", "but", "with", "today", "new", "plan",
          "deal", "after", "of", "on", "market", "talks", "visit", "week", ",", ".")  # fmt: skip


def _synthetic_entity(rng: random.Random, kind: str) -> list[str]:
    if kind == "PER":
        return [rng.choice(PERSON_FIRST)] + ([rng.choice(PERSON_LAST)] if rng.random() < 0.6 else [])
    if kind == "LOC":
        return [rng.choice(PLACES)]
    return [rng.choice(COMPANIES)] + ([rng.choice(COMPANY_SUFFIX)] if rng.random() < 0.5 else [])


def synthetic_sentences(count: int, *, seed: int, split: str) -> list[TaggedSentence]:
    """Sentences of lowercase filler with one to three PER/LOC/ORG entities, IOB2-tagged.

    Entities are capitalised gazetteer names, usually after a cue word of their type; a few names
    belong to two types and sentence-initial filler is capitalised too, so capitalisation alone is
    not enough.
    """
    rng = random.Random(f"ner-{seed}-{split}")
    sentences = []
    for number in range(count):
        tokens, tags = [], []
        for _ in range(rng.randint(1, 3)):
            kind = rng.choice(tuple(CUES))
            filler = [rng.choice(FILLER) for _ in range(rng.randint(1, 4))]
            if rng.random() < 0.8:
                filler.append(rng.choice(CUES[kind]))
            entity = _synthetic_entity(rng, kind)
            tokens += filler + entity
            tags += ["O"] * len(filler) + [f"B-{kind}"] + [f"I-{kind}"] * (len(entity) - 1)
        tail = [rng.choice(FILLER) for _ in range(rng.randint(0, 3))]
        tokens += tail
        tags += ["O"] * len(tail)
        tokens[0] = tokens[0].capitalize()
        sentences.append(TaggedSentence(tuple(tokens), tuple(tags), number + 1))
    return sentences


@hookimpl
def rnnbench_tasks():
    return {"ner": NERTask}
