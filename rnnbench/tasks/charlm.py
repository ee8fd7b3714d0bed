"""Character-level language modelling (char-rnn style): perplexity and bits per character.

The corpus is encoded once into a LongTensor and moved to the device once per split; every batch
is a slice or a gather of that tensor, so no Python loop runs per character while training or
evaluating. Two ways to feed it:

- ``stateful`` (truncated BPTT, as char-rnn): training lays the split out as ``batch_size``
  parallel contiguous streams; consecutive batches continue each stream and the hidden state is
  carried across batches, detached at each boundary. A pass over the streams starts at a random
  offset below ``seq_len`` so window boundaries move between passes. When the trainer caps an
  epoch (``steps_per_epoch``), the next epoch resumes the pass where it stopped instead of
  restarting it, so capped epochs still cover the whole training text. Evaluation reads the split
  as ONE stream with the state carried from its first character to its last (as AWD-LSTM scores
  its test set at batch size 1): every character is scored once, conditioned on all the text
  before it in the split, whatever the batch size (which only lays out the training streams).
- ``stateless``: training draws random windows of ``seq_len`` characters, each from a zero state;
  evaluation reads contiguous non-overlapping windows, each from a zero state (``batch_size`` only
  groups windows, so it changes nothing measured).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from rnnbench import hookimpl
from rnnbench.data.batching import to_device
from rnnbench.data.chars import CharVocab, d2l_preprocess, markov_text, read_text
from rnnbench.data.resolve import DataFile, resolve
from rnnbench.errors import ConfigError, DataError, UnknownNameError
from rnnbench.hparams import positive_int
from rnnbench.task import NON_NEGATIVE, SPLITS, Batch, EncoderFactory, Metric, Task, TaskOptions, detach_state

DATA_FILES = {
    "tinyshakespeare": DataFile(
        "charlm/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    ),
    "timemachine": DataFile(
        "charlm/timemachine/timemachine.txt",
        sha256="8424dbd9532ac81f7e5f0b6add90e6952baea29158309d7d1bf3884f4e12c516",
        url="http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt",
    ),
}
SYNTHETIC_CHARS = 50_000
BLOCK_CHARS = 1000  # target characters per item of evaluate_items


class CharLMOptions(TaskOptions):
    seq_len: int = Field(
        64, ge=1, le=100_000, description="characters per window (the truncated-BPTT length)"
    )
    mode: Literal["stateful", "stateless"] = "stateful"
    split: tuple[float, float, float] = Field(
        (0.9, 0.05, 0.05), description="contiguous train/valid/test fractions of the text, in order"
    )
    d2l_preprocess: bool = Field(
        False, description="d2l's cleaning: letters only, lowercased, lines joined (26 letters + space)"
    )
    sample_prime: str = Field(
        "The ", min_length=1, max_length=1000, description="text the samples artifact starts from"
    )
    sample_length: int = Field(200, ge=0, le=100_000, description="characters generated after the prime")
    temperature: float = Field(0.8, gt=0, description="sampling temperature of the samples artifact")

    @field_validator("split")
    @classmethod
    def _fractions(cls, split: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f <= 0 for f in split) or abs(sum(split) - 1.0) > 1e-6:
            raise ValueError(f"train/valid/test fractions must be positive and sum to 1, got {list(split)}")
        return split


class CharLanguageModel(nn.Module):
    """Embedding -> dropout -> encoder -> dropout -> linear over the vocabulary.

    Dropout on both sides of the encoder, because the encoder drops only between its layers: a
    1-layer model would otherwise be regularised on its output alone."""

    def __init__(self, vocab_size: int, embedding_dim: int, make_encoder: EncoderFactory, dropout: float):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.encoder = make_encoder(embedding_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.encoder.output_size, vocab_size)

    def forward(self, ids: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        """``ids [B, T]`` -> logits ``[B, T, vocab]`` and the encoder's final state."""
        out, state = self.encoder(self.dropout(self.embedding(ids)), None, state)
        return self.head(self.dropout(out)), state


