"""The public task contract.

A task owns its data (datasets, splits, vocabulary), the layers around the encoder (input layer and
output head), its training loss and its metrics. The trainer and the sweep only talk to tasks
through the methods below, so a third-party task gets every cell, the sweep and the report for free.

Lifecycle, driven by the trainer::

    task = TaskClass(dataset="synthetic", data_path=None, seed=0, **options)   # no I/O
    task.setup()                                   # load files, build vocabularies (once)
    task.check_architecture(bidirectional=...)     # refuse what cannot work (also at parse time)
    model = task.build_model(encoder_factory, hparams)
    generator = torch.Generator().manual_seed(seed)                # one per training run
    for epoch in epochs:
        carry = None
        for batch in task.batches("train", batch_size, device=..., generator=generator):
            loss, carry = task.training_loss(model, batch, carry)
        scores = task.evaluate(model, "valid", eval_batch_size, device=...)   # every metric, floats

The measurement rule: nothing a sweep tunes may change what is measured. ``evaluate`` scores every
position of the split (token, character, window, sequence) exactly once, with a context that does
not depend on ``batch_size``, and returns the same numbers (up to float rounding) whatever
``batch_size`` it is called with: ``batch_size`` may only decide how many independent items are
computed together. So padding must not reach a score, no batch may be dropped or cut short, and
scores are sums over items divided once at the end, never means of per-batch means.
:func:`rnnbench.testing.check_evaluate_batch_independence` checks this for any task; call it (or
:func:`rnnbench.testing.check_task_contract`) from a plugin's own tests.

Per-item outcomes (optional): a task that overrides ``evaluate_items`` and ``metrics_from_sums``
lets the report resample test items as well as seeds (a two-level bootstrap) and pair two
architectures item by item; one that does not gets seed-level statistics only.
:func:`rnnbench.testing.check_item_outcomes` checks that the items and the metrics agree.
"""

from __future__ import annotations

import abc
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor, nn

from rnnbench.data.resolve import resolve
from rnnbench.errors import ConfigError, UnknownNameError
from rnnbench.hparams import Domain

if TYPE_CHECKING:
    import numpy
    import pandas

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Metric:
    """A score a task reports. ``direction`` says which way is better; ``bounds``, the values it
    can take (a confidence interval over seeds is cut to them: no F1 above 1, no negative MSE)."""

    name: str
    direction: Literal["minimize", "maximize"]
    description: str = ""
    bounds: tuple[float, float] = (-math.inf, math.inf)
    # margin of practical equivalence: two architectures whose difference surely lies within
    # ±margin are called equivalent; relative: a share of the compared value (1% of a perplexity).
    # None: comparisons say better, worse or inconclusive only.
    margin: float | None = None
    margin_relative: bool = False

    def better(self, a: float, b: float) -> bool:
        """True when ``a`` is strictly better than ``b``."""
        return a < b if self.direction == "minimize" else a > b


SHARE = (0.0, 1.0)  # accuracy, F1, precision, recall
NON_NEGATIVE = (0.0, math.inf)  # errors, losses


@dataclass
class Batch:
    """One batch, already on its device (except ``lengths``).

    ``inputs``: token ids ``[B, T]`` or features ``[B, T, F]``; ``targets``: whatever the task's
    loss needs; ``lengths``: true lengths ``[B]`` kept on the CPU (packing needs them there; on
    the GPU they would cost a sync per batch), None when every sequence is full;
    ``tokens``: the number of real input positions, a Python int computed without a device sync,
    used for tokens/s; ``extra``: anything else the task needs (a reset flag for stateful TBPTT...).
    """

    inputs: Tensor
    targets: Tensor
    lengths: Tensor | None
    tokens: int
    extra: dict[str, Any] = field(default_factory=dict)


class TaskOptions(BaseModel):
    """Options every task accepts. Subclass it (extra keys stay forbidden) for task options."""

    model_config = ConfigDict(extra="forbid")


