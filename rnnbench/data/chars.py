"""Character corpora: reading text, d2l's preprocessing, a character vocabulary, synthetic text.

Encoding is one vectorised pass (numpy over code points), so a megabyte corpus becomes an index
tensor in milliseconds and no Python loop ever runs per character of a corpus.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rnnbench.errors import DataError

UNK = "<unk>"

# 19 letters and a space: small enough that an order-2 chain (400 contexts) is learnt in minutes.
SYNTHETIC_ALPHABET = "abcdefghijklmnopqrs "


def read_text(path: Path) -> str:
    """The file's exact characters (``newline=""``: no line-ending translation, so counts match)."""
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            return fh.read()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text: {exc}") from None


def d2l_preprocess(text: str) -> str:
    """The d2l book's ``read_time_machine`` + character tokenisation, joined as d2l joins it.

    Each line becomes ``re.sub('[^A-Za-z]+', ' ', line).strip().lower()`` (its newline turns into a
    space and is stripped) and the lines are concatenated with no separator, as d2l's
    ``load_corpus_time_machine`` flattens them: 26 letters and a space.
    """
    return "".join(re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in text.split("\n"))


class CharVocab:
    """Characters sorted by code point after ``<unk>`` (index 0), which stands for unseen ones."""

    unk_index = 0

    def __init__(self, chars: Iterable[str]):
        chars = sorted(set(chars))
        if any(len(c) != 1 for c in chars):
            raise ValueError("a character vocabulary holds single characters")
        self.itos: list[str] = [UNK, *chars]
        self.stoi = {c: i for i, c in enumerate(self.itos) if i != self.unk_index}
        self._code_points = np.array([ord(c) for c in chars], dtype=np.int64)

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        return cls(set(text))

    def __len__(self) -> int:
        return len(self.itos)

    @property
    def characters(self) -> int:
        """Distinct real characters (the vocabulary without ``<unk>``)."""
        return len(self.itos) - 1

    def encode(self, text: str) -> Tensor:
        """``text`` as a LongTensor of indices; characters outside the vocabulary map to ``<unk>``."""
        if not text:
            return torch.zeros(0, dtype=torch.long)
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        if len(self._code_points) == 0:
            return torch.full((len(points),), self.unk_index, dtype=torch.long)
        where = np.searchsorted(self._code_points, points)
        clipped = np.minimum(where, len(self._code_points) - 1)
        known = self._code_points[clipped] == points
        ids = np.where(known, clipped + 1, self.unk_index)  # +1: index 0 is <unk>
        return torch.from_numpy(ids)

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.itos[i] for i in ids)


def markov_text(
    seed: int, length: int, alphabet: str = SYNTHETIC_ALPHABET, concentration: float = 0.1
) -> tuple[str, float]:
    """Text sampled from a random order-2 Markov chain, and the chain's own mean NLL on it (nats).

    Each of the ``len(alphabet)**2`` contexts gets its next-character distribution from a
    Dirichlet(``concentration``): small values make peaked rows, so the text is predictable and a
    model's perplexity can fall far below the alphabet size. The returned NLL is the best any
    model can reach on average (the chain's entropy rate, estimated on this very text).
    """
    rng = np.random.default_rng(seed)
    k = len(alphabet)
    transitions = rng.dirichlet(np.full(k, concentration), size=(k, k))
    cumulative = np.cumsum(transitions, axis=-1)
    cumulative[..., -1] = 1.0  # a uniform draw below 1 then always lands inside the row
    rows = cumulative.tolist()
    draws = rng.random(length).tolist()
    codes = [int(rng.integers(k)), int(rng.integers(k))]
    # A Markov chain is sequential by nature; bisect on plain lists keeps this loop ~1 µs a step.
    for u in draws[2:]:
        codes.append(bisect.bisect_right(rows[codes[-2]][codes[-1]], u))
    codes_np = np.asarray(codes[:length])
    probs = transitions[codes_np[:-2], codes_np[1:-1], codes_np[2:]]
    mean_nll = float(-np.log(np.maximum(probs, 1e-300)).mean()) if length > 2 else math.log(k)
    return "".join(alphabet[c] for c in codes_np), mean_nll


__all__ = ["SYNTHETIC_ALPHABET", "UNK", "CharVocab", "d2l_preprocess", "markov_text", "read_text"]
