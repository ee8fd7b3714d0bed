"""Vanilla (Elman) RNN: h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh), act = tanh or relu."""

from __future__ import annotations

import torch
from torch import Tensor

from rnnbench import hookimpl
from rnnbench.cells.base import GatedCell
from rnnbench.cells.kernels import linear
from rnnbench.errors import ConfigError
from rnnbench.hparams import Domain


class RNNCell(GatedCell):
    """Elman RNN, tanh (or relu) activation; same parameters as nn.RNN."""

    gates = 1
    hparam_domains = {"nonlinearity": Domain("choice", choices=("tanh", "relu"))}

    def __init__(self, input_size: int, hidden_size: int, nonlinearity: str = "tanh", **unknown):
        if nonlinearity not in ("tanh", "relu"):
            raise ConfigError(f"rnn nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, nonlinearity=nonlinearity, **unknown)

    @classmethod
    def hparam_names(cls) -> tuple[str, ...]:
        return ("nonlinearity",)

    def project_input(self, x: Tensor) -> Tensor:
        """W_ih x + b_ih + b_hh: the recurrent bias rides along with the hoisted projection."""
        return linear(x, self.weight_ih, self.bias_ih + self.bias_hh)

    def forward_projected(self, xp_t: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        pre = torch.addmm(xp_t, h, self.weight_hh.t())
        h = torch.tanh(pre) if self.nonlinearity == "tanh" else torch.relu(pre)
        return h, h

    def fused_kernel(self) -> str | None:
        return ("RNN_TANH" if self.nonlinearity == "tanh" else "RNN_RELU") if type(self) is RNNCell else None


@hookimpl
def rnnbench_cells():
    return {"rnn": RNNCell}
