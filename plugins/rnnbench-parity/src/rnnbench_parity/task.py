"""Parity: is the number of ones in a bit sequence odd?

Each example is a sequence of random bits of a random length in ``[min_len, max_len]``; its label
is the sum of the bits modulo 2. Every bit matters, so the model must carry one bit of state through
the whole sequence and flip it at every one: a plain test of how well a cell keeps and updates a
memory over a variable length (Hochreiter & Schmidhuber 1997 used it for the LSTM; it is also a
standard check of length generalisation). A model that ignores the order still cannot beat chance:
the trivial baseline (majority class) scores accuracy ≈ 0.5 and cross-entropy ≈ ln 2 ≈ 0.693.

Sequences are read whole, padded to the longest of each batch; the true lengths go to the encoder,
so padding never changes a prediction. The data is generated in code (dataset ``synthetic``):
every split has its own random stream ``(seed, split)``, so valid and test are fixed for a seed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from rnnbench import Metric, Task
from rnnbench.errors import ConfigError
from rnnbench.task import Batch, TaskOptions

SPLITS = ("train", "valid", "test")
METRICS = (
    # bounds: the values a metric can take; the report cuts confidence intervals to them
    Metric("accuracy", "maximize", "share of sequences whose parity is predicted right", (0.0, 1.0)),
    Metric("cross_entropy", "minimize", "mean cross-entropy (nats) of the predicted parity", (0.0, math.inf)),
)


class ParityOptions(TaskOptions):
    min_len: int = Field(2, ge=1, le=10_000, description="shortest sequence")
    max_len: int = Field(20, ge=1, le=10_000, description="longest sequence")
    train_size: int = Field(10_000, ge=2, le=1_000_000, description="training sequences")
    valid_size: int = Field(1_000, ge=1, le=1_000_000, description="validation sequences (fixed for a seed)")
    test_size: int = Field(1_000, ge=1, le=1_000_000, description="test sequences (fixed for a seed)")

    @model_validator(mode="after")
    def _lengths_in_order(self) -> ParityOptions:
        if self.min_len > self.max_len:
            raise ValueError(f"min_len ({self.min_len}) must be <= max_len ({self.max_len})")
        return self


def parity_data(
    rng: np.random.Generator, count: int, min_len: int, max_len: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Bits ``[count, max_len]`` (zero after each length), lengths ``[count]`` and parities ``[count]``."""
    lengths = rng.integers(min_len, max_len + 1, count)
    bits = rng.integers(0, 2, (count, max_len))
    bits[np.arange(max_len) >= lengths[:, None]] = 0
    labels = bits.sum(axis=1) % 2
    return torch.from_numpy(bits), torch.from_numpy(lengths), torch.from_numpy(labels)


class ParityClassifier(nn.Module):
    """Bits as one-hot pairs -> encoder -> each direction's summary of the whole sequence -> 2 logits."""

    def __init__(self, make_encoder, dropout: float):
        super().__init__()
        self.encoder = make_encoder(2)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.encoder.output_size, 2)

    def forward(self, inputs: Tensor, lengths: Tensor) -> Tensor:
        outputs, _ = self.encoder(inputs, lengths)
        rows = torch.arange(inputs.shape[0], device=inputs.device)
        last = outputs[rows, lengths.to(inputs.device) - 1]  # forward direction: after the last real bit
        if self.encoder.num_directions == 2:  # backward direction: after reading back to bit 0
            half = outputs.shape[-1] // 2
            last = torch.cat([last[:, :half], outputs[:, 0, half:]], dim=-1)
        return self.head(self.dropout(last))


