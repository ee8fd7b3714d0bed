"""Readers for labelled text tables (CSV/TSV, optionally gzipped), aclImdb folders and CoNLL columns.

Every malformed input raises :class:`DataError` naming the file and the line, so a user can fix it.
Files are read as UTF-8; a leading byte-order mark is dropped (it would otherwise glue onto the
first column name or token), but zero-width characters inside tokens are kept.
"""

from __future__ import annotations

import csv
import gzip
import random
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rnnbench.errors import DataError, shorten

ENCODING = "utf-8-sig"


@contextmanager
def _open_text(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding=ENCODING, newline="") as fh:
            yield fh
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read {path}: {exc}") from None


def infer_delimiter(path: Path) -> str:
    """Tab for ``.tsv``/``.tab`` files (gzipped or not), comma otherwise."""
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return "\t" if name.endswith((".tsv", ".tab")) else ","


@dataclass
class LabelledTexts:
    """Rows of one file: ``texts[i]`` has label ``labels[i]`` and ends on file line ``lines[i]``."""

    path: Path
    texts: list[str]
    labels: list[str]
    lines: list[int]


def read_labelled_texts(
    path: Path, text_column: str, label_column: str, *, delimiter: str | None = None
) -> LabelledTexts:
    """Read a table with a header row; texts are stripped (SST-2 ends each one with a space)."""
    path = Path(path)
    delimiter = delimiter or infer_delimiter(path)
    texts, labels, lines = [], [], []
    with _open_text(path) as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path} is empty: expected a header row naming its columns")
            columns = {name.strip(): i for i, name in enumerate(header)}
            for role, name in (("text", text_column), ("label", label_column)):
                if name not in columns:
                    raise DataError(
                        f"{path} has no {role} column {name!r}; its columns are {list(columns)} "
                        f"(delimiter {delimiter!r})"
                    )
            text_at, label_at = columns[text_column], columns[label_column]
            needed = max(text_at, label_at) + 1
            for row_number, row in enumerate(reader, start=1):
                if not row:
                    continue  # a blank line is not a row
                if len(row) < needed:
                    raise DataError(
                        f"{path} line {reader.line_num} (row {row_number}) has {len(row)} fields, "
                        f"expected at least {needed}"
                    )
                label = row[label_at].strip()
                if not label:
                    raise DataError(f"{path} line {reader.line_num} (row {row_number}) has an empty label")
                texts.append(row[text_at].strip())
                labels.append(label)
                lines.append(reader.line_num)
        except csv.Error as exc:
            raise DataError(
                f"{path} line {reader.line_num}: malformed {delimiter!r}-separated row: {exc}"
            ) from None
    return LabelledTexts(path, texts, labels, lines)


def _review_order(path: Path) -> tuple[int, str]:
    # aclImdb names reviews "<id>_<rating>.txt"; sort by id so the order does not depend on the OS
    head = path.stem.split("_", 1)[0]
    return (int(head), path.name) if head.isdigit() else (-1, path.name)