EncoderFactory = Callable[[int], nn.Module]
"""``factory(input_size) -> Encoder``: the harness decides the architecture, the task its input width."""


class Task(abc.ABC):
    """Base class of every task. The class docstring's first line is its description.

    Class attributes to set:
    - ``name``: the name it is registered under (used in messages);
    - ``metrics``: tuple of :class:`Metric`, the primary one (used for model selection) first;
    - ``causal``: True when a bidirectional encoder would see the answer (it is then refused);
    - ``datasets``: tuple of dataset names this task knows; ``"synthetic"`` (generated in code,
      no files) must be one of them; tasks reading user files accept ``data_path``;
    - ``Options``: a :class:`TaskOptions` subclass declaring the task's options;
    - ``hparam_defaults``: hyperparameters the task itself reads from ``hparams`` (embedding size,
      pooling...), with their defaults, so a sweep can search them;
    - ``hparam_domains``: the values each of them may take (name -> :class:`rnnbench.hparams.Domain`),
      so a fixed value or search range outside them is refused before a run starts.

    Rules the trainer, the sweep and the report rely on (``rnnbench check`` tests each of them):

    - ``evaluate`` must not depend on the batch size: sum over examples (or positions) and divide
      once; a mean of per-batch means weighs a short last batch like a full one, and the sweep tunes
      the batch size, so the measure itself would change;
    - ``metrics`` may be set per instance when options change what is measured (memory's copy
      problem replaces the class's default in ``__init__``): the instance's tuple is the one used;
    - ``build_model`` receives the trainer's hyperparameters (``hidden_size``, ``dropout``, ``lr``,
      ...) merged with the task's own ``hparam_defaults``; read what you need, ignore the rest;
    - ``describe()`` becomes the profile of the run's MLflow dataset input (``<task>-<dataset>``,
      the run's Datasets column), as JSON cut to 4,000 characters (past that only the short scalar
      values are kept): keys of letters, digits and ``_ - . /``, values short (the pre-flight
      refuses one over 6,000 characters) and plain (numbers, strings, lists);
    - ``batches`` may be iterated twice or more (each validation pass calls it again): return a fresh
      iterator every call, never a one-shot generator over an open file;
    - ``baseline`` keys must equal metric names (``{"accuracy": 0.5}`` for a metric named
      ``accuracy``); extra keys are reported as they are; so must each of ``baselines``' entries;
    - ``setup`` raises :class:`rnnbench.errors.DataError` naming the file and line of bad data: the
      pre-flight runs it before any store exists, so the user gets one line and nothing written;
    - ``evaluate_items`` (optional, with ``metrics_from_sums``) gives one row per item of a split
      (sentence, window, block of a stream, sequence) in the split's natural order, whatever the
      batch size, so row ``i`` is the same item for every model of a task and dataset; its numeric
      columns' sums are all ``metrics_from_sums`` needs, and on the whole split it gives back what
      ``evaluate`` returns (:func:`declares_items` tells whether a task declares items).
    """

    name: ClassVar[str] = ""
    metrics: ClassVar[tuple[Metric, ...]] = ()
    causal: ClassVar[bool] = False
    datasets: ClassVar[tuple[str, ...]] = ("synthetic",)
    Options: ClassVar[type[TaskOptions]] = TaskOptions
    hparam_defaults: ClassVar[dict[str, Any]] = {}
    hparam_domains: ClassVar[dict[str, Domain]] = {}

    def __init__(
        self, dataset: str = "synthetic", *, data_path: str | Path | None = None, seed: int = 0, **options
    ):
        if dataset not in self.datasets:
            raise UnknownNameError(f"dataset of task {self.name!r}", dataset, self.datasets)
        try:
            self.options = self.Options(**options)
        except ValidationError as exc:
            raise ConfigError(f"task {self.name!r} options: {_one_line(exc)}") from None
        self.dataset = dataset
        self.data_path = Path(data_path).expanduser() if data_path is not None else None
        self.seed = seed

    def named_file(self, file) -> Path:
        """One file of a multi-file dataset: ``data_path/<file name>`` when a data_path folder is
        given, else the shared data, the cache or a download (see rnnbench.data.resolve)."""
        explicit = self.data_path / Path(file.relpath).name if self.data_path is not None else None
        return resolve(file, explicit)

    @staticmethod
    def pick_split(splits: dict[str, Any], split: str) -> Any:
        """``splits[split]``, with a clear error before setup() or for an unknown split name."""
        if not splits:
            raise RuntimeError("call setup() before using the task's data")
        if split not in splits:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return splits[split]

    @property
    def primary_metric(self) -> Metric:
        return self.metrics[0]

    def metric(self, name: str) -> Metric:
        for m in self.metrics:
            if m.name == name:
                return m
        raise UnknownNameError(f"metric of task {self.name!r}", name, [m.name for m in self.metrics])

    # -- data -----------------------------------------------------------------------------------
    @abc.abstractmethod
    def setup(self) -> None:
        """Load or generate the data and build vocabularies. Called once; may be slow."""

    @abc.abstractmethod
    def batches(
        self, split: str, batch_size: int, *, device: torch.device, generator: torch.Generator | None = None
    ) -> Iterator[Batch]:
        """Yield the batches of one epoch over ``split``.

        With ``generator`` (training): shuffle with it. The trainer creates one generator per
        training run and passes it to every epoch, and may stop an epoch early
        (``steps_per_epoch``); a task that walks its data in order can key per-run state on the
        generator (weakly) to resume where the last epoch stopped (charlm does).
        Without ``generator`` (evaluation): a fixed order, and exactly the items ``evaluate``
        scores, so ``sum(b.tokens for b in batches)`` does not depend on ``batch_size``.
        """

    def check_architecture(self, *, bidirectional: bool) -> None:
        """Raise ConfigError when this task cannot work with the architecture.

        Called on a fresh instance, before :meth:`setup`, when the experiment file is parsed (so a
        refused combination is skipped or reported before any trial runs), and again by the trainer:
        decide from the options, never from loaded data.
        """
        if self.causal and bidirectional:
            raise ConfigError(
                f"task {self.name!r} is causal: a bidirectional encoder is refused because its "
                "backward direction reads the very tokens the model must predict (it reaches a "
                "near-perfect score while generating garbage)"
            )

    # -- model ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def build_model(self, make_encoder: EncoderFactory, hparams: dict[str, Any]) -> nn.Module:
        """Return the whole model: input layer -> ``make_encoder(input_size)`` -> head."""

    @abc.abstractmethod
    def training_loss(self, model: nn.Module, batch: Batch, carry: Any = None) -> tuple[Tensor, Any]:
        """Mean training loss of one batch (a scalar tensor; no ``.item()``) and the state to carry
        to the next batch (stateful truncated BPTT; detached by the task). ``carry`` is None at
        the start of each epoch."""

    @abc.abstractmethod
    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, split: str, batch_size: int, *, device: torch.device
    ) -> dict[str, float]:
        """Every metric of :attr:`metrics` on ``split`` (model already in eval mode).

        The same numbers whatever ``batch_size`` is: see the measurement rule in the module
        docstring."""

    @torch.no_grad()
    def evaluate_items(
        self, model: nn.Module, split: str, batch_size: int, *, device: torch.device
    ) -> pandas.DataFrame | None:
        """Per-item outcomes of ``split`` (model already in eval mode): one row per item (sentence,
        window, block of the stream, sequence) in the split's natural order, numeric columns
        (float32 or int32; float64 where float32 sums would lose precision) whose column sums are
        sufficient statistics of every metric.

        The measurement rule of ``evaluate`` holds: every item scored exactly once, and the rows and
        their values do not depend on ``batch_size``. None (the default): the task declares no items,
        and the report uses seed-level statistics only."""
        return None

    def metrics_from_sums(self, sums: dict[str, numpy.ndarray]) -> dict[str, numpy.ndarray]:
        """Every metric of :attr:`metrics` (and whatever else ``evaluate`` returns) from the sums of
        the columns of ``evaluate_items``.

        Each value of ``sums`` is an array of any shape (one sum per bootstrap replicate); return
        arrays of that shape, computed without a Python loop over replicates. On the whole split's
        sums the result equals ``evaluate()`` up to float rounding. It is called on an instance
        built with the run's task and dataset but default options and no ``setup()`` (the report
        has no data loaded): take class or type names from the column names, not from the data."""
        raise NotImplementedError(f"task {self.name!r} declares no items (see Task.evaluate_items)")

    def baseline(self, split: str) -> dict[str, float]:
        """The trivial baseline's metrics on ``split`` (majority class, persistence, uniform...)."""
        return {}

    def baselines(self, split: str) -> dict[str, dict[str, float]]:
        """Every baseline worth showing beside the architectures: name -> its metrics on ``split``
        (keys as in :meth:`baseline`). Override it where the field compares with more than the
        trivial baseline (forecast: persistence, seasonal naive, a fitted linear map). Default: the
        trivial baseline alone, named ``trivial`` (nothing when there is none)."""
        trivial = self.baseline(split)
        return {"trivial": trivial} if trivial else {}

    def artifacts(self, model: nn.Module, *, device: torch.device) -> dict[str, str]:
        """Text artifacts worth keeping with a run (file name -> content), e.g. generated samples."""
        return {}

    def describe(self) -> dict[str, Any]:
        """Facts about the loaded data (sizes, vocabulary) logged with every run."""
        return {}

    # -- using a trained model outside rnnbench (logged MLflow models, `rnnbench export`) ---------
    def export_state(self) -> dict[str, Any]:
        """What a user of a trained model needs besides its weights: vocabulary, scaler, label
        names, input layout. JSON-able; saved beside every exported model."""
        return {}

    def serving_model(self, model: nn.Module) -> nn.Module:
        """``model`` as one tensor in, one tensor out, the form MLflow's pyfunc serves.
        Default: the model itself when its forward takes the inputs alone; a model called as
        ``model(inputs, lengths)`` is served on whole sequences (every row as long as the input).
        Override it where padding has a meaning a server can read (sentiment: token id 0)."""
        return WholeSequences(model) if _takes_lengths(model) else model

    def serving_example(self) -> Tensor:
        """A few test inputs for ``serving_model``: MLflow's input example and signature.
        Default: two test rows cut to the shorter one's length, so no row carries padding."""
        batch = next(iter(self.batches("test", 2, device=torch.device("cpu"))))
        if batch.lengths is None:
            return batch.inputs
        return batch.inputs[:, : int(batch.lengths.min())]


class WholeSequences(nn.Module):
    """Serving form of a model called as ``model(inputs, lengths)``: no row is padded."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: Tensor) -> Tensor:
        lengths = torch.full((inputs.shape[0],), inputs.shape[1], dtype=torch.long)
        return self.model(inputs, lengths)


def _takes_lengths(model: nn.Module) -> bool:
    """True when ``model.forward`` needs a second positional argument (the lengths)."""
    required = [
        p
        for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    return len(required) >= 2


def declares_items(task: Task | type[Task]) -> bool:
    """True when ``task`` (a Task or its class) overrides :meth:`Task.evaluate_items`."""
    cls = task if isinstance(task, type) else type(task)
    return cls.evaluate_items is not Task.evaluate_items


def detach_state(state: Any) -> Any:
    """Detach a (nested) encoder state so truncated BPTT stops at the batch boundary."""
    if state is None:
        return None
    if isinstance(state, Tensor):
        return state.detach()
    return type(state)(detach_state(s) for s in state)


def _one_line(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = (
            "unknown option" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        )
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)