class ParityTask(Task):
    """Parity of a random bit sequence of variable length (accuracy; chance is 0.5)."""

    name = "parity"
    metrics = METRICS
    causal = False  # the label is about the whole sequence: a backward reader sees nothing extra
    datasets = ("synthetic",)
    Options = ParityOptions
    hparam_defaults: dict[str, Any] = {}

    options: ParityOptions

    def __init__(self, dataset: str = "synthetic", *, data_path=None, seed: int = 0, **options):
        super().__init__(dataset, data_path=data_path, seed=seed, **options)
        if self.data_path is not None:
            raise ConfigError("task 'parity' generates its data in code: it takes no data_path")
        self._data: dict[str, tuple[Tensor, Tensor, Tensor]] = {}

    # -- data -----------------------------------------------------------------------------------
    def setup(self) -> None:
        if self._data:
            return
        opts = self.options
        sizes = {"train": opts.train_size, "valid": opts.valid_size, "test": opts.test_size}
        for index, split in enumerate(SPLITS):
            rng = np.random.default_rng([self.seed, index])  # one stream per split
            self._data[split] = parity_data(rng, sizes[split], opts.min_len, opts.max_len)

    def batches(
        self, split: str, batch_size: int, *, device: torch.device, generator: torch.Generator | None = None
    ) -> Iterator[Batch]:
        """One-hot bits ``[B, T, 2]`` (zeros at padding), parities ``[B]``, lengths ``[B]`` on the CPU.

        A fresh iterator on every call, so evaluation can read a split as often as it likes."""
        bits, lengths, labels = self.pick_split(self._data, split)
        order = torch.randperm(len(labels), generator=generator) if generator is not None else None
        for start in range(0, len(labels), batch_size):
            index = torch.arange(start, min(start + batch_size, len(labels)))
            if order is not None:
                index = order[index]
            batch_lengths = lengths[index]
            steps = int(batch_lengths.max())
            real = (torch.arange(steps) < batch_lengths[:, None]).unsqueeze(-1)
            inputs = F.one_hot(bits[index, :steps], 2).float() * real
            yield Batch(
                inputs=inputs.to(device),
                targets=labels[index].to(device),
                lengths=batch_lengths,
                tokens=int(batch_lengths.sum()),
            )

    # -- model ----------------------------------------------------------------------------------
    def build_model(self, make_encoder, hparams: dict[str, Any]) -> nn.Module:
        # hparams holds the trainer's hyperparameters too (dropout, hidden_size, ...): use what you need.
        return ParityClassifier(make_encoder, float(hparams.get("dropout", 0.0)))

    def training_loss(self, model: nn.Module, batch: Batch, carry: Any = None) -> tuple[Tensor, Any]:
        return F.cross_entropy(model(batch.inputs, batch.lengths), batch.targets), None

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, split: str, batch_size: int, *, device: torch.device
    ) -> dict[str, float]:
        # Sums over sequences, divided once at the end: the same number whatever the batch size.
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        count = 0
        for correct, nll in self._outcomes(model, split, batch_size, device):
            sums[0] += correct.sum()
            sums[1] += nll.double().sum()
            count += len(correct)
        correct, nll = (sums / count).tolist()
        return {"accuracy": correct, "cross_entropy": nll}

    @torch.no_grad()
    def evaluate_items(
        self, model: nn.Module, split: str, batch_size: int, *, device: torch.device
    ) -> pd.DataFrame:
        """One row per sequence, in the split's order: ``correct`` (int32), ``nll`` (float32) and
        ``n`` = 1, whose sums give both metrics (the report resamples rows to bootstrap them)."""
        outcomes = list(self._outcomes(model, split, batch_size, device))
        correct = torch.cat([right for right, _ in outcomes]).cpu().numpy().astype(np.int32)
        nll = torch.cat([cost for _, cost in outcomes]).cpu().numpy()
        return pd.DataFrame({"correct": correct, "nll": nll, "n": np.ones(len(nll), np.int32)})

    def metrics_from_sums(self, sums: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # each value is one sum or an array of them (one per bootstrap replicate): plain array arithmetic
        return {"accuracy": sums["correct"] / sums["n"], "cross_entropy": sums["nll"] / sums["n"]}

    def _outcomes(self, model: nn.Module, split: str, batch_size: int, device: torch.device):
        """Per batch, in the split's order: whether each sequence is right, and its cross-entropy."""
        for batch in self.batches(split, batch_size, device=device):
            logits = model(batch.inputs, batch.lengths)
            yield (
                logits.argmax(-1) == batch.targets,
                F.cross_entropy(logits.float(), batch.targets, reduction="none"),
            )

    def baseline(self, split: str) -> dict[str, float]:
        """Always answer the commoner training parity, with the training share as its probability."""
        train = self.pick_split(self._data, "train")[2].double()
        labels = self.pick_split(self._data, split)[2]
        p_odd = float(train.mean())
        majority = int(p_odd > 0.5)
        probability = torch.where(labels == 1, p_odd, 1.0 - p_odd)
        return {
            "accuracy": float((labels == majority).double().mean()),
            "cross_entropy": float(-probability.clamp(min=1e-12).log().mean()) if 0 < p_odd < 1 else math.inf,
        }

    def describe(self) -> dict[str, Any]:
        return {
            "min_len": self.options.min_len,
            "max_len": self.options.max_len,
            **{f"{split}_size": len(self._data[split][2]) for split in self._data},
            **{f"{split}_odd_share": float(self._data[split][2].double().mean()) for split in self._data},
        }