class NextCharLogits(nn.Module):
    """Serving form: ``ids [B, T]`` -> next-character logits ``[B, T, vocab]`` (state dropped)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(ids)[0]


class CharLM(Task):
    """Character-level language modelling: predict the next character (perplexity, bits per char)."""

    name = "charlm"
    metrics = (
        Metric(
            "perplexity",
            "minimize",
            "exp of the mean negative log-likelihood per character",
            (1.0, math.inf),
            margin=0.01,  # 1%: about the gap between published char-LSTM results on one corpus
            margin_relative=True,
        ),
        Metric(
            "bits_per_char", "minimize", "mean negative log-likelihood per character, in bits", NON_NEGATIVE
        ),
    )
    causal = True
    datasets = ("synthetic", "tinyshakespeare", "timemachine", "text")
    Options = CharLMOptions
    hparam_defaults = {"embedding_dim": 64}
    hparam_domains = {"embedding_dim": positive_int()}

    options: CharLMOptions

    def __init__(
        self, dataset: str = "synthetic", *, data_path: str | Path | None = None, seed: int = 0, **options
    ):
        super().__init__(dataset, data_path=data_path, seed=seed, **options)
        if dataset == "text" and self.data_path is None:
            raise ConfigError(
                "dataset 'text' of task 'charlm' reads your own plain-text (UTF-8) file: give its path "
                "as data_path"
            )
        if dataset == "synthetic" and self.data_path is not None:
            raise ConfigError(
                "dataset 'synthetic' of task 'charlm' is generated in code: it takes no data_path"
            )
        self.vocab: CharVocab | None = None
        self._ids: dict[str, Tensor] = {}
        self._on_device: dict[tuple[str, torch.device], Tensor] = {}
        self._facts: dict[str, Any] = {}
        # Where each training run's stateful streams stand, keyed by the run's generator (the
        # trainer makes one per run and passes it to every epoch), so a capped epoch resumes.
        self._passes: weakref.WeakKeyDictionary[torch.Generator, _Pass] = weakref.WeakKeyDictionary()

    # -- data -----------------------------------------------------------------------------------
    def setup(self) -> None:
        if self.vocab is not None:
            return
        text = self._read_corpus()
        if self.options.d2l_preprocess:
            text = d2l_preprocess(text)
        n = len(text)
        n_train, n_valid = int(n * self.options.split[0]), int(n * self.options.split[1])
        parts = {
            "train": text[:n_train],
            "valid": text[n_train : n_train + n_valid],
            "test": text[n_train + n_valid :],
        }
        for split, part in parts.items():
            if len(part) < 2:  # one input and one target at least
                raise DataError(
                    f"task 'charlm' dataset {self.dataset!r}: the {split} split has {len(part)} characters "
                    f"(text of {n} characters split {list(self.options.split)}); each split needs 2 or more"
                )
        self.vocab = CharVocab.from_text(parts["train"])
        self._ids = {split: self.vocab.encode(part) for split, part in parts.items()}
        for split in ("valid", "test"):
            self._facts[f"unknown_{split}"] = int((self._ids[split] == self.vocab.unk_index).sum())

    def _read_corpus(self) -> str:
        if self.dataset == "synthetic":
            text, source_nll = markov_text(self.seed, SYNTHETIC_CHARS)
            if not self.options.d2l_preprocess:  # preprocessing rewrites the text the chain scored
                self._facts["source_perplexity"] = math.exp(source_nll)
            return text
        if self.dataset == "text":
            assert self.data_path is not None  # checked in __init__
            if not self.data_path.is_file():
                raise DataError(f"task 'charlm' dataset 'text': file {self.data_path} does not exist")
            path = self.data_path
        else:
            path = resolve(DATA_FILES[self.dataset], self.data_path)
        self._facts["data_file"] = str(path)
        return read_text(path)

    def _ready(self, split: str | None = None) -> CharVocab:
        if split is not None and split not in SPLITS:
            raise UnknownNameError("split", split, SPLITS)
        self.setup()
        assert self.vocab is not None
        return self.vocab

    def _device_ids(self, split: str, device: torch.device) -> Tensor:
        key = (split, torch.device(device))
        if key not in self._on_device:
            self._on_device[key] = self._ids[split].to(device)
        return self._on_device[key]

    def batches(
        self, split: str, batch_size: int, *, device: torch.device, generator: torch.Generator | None = None
    ) -> Iterator[Batch]:
        self._ready(split)
        ids = self._device_ids(split, device)
        if self.options.mode == "stateful":
            if generator is None:  # evaluation: one stream, whatever batch_size is
                yield from _stream_batches(ids, 1, self.options.seq_len)
            else:
                yield from self._stateful_epoch(ids, batch_size, generator)
        elif generator is not None:
            yield from _random_window_batches(ids, batch_size, self.options.seq_len, generator)
        else:
            yield from _contiguous_window_batches(ids, batch_size, self.options.seq_len)

    def _stateful_epoch(self, ids: Tensor, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        """One training epoch of streams: the rest of the run's pass in progress, then one new pass.

        An uncapped epoch always ends a pass, so it reads exactly one whole pass. A capped one stops
        mid-pass; the next epoch of the same run (same generator) resumes there, so the epochs
        together walk through the whole text instead of re-reading each stream's beginning.
        """
        streams, seq_len = min(batch_size, len(ids) - 1), self.options.seq_len
        current = self._passes.get(generator)
        if current is not None and current.streams == streams and current.column < current.length:
            yield from current.batches(ids, seq_len)
        # Drawn only when reached, so a run that never gets here consumes the generator as before.
        offset = int(torch.randint(min(seq_len, len(ids) - streams), (1,), generator=generator))
        current = _Pass(streams, offset, (len(ids) - offset - 1) // streams)
        self._passes[generator] = current
        yield from current.batches(ids, seq_len)

    # -- model ----------------------------------------------------------------------------------
    def build_model(self, make_encoder: EncoderFactory, hparams: dict[str, Any]) -> nn.Module:
        vocab = self._ready()
        embedding_dim = int(hparams.get("embedding_dim", self.hparam_defaults["embedding_dim"]))
        return CharLanguageModel(len(vocab), embedding_dim, make_encoder, float(hparams.get("dropout", 0.0)))

    def training_loss(self, model: nn.Module, batch: Batch, carry: Any = None) -> tuple[Tensor, Any]:
        stateful = self.options.mode == "stateful"
        if batch.extra.get("new_pass"):  # the streams jumped: a state from the last pass would lie
            carry = None
        logits, state = model(batch.inputs, carry if stateful else None)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.targets.reshape(-1))
        return loss, detach_state(state) if stateful else None

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, split: str, batch_size: int, *, device: torch.device
    ) -> dict[str, float]:
        total_nll = torch.zeros((), dtype=torch.float64, device=device)
        chars = 0
        for batch, logits in self._scored_batches(model, split, batch_size, device):
            nll = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch.targets.reshape(-1), reduction="sum"
            )
            total_nll += nll.double()
            chars += batch.tokens
        return _scores(total_nll.item() / chars)  # the one device sync

    @torch.no_grad()
    def evaluate_items(
        self, model: nn.Module, split: str, batch_size: int, *, device: torch.device
    ) -> pd.DataFrame:
        """One row per block of ``BLOCK_CHARS`` consecutive target characters of the split (the last
        block shorter), each scored in the context ``evaluate`` gives it: ``nll``, their summed
        negative log-likelihood in nats (float64), and ``n``, their number (int32)."""
        nll = torch.cat(
            [
                F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), batch.targets.reshape(-1), reduction="none"
                )
                for batch, logits in self._scored_batches(model, split, batch_size, device)
            ]
        )  # in text order: the evaluation batches walk the split from its start to its end
        chars = nll.numel()
        blocks = -(-chars // BLOCK_CHARS)
        padded = F.pad(nll.double(), (0, blocks * BLOCK_CHARS - chars))  # zeros: no cost, not counted
        counts = np.full(blocks, BLOCK_CHARS, dtype=np.int32)
        counts[-1] = chars - (blocks - 1) * BLOCK_CHARS
        return pd.DataFrame({"nll": padded.view(blocks, BLOCK_CHARS).sum(1).cpu().numpy(), "n": counts})

    def metrics_from_sums(self, sums: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        mean_nll = np.asarray(sums["nll"], dtype=np.float64) / np.asarray(sums["n"], dtype=np.float64)
        return {"perplexity": np.exp(mean_nll), "bits_per_char": mean_nll / math.log(2)}

    def _scored_batches(
        self, model: nn.Module, split: str, batch_size: int, device: torch.device
    ) -> Iterator[tuple[Batch, Tensor]]:
        """Each evaluation batch with its logits; in stateful mode the state runs on from one batch to
        the next, so every character is read in the context of all the split before it."""
        self._ready(split)
        stateful = self.options.mode == "stateful"
        state = None
        for batch in self.batches(split, batch_size, device=device):
            logits, final = model(batch.inputs, state)
            state = final if stateful else None
            yield batch, logits

    def baseline(self, split: str) -> dict[str, float]:
        """Uniform model (perplexity = vocabulary size) and the train unigram model on ``split``.

        The unigram counts are add-one smoothed so ``<unk>`` and characters missing from train keep
        a finite cost.
        """
        vocab = self._ready(split)
        counts = torch.bincount(self._ids["train"], minlength=len(vocab)).double() + 1.0
        log_probs = (counts / counts.sum()).log()
        unigram_nll = float(-log_probs[self._ids[split][1:]].mean())  # [1:]: the predicted characters
        uniform, unigram = _scores(math.log(len(vocab))), _scores(unigram_nll)
        return {
            **uniform,
            "unigram_perplexity": unigram["perplexity"],
            "unigram_bits_per_char": unigram["bits_per_char"],
        }

    @torch.no_grad()
    def artifacts(self, model: nn.Module, *, device: torch.device) -> dict[str, str]:
        """``samples.txt``: the prime followed by ``sample_length`` sampled characters."""
        vocab = self._ready()
        device = torch.device(device)
        generator = torch.Generator(device=device).manual_seed(self.seed)
        prime = self.options.sample_prime
        was_training = model.training
        model.eval()
        try:
            logits, state = model(vocab.encode(prime).to(device).unsqueeze(0))
            sampled = []
            for _ in range(self.options.sample_length):
                scaled = logits[:, -1] / self.options.temperature
                scaled[:, vocab.unk_index] = -math.inf  # never write <unk> into the text
                next_id = torch.multinomial(scaled.softmax(-1), 1, generator=generator)
                sampled.append(next_id)
                logits, state = model(next_id, state)
        finally:
            model.train(was_training)
        ids = torch.cat(sampled, dim=1)[0].tolist() if sampled else []
        return {"samples.txt": prime + vocab.decode(ids)}

    def export_state(self) -> dict[str, Any]:
        return {
            "input": "character ids [B, T] (int64); output: next-character logits [B, T, vocab]",
            "characters": self._ready().itos,
            "unknown_index": CharVocab.unk_index,
        }

    def serving_model(self, model: nn.Module) -> nn.Module:
        return NextCharLogits(model)

    def describe(self) -> dict[str, Any]:
        vocab = self._ready()
        return {
            "dataset": self.dataset,
            "vocab_size": len(vocab),  # with <unk>: the model's output width
            "characters": vocab.characters,
            **{f"chars_{split}": len(self._ids[split]) for split in SPLITS},
            "mode": self.options.mode,
            "seq_len": self.options.seq_len,
            "d2l_preprocess": self.options.d2l_preprocess,
            **self._facts,
        }


def _scores(mean_nll: float) -> dict[str, float]:
    return {"perplexity": math.exp(mean_nll), "bits_per_char": mean_nll / math.log(2)}


@dataclass
class _Pass:
    """One pass of a training run over ``streams`` parallel rows of the text, read from ``offset``.

    Row ``s`` holds characters ``offset + [s*length, (s+1)*length)``; ``column`` is the next column
    to read. The fewer than ``streams + offset`` characters the layout leaves out move with the
    offset drawn for each pass.
    """

    streams: int
    offset: int
    length: int
    column: int = 0

    def batches(self, ids: Tensor, seq_len: int) -> Iterator[Batch]:
        span = self.streams * self.length
        inputs = ids[self.offset : self.offset + span].view(self.streams, self.length)
        targets = ids[self.offset + 1 : self.offset + span + 1].view(self.streams, self.length)
        while self.column < self.length:
            start = self.column
            steps = min(seq_len, self.length - start)
            self.column += steps  # before the yield: a run stopped after this batch resumes past it
            yield Batch(
                inputs[:, start : start + steps],
                targets[:, start : start + steps],
                None,
                self.streams * steps,
                {"new_pass": start == 0},
            )


def _stream_batches(ids: Tensor, streams: int, seq_len: int) -> Iterator[Batch]:
    """``streams`` contiguous rows of the text, read ``seq_len`` columns at a time.

    Row ``s`` holds characters ``[s*L, (s+1)*L)``; the fewer than ``streams`` characters left over
    by the layout are not scored (as in PyTorch's word_language_model batchify), so evaluation
    uses one stream, which leaves nothing over.
    """
    yield from _Pass(streams, 0, (len(ids) - 1) // streams).batches(ids, seq_len)


def _contiguous_window_batches(ids: Tensor, batch_size: int, seq_len: int) -> Iterator[Batch]:
    """Non-overlapping windows covering every character once; a shorter last window if needed."""
    windows = (len(ids) - 1) // seq_len
    covered = windows * seq_len
    inputs = ids[:covered].view(windows, seq_len)
    targets = ids[1 : covered + 1].view(windows, seq_len)
    for start in range(0, windows, batch_size):
        rows = min(batch_size, windows - start)
        yield Batch(inputs[start : start + rows], targets[start : start + rows], None, rows * seq_len)
    if (rest := len(ids) - 1 - covered) > 0:
        yield Batch(ids[covered : covered + rest].unsqueeze(0), ids[covered + 1 :].unsqueeze(0), None, rest)


def _random_window_batches(
    ids: Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> Iterator[Batch]:
    """As many random windows as fit the split end to end, gathered in one indexing op per batch."""
    steps = min(seq_len, len(ids) - 1)
    count = (len(ids) - 1) // steps
    # Starts are drawn on the CPU generator (reproducible on any device), then moved once.
    starts = to_device(torch.randint(len(ids) - steps, (count,), generator=generator), ids.device)
    offsets = torch.arange(steps + 1, device=ids.device)
    for chunk in starts.split(batch_size):
        windows = ids[chunk.unsqueeze(1) + offsets]  # [rows, steps + 1]
        yield Batch(windows[:, :-1], windows[:, 1:], None, chunk.shape[0] * steps)


@hookimpl
def rnnbench_tasks():
    return {"charlm": CharLM}
