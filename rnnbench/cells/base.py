"""The public cell contract: one recurrent step, nothing else.

Stacking, bidirectional reading, padding and the time loop belong to the encoder, so a cell author
writes only the step equations.
"""

from __future__ import annotations

import inspect
from typing import ClassVar

import torch
from torch import Tensor, nn

from rnnbench.cells.kernels import linear
from rnnbench.errors import ConfigError, ContractError, shorten
from rnnbench.hparams import Domain

State = Tensor | tuple[Tensor, ...]
_SIZES = ("input_size", "hidden_size")


def check_sizes(cls: type, input_size, hidden_size) -> None:
    for label, value in zip(_SIZES, (input_size, hidden_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{cls.__name__}: {label} must be a positive integer, got {shorten(value)}")


def build_cell(cls: type[Cell], input_size: int, hidden_size: int, **hparams) -> Cell:
    """Construct a cell the way the encoder does, and make sure it knows its sizes afterwards,
    whichever way its ``__init__`` called (or skipped) ``Cell.__init__``."""
    check_sizes(cls, input_size, hidden_size)
    if unknown := set(hparams) - set(cls.hparam_names()):
        # before construction: a PyTorch-style __init__ without **kwargs would raise a bare TypeError
        raise ConfigError(
            f"cell {cls.__name__} got unknown hyperparameter(s) {sorted(unknown)}; "
            f"it accepts {sorted(cls.hparam_names()) or 'none'}"
        )
    cell = cls(input_size, hidden_size, **hparams)
    if not isinstance(cell, Cell):
        raise ContractError(f"{cls.__name__}(...) returned {type(cell).__name__}, not a Cell")
    for label, want in zip(_SIZES, (input_size, hidden_size)):
        got = getattr(cell, label, None)
        if got is None:
            setattr(cell, label, want)
        elif got != want:
            raise ContractError(f"{cls.__name__} set {label} = {shorten(got)}, but was built with {want}")
    return cell


class Cell(nn.Module):
    """Base class of every recurrent cell.

    Subclasses implement ``__init__(input_size, hidden_size, **hparams)``, ``init_state`` and
    ``forward``. Either call ``super().__init__(input_size, hidden_size, **hparams)`` (it validates
    the sizes and the hyperparameter names), or write the module the PyTorch way: call
    ``super().__init__()`` with no arguments and build your own layers; ``self.input_size`` and
    ``self.hidden_size`` are then taken from the constructor's own arguments all the same.

    Hyperparameters are the keyword arguments of ``__init__`` after the two sizes (or override
    ``hparam_names()``); declare their values in ``hparam_domains`` (name -> rnnbench.hparams.Domain)
    so an experiment with a value out of range is refused before it starts.

    Optional, for speed: ``project_input(x)`` maps inputs of any leading shape ``[..., input]`` to
    their input projection, and ``forward_projected(xp_t, state)`` takes one step from a projected
    input. When a cell defines both, the encoder projects the whole sequence with one matmul before
    the time loop (the trick used by haste and PyTorch's fastrnns). ``forward(x_t, state)`` must equal
    ``forward_projected(project_input(x_t), state)``.
    """

    hparam_domains: ClassVar[dict[str, Domain]] = {}

    def __new__(cls, *args, **kwargs):
        # Remember the sizes the cell is constructed with, so a subclass that calls
        # super().__init__() without them (as nn.Module subclasses do) still gets them set.
        self = super().__new__(cls)
        if args or kwargs:  # not when copy/pickle recreate it (they restore the attributes)
            sizes = tuple(kwargs.get(key, args[i] if len(args) > i else None) for i, key in enumerate(_SIZES))
            self.__dict__["_constructed_with"] = sizes
        return self

    def __init__(self, input_size: int | None = None, hidden_size: int | None = None, **hparams):
        super().__init__()
        given = self.__dict__.pop("_constructed_with", (None, None))
        input_size = given[0] if input_size is None else input_size
        hidden_size = given[1] if hidden_size is None else hidden_size
        if unknown := set(hparams) - set(self.hparam_names()):
            raise ConfigError(
                f"{type(self).__name__} got unknown hyperparameter(s) {sorted(unknown)}; "
                f"it accepts {sorted(self.hparam_names()) or 'none'}"
            )
        check_sizes(type(self), input_size, hidden_size)
        self.input_size = input_size
        self.hidden_size = hidden_size

    @classmethod
    def hparam_names(cls) -> tuple[str, ...]:
        """Names of the extra keyword hyperparameters this cell accepts: by default the keyword
        arguments of ``__init__`` after the two sizes, and every name in ``hparam_domains``."""
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # after self
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        sizes = set(positional[:2])  # the two sizes, whatever the subclass calls them
        names = [p.name for p in params if p not in sizes and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        return tuple(dict.fromkeys([*names, *cls.hparam_domains]))

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> State:
        """Zero state for a batch: a tensor ``[batch, hidden]`` or a tuple of such tensors."""
        return torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)

    def forward(self, x_t: Tensor, state: State) -> tuple[Tensor, State]:
        raise NotImplementedError

    def fused_kernel(self) -> str | None:
        """Mode name of PyTorch's fused RNN kernel this cell is exactly equal to, else None.

        Only builtin cells answer; the check is on the exact class so a subclass that changes
        the equations never runs the fused kernel by accident.
        """
        return None

    def input_parameter_names(self) -> tuple[str, ...]:
        """Parameters that act on the input (the rest count as recurrent) for parameter counts."""
        return tuple(n for n, _ in self.named_parameters() if n.startswith(("weight_ih", "bias_ih")))

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}"


class GatedCell(Cell):
    """Shared layout of the builtin cells: PyTorch's weight_ih/weight_hh/bias_ih/bias_hh.

    ``gates`` stacked row blocks of size hidden_size, initialised like PyTorch
    (uniform in ±1/sqrt(hidden)) so the fused and generic paths start from the same place.
    """

    gates: int = 1

    def __init__(self, input_size: int, hidden_size: int, **hparams):
        super().__init__(input_size, hidden_size, **hparams)
        rows = self.gates * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(rows, input_size))
        self.weight_hh = nn.Parameter(torch.empty(rows, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(rows))
        self.bias_hh = nn.Parameter(torch.empty(rows))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / self.hidden_size**0.5
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def project_input(self, x: Tensor) -> Tensor:
        return linear(x, self.weight_ih, self.bias_ih)  # oneDNN on CPU (rnnbench.cells.kernels)

    def forward(self, x_t: Tensor, state: State) -> tuple[Tensor, State]:
        if x_t.dim() != 2 or x_t.shape[-1] != self.input_size:
            raise ValueError(
                f"{type(self).__name__} expects x_t of shape [batch, {self.input_size}], "
                f"got {list(x_t.shape)}"
            )
        return self.forward_projected(self.project_input(x_t), state)

    def forward_projected(self, xp_t: Tensor, state: State) -> tuple[Tensor, State]:
        raise NotImplementedError


def init_forget_bias(bias_ih: Tensor, bias_hh: Tensor, hidden_size: int, value: float | None) -> None:
    """Set the forget-gate bias (gate block 1 in i,f,g,o order) so the effective bias is ``value``.

    Jozefowicz et al. (2015) recommend 1.0: the cell starts by remembering, which helps long
    dependencies. None keeps PyTorch's uniform initialisation.
    """
    if value is None:
        return
    with torch.no_grad():
        bias_ih[hidden_size : 2 * hidden_size].fill_(float(value))
        bias_hh[hidden_size : 2 * hidden_size].zero_()
