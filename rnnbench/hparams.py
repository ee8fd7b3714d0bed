"""Hyperparameter domains: declared once, by whoever reads the value, checked before anything runs.

The trainer declares its own (:data:`TRAINER_HPARAM_DOMAINS` below), a cell in
``Cell.hparam_domains``, a task in ``Task.hparam_domains``. The experiment check then refuses a
fixed value or a search range that leaves a domain (``dropout`` up to 1.5, ``hidden_size`` from 0)
with one line, instead of a sweep whose trials fail one by one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from rnnbench.errors import shorten

# Largest hidden or embedding width accepted: an LSTM of 8192 units already holds ~0.5 G parameters.
MAX_WIDTH = 8192


@dataclass(frozen=True)
class Domain:
    """The values one hyperparameter may take.

    ``kind`` "int" or "float": numbers from ``low`` to ``high`` (``None``: unbounded; ``low_open``
    / ``high_open`` exclude the end); "choice": one of ``choices``. ``nullable``: None is allowed too
    (e.g. ``forget_bias: null`` keeps PyTorch's initialisation).
    """

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    nullable: bool = False

    def __post_init__(self):
        if self.kind not in ("int", "float", "choice"):
            raise ValueError(f"Domain kind must be int, float or choice, got {self.kind!r}")

    def describe(self) -> str:
        if self.kind == "choice":
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        else:
            noun = "an integer" if self.kind == "int" else "a number"
            if self.low is None and self.high is None:
                text = f"{noun}"
            elif self.high is None:
                text = f"{noun} {'>' if self.low_open else '>='} {_num(self.low)}"
            elif self.low is None:
                text = f"{noun} {'<' if self.high_open else '<='} {_num(self.high)}"
            else:
                left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
                text = f"{noun} in {left}{_num(self.low)}, {_num(self.high)}{right}"
        return text + (" or null" if self.nullable else "")

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is outside this domain, or None when it is inside."""
        if value is None:
            return None if self.nullable else f"got null; expected {self.describe()}"
        if self.kind == "choice":
            return None if value in self.choices else f"got {shorten(value)}; expected {self.describe()}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = ""
            if isinstance(value, str) and _is_number(value):
                hint = " (YAML reads a number such as 1e-3 as text: write 1.0e-3)"
            return f"got {shorten(value)}, not a number{hint}; expected {self.describe()}"
        if isinstance(value, float) and not (
            math.isfinite(value) and (self.kind == "float" or value.is_integer())
        ):
            return f"got {value!r}; expected {self.describe()}"
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return f"got {_num(value)}; expected {self.describe()}"
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return f"got {_num(value)}; expected {self.describe()}"
        return None

    def search_problem(self, spec: Any) -> str | None:
        """Why a search spec (rnnbench.experiment.IntParam/FloatParam/CategoricalParam) can leave this
        domain, or None. A numeric domain is an interval, so checking both ends checks the range."""
        if spec.type == "categorical":
            for choice in spec.choices:
                if why := self.problem(choice):
                    return f"choice {why}"
            return None
        if self.kind == "choice":
            return f"takes {self.describe()}: search it with type: categorical"
        if self.kind == "int" and spec.type == "float":
            return f"takes integers: search it with type: int (expected {self.describe()})"
        for end in ("low", "high"):
            if why := self.problem(getattr(spec, end)):
                return f"{end} {why}"
        return None


def positive_int(high: int = MAX_WIDTH) -> Domain:
    return Domain("int", 1, high)


def _num(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else shorten(value, 30)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
LR_SCHEDULES = ("constant", "cosine", "linear")
# Hyperparameters the trainer or the encoder read; cells and tasks declare their own.
TRAINER_HPARAMS = {
    "optimizer": "adam",
    "lr": 1e-3,
    "weight_decay": 0.0,
    "momentum": 0.9,
    "clip_norm": 1.0,
    "batch_size": 32,
    "hidden_size": 64,
    "dropout": 0.0,
    "lr_schedule": "constant",  # after warm-up: constant, or cosine/linear decay to 0 at the step cap
    "warmup_steps": 0,  # linear warm-up from lr/warmup_steps to lr
}
# Their domains, checked against every fixed value and search range before a run starts.
TRAINER_HPARAM_DOMAINS = {
    "optimizer": Domain("choice", choices=OPTIMIZERS),
    "lr": Domain("float", 0.0, 10.0, low_open=True),
    "weight_decay": Domain("float", 0.0, 1.0),
    "momentum": Domain("float", 0.0, 1.0, high_open=True),
    "clip_norm": Domain("float", 0.0, 1e6, nullable=True),  # 0 or null: no clipping
    "batch_size": Domain("int", 1, 65536),
    "hidden_size": Domain("int", 1, MAX_WIDTH),
    "dropout": Domain("float", 0.0, 1.0, high_open=True),
    "lr_schedule": Domain("choice", choices=LR_SCHEDULES),
    "warmup_steps": Domain("int", 0, 10**9),
}