def read_aclimdb(root: Path, split: str) -> LabelledTexts:
    """The canonical aclImdb layout ``<root>/<split>/{neg,pos}/*.txt``: one review per file."""
    texts, labels, lines = [], [], []
    for label in ("neg", "pos"):
        folder = root / split / label
        files = sorted(folder.glob("*.txt"), key=_review_order) if folder.is_dir() else []
        if not files:
            raise DataError(f"aclImdb folder {folder} is missing or holds no .txt reviews")
        for file in files:
            try:
                texts.append(file.read_text(encoding=ENCODING).strip())
            except UnicodeDecodeError as exc:
                raise DataError(f"{file} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            labels.append(label)
            lines.append(1)
    return LabelledTexts(root / split, texts, labels, lines)


@dataclass(frozen=True)
class TaggedSentence:
    """One CoNLL sentence; ``line`` is the file line of its first token (token i is on line + i)."""

    tokens: tuple[str, ...]
    tags: tuple[str, ...]
    line: int


# Only ASCII spaces and tabs separate columns: str.split() would also cut at U+00A0, U+3000 and
# other Unicode spaces that can sit inside a token.
_SPACES = re.compile(r"[ \t]+")
_LINE_END = "\r\n"


def _columns_needed(*columns: int) -> int:
    return max(c + 1 if c >= 0 else -c for c in columns)


def read_conll(
    path: Path, *, token_column: int = 0, tag_column: int = -1, delimiter: str | None = None
) -> list[TaggedSentence]:
    """Sentences of a CoNLL column file: blank lines end sentences, ``-DOCSTART-`` lines are skipped.

    ``delimiter`` None splits at runs of spaces and tabs; otherwise exactly at ``delimiter``.
    """
    path = Path(path)
    needed = max(_columns_needed(token_column, tag_column), 2)  # a token and a tag, never one column for both
    sentences: list[TaggedSentence] = []
    tokens: list[str] = []
    tags: list[str] = []
    first_line = 0
    width: tuple[int, int] | None = None  # (columns, line) of the first token line

    def end_sentence():
        if tokens:
            sentences.append(TaggedSentence(tuple(tokens), tuple(tags), first_line))
            tokens.clear()
            tags.clear()

    with _open_text(path) as fh:
        # Split at "\n" only: file iteration would also split at a lone "\r", splitlines() at U+2028.
        for line_number, raw in enumerate(fh.read().split("\n"), start=1):
            line = raw.rstrip(_LINE_END)
            if not line.strip(" \t"):
                end_sentence()
                continue
            fields = _SPACES.split(line.strip(" \t")) if delimiter is None else line.split(delimiter)
            if fields[0] == "-DOCSTART-":
                end_sentence()
                continue
            if len(fields) < needed:
                raise DataError(
                    f"{path} line {line_number} has {len(fields)} column(s), needs {needed} "
                    f"(token column {token_column}, tag column {tag_column}): {line!r}"
                )
            # One short line would shift a counted-from-the-end column onto another (chunk tags read
            # as entity tags), so every token line must have the first one's columns.
            width = width or (len(fields), line_number)
            if len(fields) != width[0]:
                raise DataError(
                    f"{path} line {line_number} has {len(fields)} columns where line {width[1]} has "
                    f"{width[0]}: {shorten(line, 60)}"
                )
            if not tokens:
                first_line = line_number
            tokens.append(fields[token_column])
            tags.append(fields[tag_column].strip())
    end_sentence()
    return sentences


# -- splits ---------------------------------------------------------------------------------------
SPLIT_FILE_STEMS = {"train": ("train",), "valid": ("valid", "dev", "validation", "val"), "test": ("test",)}


def find_split_files(
    directory: Path | None, given: dict[str, str | None], extensions: tuple[str, ...]
) -> dict[str, Path | None]:
    """The file of each split: the name given (relative to ``directory`` unless absolute), else the
    first ``<stem><extension>`` found in ``directory`` (``dev.tsv`` for valid...), else None."""
    if directory is not None and not directory.is_dir():
        raise DataError(f"data_path {directory} is not a directory")
    found: dict[str, Path | None] = {}
    for split, stems in SPLIT_FILE_STEMS.items():
        if name := given.get(split):
            path = Path(name).expanduser()
            path = path if path.is_absolute() or directory is None else directory / path
            if not path.is_file():
                raise DataError(f"{split} file {path} does not exist")
            found[split] = path
            continue
        candidates = [directory / f"{stem}{ext}" for stem in stems for ext in extensions] if directory else []
        found[split] = next((p for p in candidates if p.is_file()), None)
    return found


def holdout_split(
    count: int, fraction: float, *, seed: int, strata: list | None = None
) -> tuple[list[int], list[int]]:
    """Seeded (kept, held_out) example indices, both sorted; with ``strata``, ``fraction`` of each
    stratum is held out, so class balance is the same in both parts."""
    rng = random.Random(f"holdout-{seed}")  # a string seed is hashed the same way on every platform
    groups: dict = {}
    for i in range(count):
        groups.setdefault(strata[i] if strata is not None else None, []).append(i)
    held: list[int] = []
    for key in sorted(groups, key=str):
        members = groups[key]
        held.extend(rng.sample(members, round(fraction * len(members))))
    if not held or len(held) == count:
        raise DataError(
            f"cannot hold out {fraction:.0%} of {count} training examples for validation: one part would "
            "be empty (give a validation file or change valid_fraction)"
        )
    held_set = set(held)
    return [i for i in range(count) if i not in held_set], sorted(held)
