"""IndRNN cell: h_t = act(W x_t + b + u * h_{t-1}), with a recurrent *vector* u.

Each unit sees only its own past (Li et al. 2018), so the recurrence is elementwise: no hidden x
hidden matmul in the time loop. Units interact through the next layer's input weights, which is why
IndRNN is meant to be stacked.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rnnbench import Cell
from rnnbench.errors import ConfigError

ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh}


class IndRNNCell(Cell):
    """Independently recurrent neural network (Li et al. 2018): elementwise recurrence, relu."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        nonlinearity: str = "relu",
        recurrent_max: float | None = 1.0,
        **unknown,
    ):
        # Passing every hyperparameter up lets the base class turn a misspelt one into a ConfigError.
        super().__init__(
            input_size, hidden_size, nonlinearity=nonlinearity, recurrent_max=recurrent_max, **unknown
        )
        if nonlinearity not in ACTIVATIONS:
            raise ConfigError(
                f"indrnn nonlinearity must be one of {sorted(ACTIVATIONS)}, got {nonlinearity!r}"
            )
        if recurrent_max is not None and not (
            isinstance(recurrent_max, (int, float))
            and not isinstance(recurrent_max, bool)
            and math.isfinite(recurrent_max)
            and recurrent_max > 0
        ):
            raise ConfigError(
                f"indrnn recurrent_max must be a positive number or None, got {recurrent_max!r}"
            )
        self.nonlinearity = nonlinearity
        self.recurrent_max = None if recurrent_max is None else float(recurrent_max)
        # weight_ih/bias_ih names make rnnbench count them as input-side parameters.
        self.weight_ih = nn.Parameter(torch.empty(hidden_size, input_size))
        self.bias_ih = nn.Parameter(torch.empty(hidden_size))
        self.weight_hh = nn.Parameter(torch.empty(hidden_size))  # u: one recurrent weight per unit
        self.reset_parameters()

    @classmethod
    def hparam_names(cls) -> tuple[str, ...]:
        return ("nonlinearity", "recurrent_max")

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.input_size)  # nn.Linear's default for the input projection
        nn.init.uniform_(self.weight_ih, -bound, bound)
        nn.init.uniform_(self.bias_ih, -bound, bound)
        # Li et al. start u in [0, |u|max]: every unit begins by keeping (not flipping) its memory.
        nn.init.uniform_(self.weight_hh, 0.0, self.recurrent_max or 1.0)

    def recurrent_weight(self) -> Tensor:
        """u clipped to [-recurrent_max, recurrent_max].

        Clipping in the forward pass instead of after each optimizer step keeps the constraint
        inside the cell (rnnbench's trainer knows nothing about it); an entry past the bound gets
        no gradient, so it stays at the bound, like the paper's projected update.
        """
        if self.recurrent_max is None:
            return self.weight_hh
        return self.weight_hh.clamp(-self.recurrent_max, self.recurrent_max)

    def project_input(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight_ih, self.bias_ih)

    def forward_projected(self, xp_t: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        h = ACTIVATIONS[self.nonlinearity](torch.addcmul(xp_t, self.recurrent_weight(), h))
        return h, h

    def forward(self, x_t: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        if x_t.dim() != 2 or x_t.shape[-1] != self.input_size:
            raise ValueError(
                f"IndRNNCell expects x_t of shape [batch, {self.input_size}], got {list(x_t.shape)}"
            )
        return self.forward_projected(self.project_input(x_t), h)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nonlinearity={self.nonlinearity}, recurrent_max={self.recurrent_max}"
