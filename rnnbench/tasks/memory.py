"""Long-range memory problems: the adding problem and copy memory, generated in code.

Adding problem (Hochreiter & Schmidhuber 1997; the two-halves form of Le et al. 2015 and
Arjovsky et al. 2016): each step holds ``(value, marker)``, values uniform in [0, 1); exactly two
markers are 1, one in the first half of the sequence and one in the second, so the dependency
always spans a long stretch. The target is the sum of the two marked values, read from the last
output. Predicting 1.0 (the expected sum) scores MSE = Var(U1 + U2) = 2/12 ≈ 0.167.

Copy memory, laid out exactly as Bai et al. (2018), ``copy_memory/utils.py`` of the TCN code:
10 symbols drawn from 1..8, then ``T - 1`` blanks (0), then the delimiter (9) repeated 11 times;
length ``T + 20``. The model must output the 10 symbols at the last 10 steps, so ``T`` steps
separate each symbol from its recall. Bai et al. average the cross-entropy over all ``T + 20``
steps, where a memoryless model that predicts blanks and then uniform symbols scores
10·ln(8)/(T + 20). Here loss and metrics cover only the 10 recalled symbols (the other steps are
trivially blank and only dilute the signal as T grows), so the memoryless baseline is the entropy
of the symbol frequencies, ≈ ln 8 ≈ 2.08 nats per symbol, with accuracy ≈ 1/8; ``baseline()``
also reports Bai et al.'s all-steps number, 10·H/(T + 20), for comparison with their figures.

Every split comes from its own random stream ``(seed, split)``: valid and test are fixed for a
seed whatever the training shuffling or the train size.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from rnnbench import hookimpl
from rnnbench.data.batching import to_device
from rnnbench.errors import ConfigError, UnknownNameError
from rnnbench.task import NON_NEGATIVE, SHARE, SPLITS, Batch, EncoderFactory, Metric, Task, TaskOptions

COPY_RECALL = 10  # symbols to remember and recall
COPY_SYMBOLS = 8  # symbols 1..8; 0 is the blank and 9 the delimiter
COPY_BLANK, COPY_DELIMITER = 0, 9
COPY_TOKENS = COPY_SYMBOLS + 2
MAX_GENERATED_STEPS = 50_000_000  # ~400 MB of generated data at most

ADDING_METRICS = (
    # 5% of the compared MSE: relative, since a solved task's MSE is a small fraction of the baseline's
    Metric("mse", "minimize", "mean squared error of the predicted sum", NON_NEGATIVE, 0.05, True),
)
COPY_METRICS = (
    Metric(
        "cross_entropy", "minimize", "mean cross-entropy (nats) per recalled symbol", NON_NEGATIVE, 0.05, True
    ),
    Metric("accuracy", "maximize", "fraction of recalled symbols predicted exactly", SHARE),
)


class MemoryOptions(TaskOptions):
    problem: Literal["adding", "copy"] = "adding"
    seq_len: int = Field(
        50,
        ge=1,
        le=100_000,
        description="adding: sequence length; copy: steps between a symbol and its recall",
    )
    train_size: int = Field(10_000, ge=1, le=10_000_000, description="training sequences")
    valid_size: int = Field(1_000, ge=1, le=10_000_000, description="validation sequences (fixed for a seed)")
    test_size: int = Field(1_000, ge=1, le=10_000_000, description="test sequences (fixed for a seed)")

    @model_validator(mode="after")
    def _adding_needs_two_halves(self) -> MemoryOptions:
        if self.problem == "adding" and self.seq_len < 2:
            raise ValueError("the adding problem needs seq_len >= 2 (one marker in each half)")
        length = self.seq_len + (0 if self.problem == "adding" else 2 * COPY_RECALL)
        steps = (self.train_size + self.valid_size + self.test_size) * length
        if steps > MAX_GENERATED_STEPS:  # generated up front, in memory
            raise ValueError(
                f"train_size + valid_size + test_size sequences of seq_len {self.seq_len} are {steps:,} "
                f"steps; at most {MAX_GENERATED_STEPS:,} are generated: lower the sizes or seq_len"
            )
        return self


def adding_problem(rng: np.random.Generator, count: int, length: int) -> tuple[Tensor, Tensor]:
    """Inputs ``[count, length, 2]`` (value, marker) and targets ``[count]`` (sum of marked values)."""
    values = rng.random((count, length), dtype=np.float32)
    rows = np.arange(count)
    first = rng.integers(0, length // 2, count)
    second = rng.integers(length // 2, length, count)
    markers = np.zeros((count, length), dtype=np.float32)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    targets = values[rows, first] + values[rows, second]
    return torch.from_numpy(np.stack([values, markers], axis=-1)), torch.from_numpy(targets)


def copy_memory(rng: np.random.Generator, count: int, gap: int) -> tuple[Tensor, Tensor]:
    """Token inputs ``[count, gap + 20]`` and targets ``[count, 10]`` (symbol classes 0..7)."""
    symbols = rng.integers(1, COPY_SYMBOLS + 1, (count, COPY_RECALL))
    inputs = np.full((count, gap + 2 * COPY_RECALL), COPY_BLANK, dtype=np.int64)
    inputs[:, :COPY_RECALL] = symbols
    inputs[:, COPY_RECALL + gap - 1 :] = COPY_DELIMITER  # the delimiter, then the recall steps
    return torch.from_numpy(inputs), torch.from_numpy(symbols - 1)


class MemoryModel(nn.Module):
    """Adding: encoder -> last output -> linear to one value. Copy: one-hot -> encoder -> the last
    10 outputs -> linear over the 8 symbols."""

    def __init__(self, problem: str, make_encoder: EncoderFactory, dropout: float):
        super().__init__()
        self.problem = problem
        adding = problem == "adding"
        self.encoder = make_encoder(2 if adding else COPY_TOKENS)
        # On the encoder's outputs only: the inputs are the task itself (the adding problem's two
        # values and markers, copy memory's symbols), and dropping one makes the target unknowable.
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.encoder.output_size, 1 if adding else COPY_SYMBOLS)

    def forward(self, inputs: Tensor) -> Tensor:
        if self.problem == "adding":
            out, _ = self.encoder(inputs)
            return self.head(self.dropout(out[:, -1])).squeeze(-1)
        out, _ = self.encoder(F.one_hot(inputs, COPY_TOKENS).to(self.head.weight.dtype))
        return self.head(self.dropout(out[:, -COPY_RECALL:]))


class Memory(Task):
    """Long-range memory: the adding problem (MSE) and copy memory (cross-entropy, accuracy)."""

    name = "memory"
    # The default problem's metrics; an instance holds its own problem's (see __init__).
    metrics = ADDING_METRICS
    causal = True
    datasets = ("synthetic",)
    Options = MemoryOptions
    hparam_defaults: dict[str, Any] = {}

    options: MemoryOptions

    def __init__(
        self, dataset: str = "synthetic", *, data_path: str | Path | None = None, seed: int = 0, **options
    ):
        super().__init__(dataset, data_path=data_path, seed=seed, **options)
        if self.data_path is not None:
            raise ConfigError("task 'memory' generates its data in code: it takes no data_path")
        self.metrics = ADDING_METRICS if self.options.problem == "adding" else COPY_METRICS
        self._data: dict[str, tuple[Tensor, Tensor]] = {}
        self._on_device: dict[tuple[str, torch.device], tuple[Tensor, Tensor]] = {}

    @property
    def sequence_length(self) -> int:
        """Steps the encoder reads per sequence."""
        if self.options.problem == "adding":
            return self.options.seq_len
        return self.options.seq_len + 2 * COPY_RECALL

    def check_architecture(self, *, bidirectional: bool) -> None:
        if bidirectional:
            raise ConfigError(
                "task 'memory' is causal: a bidirectional encoder is refused because these problems "
                "measure how far a cell carries information forward in time (the answer is due after "
                "the whole sequence or after the delimiter); a backward reader changes that distance"
            )

    # -- data -----------------------------------------------------------------------------------
    def setup(self) -> None:
        if self._data:
            return
        sizes = {
            "train": self.options.train_size,
            "valid": self.options.valid_size,
            "test": self.options.test_size,
        }
        generate = adding_problem if self.options.problem == "adding" else copy_memory
        for index, split in enumerate(SPLITS):
            rng = np.random.default_rng([self.seed, index])  # one independent stream per split
            self._data[split] = generate(rng, sizes[split], self.options.seq_len)

    def _split(self, split: str, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        if split not in SPLITS:
            raise UnknownNameError("split", split, SPLITS)
        self.setup()
        if device is None:
            return self._data[split]
        key = (split, torch.device(device))
        if key not in self._on_device:
            self._on_device[key] = tuple(t.to(device) for t in self._data[split])
        return self._on_device[key]

    def batches(
        self, split: str, batch_size: int, *, device: torch.device, generator: torch.Generator | None = None
    ) -> Iterator[Batch]:
        inputs, targets = self._split(split, device)
        count, steps = inputs.shape[0], self.sequence_length
        if generator is None:
            for start in range(0, count, batch_size):
                rows = min(batch_size, count - start)
                yield Batch(inputs[start : start + rows], targets[start : start + rows], None, rows * steps)
            return
        order = to_device(torch.randperm(count, generator=generator), inputs.device)
        for chunk in order.split(batch_size):
            yield Batch(inputs[chunk], targets[chunk], None, chunk.shape[0] * steps)

    def export_state(self) -> dict[str, Any]:
        layout = (
            "[B, T, 2] float32 (value, marker); output: the sum of the two marked values [B]"
            if self.options.problem == "adding"
            else "[B, T] int64 symbols; output: logits of the recalled symbols"
        )
        return {"input": layout, "problem": self.options.problem, "seq_len": self.sequence_length}

    # -- model ----------------------------------------------------------------------------------
    def build_model(self, make_encoder: EncoderFactory, hparams: dict[str, Any]) -> nn.Module:
        return MemoryModel(self.options.problem, make_encoder, float(hparams.get("dropout", 0.0)))

    def training_loss(self, model: nn.Module, batch: Batch, carry: Any = None) -> tuple[Tensor, Any]:
        output = model(batch.inputs)
        if self.options.problem == "adding":
            return F.mse_loss(output, batch.targets), None
        return F.cross_entropy(output.reshape(-1, COPY_SYMBOLS), batch.targets.reshape(-1)), None

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, split: str, batch_size: int, *, device: torch.device
    ) -> dict[str, float]:
        total = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        count = 0
        for batch, output in self._outputs(model, split, batch_size, device):
            if self.options.problem == "adding":
                total += F.mse_loss(output, batch.targets, reduction="sum").double()
                count += batch.targets.shape[0]
            else:
                logits, targets = output.reshape(-1, COPY_SYMBOLS), batch.targets.reshape(-1)
                total += F.cross_entropy(logits, targets, reduction="sum").double()
                correct += (logits.argmax(-1) == targets).sum()
                count += targets.shape[0]
        if self.options.problem == "adding":
            return {"mse": total.item() / count}
        totals = torch.stack([total, correct.double()]).tolist()  # the one device sync
        return {"cross_entropy": totals[0] / count, "accuracy": totals[1] / count}

    @torch.no_grad()
    def evaluate_items(
        self, model: nn.Module, split: str, batch_size: int, *, device: torch.device
    ) -> pd.DataFrame:
        """One row per sequence, in the split's order, with ``n`` (int32) the values it scores (1 for
        adding, 10 for copy). Adding: ``se``, the squared error of the sum (float32). Copy: ``nll``,
        the cross-entropy summed over the recalled symbols (float32), and ``correct`` (int32)."""
        parts = []
        for batch, output in self._outputs(model, split, batch_size, device):
            if self.options.problem == "adding":
                parts.append((output - batch.targets).square().unsqueeze(1))
            else:
                nll = F.cross_entropy(output.transpose(1, 2), batch.targets, reduction="none")  # [B, 10]
                correct = output.argmax(-1) == batch.targets
                parts.append(torch.stack([nll.sum(1), correct.sum(1).to(nll.dtype)], 1))
        table = torch.cat(parts).cpu().numpy()  # one transfer at the end
        if self.options.problem == "adding":
            return pd.DataFrame({"se": table[:, 0], "n": np.ones(len(table), dtype=np.int32)})
        return pd.DataFrame(
            {
                "nll": table[:, 0],
                "correct": table[:, 1].astype(np.int32),
                "n": np.full(len(table), COPY_RECALL, dtype=np.int32),
            }
        )

    def metrics_from_sums(self, sums: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        scored = np.asarray(sums["n"], dtype=np.float64)
        if "se" in sums:  # adding; read from the columns, so an instance with default options will do
            return {"mse": np.asarray(sums["se"], dtype=np.float64) / scored}
        return {
            "cross_entropy": np.asarray(sums["nll"], dtype=np.float64) / scored,
            "accuracy": np.asarray(sums["correct"], dtype=np.float64) / scored,
        }

    def _outputs(
        self, model: nn.Module, split: str, batch_size: int, device: torch.device
    ) -> Iterator[tuple[Batch, Tensor]]:
        """Each evaluation batch, in the split's order, with the model's output."""
        for batch in self.batches(split, batch_size, device=device):
            yield batch, model(batch.inputs)

    def baseline(self, split: str) -> dict[str, float]:
        """Memoryless baselines computed on ``split`` itself.

        Adding: always predict 1.0, the expected sum (≈ 0.167). Copy: predict the split's own
        symbol frequencies at every recall step, the best any memoryless model can do there
        (cross-entropy = their entropy ≈ ln 8; accuracy = the commonest symbol's share ≈ 1/8), plus
        ``cross_entropy_all_steps``: the same averaged over all T + 20 steps as Bai et al. do,
        blanks before the recall being free, i.e. 10·H/(T + 20).
        """
        _, targets = self._split(split)
        if self.options.problem == "adding":
            return {"mse": float(((targets.double() - 1.0) ** 2).mean())}
        freqs = torch.bincount(targets.reshape(-1), minlength=COPY_SYMBOLS).double() / targets.numel()
        entropy = float(-(freqs[freqs > 0] * freqs[freqs > 0].log()).sum())
        return {
            "cross_entropy": entropy,
            "accuracy": float(freqs.max()),
            "cross_entropy_all_steps": COPY_RECALL * entropy / self.sequence_length,
        }

    def describe(self) -> dict[str, Any]:
        self.setup()
        return {
            "problem": self.options.problem,
            "seq_len": self.options.seq_len,
            "sequence_length": self.sequence_length,
            **{f"{split}_size": self._data[split][0].shape[0] for split in SPLITS},
        }


@hookimpl
def rnnbench_tasks():
    return {"memory": Memory}
