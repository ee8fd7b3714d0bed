"""Word tokenizer and vocabulary shared by the text tasks.

The vocabulary is built from the training split only, so validation and test words the model never
saw map to ``<unk>`` exactly as they would for new text.
"""

from __future__ import annotations

import re
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import chain, repeat

import torch
from torch import Tensor

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1

_HTML_TAG = re.compile(r"<[^>]*>")
# A word keeps inner apostrophes ("don't", "n't"); every other non-space symbol is its own token.
_WORD_OR_SYMBOL = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Lowercased words and punctuation of raw ``text``; HTML tags such as ``<br />`` become spaces."""
    return _WORD_OR_SYMBOL.findall(_HTML_TAG.sub(" ", text).lower())


def whitespace_tokenize(text: str) -> list[str]:
    """Lowercased whitespace-separated tokens, for corpora that come tokenised (SST-2's PTB tokens
    such as ``'s``, ``--`` and ``sci-fi``, which :func:`tokenize` would split again)."""
    return text.lower().split()


TOKENIZERS = {"regex": tokenize, "whitespace": whitespace_tokenize}


class Vocab:
    """Token <-> id mapping with ``<pad>`` = 0 and ``<unk>`` = 1."""

    def __init__(self, tokens: Sequence[str]):
        self.itos = [PAD, UNK, *(t for t in tokens if t not in (PAD, UNK))]
        self.stoi = {token: i for i, token in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary tokens must be distinct")

    @classmethod
    def build(
        cls, sequences: Iterable[Sequence[str]], *, min_freq: int = 1, max_size: int | None = None
    ) -> Vocab:
        """Most frequent tokens seen at least ``min_freq`` times; ``max_size`` counts the two specials.

        Ties are broken alphabetically so the same data always gives the same ids.
        """
        counts = Counter(chain.from_iterable(sequences))
        kept = sorted(
            (t for t, n in counts.items() if n >= min_freq and t not in (PAD, UNK)),
            key=lambda t: (-counts[t], t),
        )
        if max_size is not None:
            kept = kept[: max(max_size - 2, 0)]
        return cls(kept)

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: str) -> bool:
        return token in self.stoi

    def index(self, token: str) -> int:
        return self.stoi.get(token, UNK_ID)

    def encode(self, tokens: Sequence[str]) -> Tensor:
        """Ids of ``tokens`` as a LongTensor; unknown tokens become ``<unk>``."""
        return self.encode_many([tokens])[0]

    def encode_many(self, sequences: Sequence[Sequence[str]]) -> list[Tensor]:
        """Ids of each sequence: views into one flat LongTensor, so a whole split costs one buffer."""
        # map(dict.get) and array run in C: several times faster than a list comprehension + torch.tensor
        flat = array("q", map(self.stoi.get, chain.from_iterable(sequences), repeat(UNK_ID)))
        ids = torch.frombuffer(flat, dtype=torch.long) if flat else torch.zeros(0, dtype=torch.long)
        return list(ids.split([len(s) for s in sequences]))

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.itos[int(i)] for i in ids]
