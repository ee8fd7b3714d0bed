"""Peephole LSTM (Gers & Schmidhuber 2000).

The input and forget gates also see c_{t-1}, the output gate sees c_t, through diagonal
(elementwise) weights weight_ci, weight_cf, weight_co; otherwise identical to the lstm cell.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rnnbench import hookimpl
from rnnbench.cells.lstm import (
    LSTMCell,
    lstm_prepare_weights,
    lstm_step_backward,
    lstm_step_forward,
    lstm_weight_grads,
)


class PeepholeLSTMCell(LSTMCell):
    """LSTM with peephole connections from the cell state to the gates (Gers & Schmidhuber 2000)."""

    def __init__(self, input_size: int, hidden_size: int, forget_bias: float | None = 1.0, **unknown):
        super().__init__(input_size, hidden_size, forget_bias=forget_bias, **unknown)
        self.weight_ci = nn.Parameter(torch.empty(hidden_size))
        self.weight_cf = nn.Parameter(torch.empty(hidden_size))
        self.weight_co = nn.Parameter(torch.empty(hidden_size))
        bound = 1.0 / hidden_size**0.5
        for weight in (self.weight_ci, self.weight_cf, self.weight_co):
            nn.init.uniform_(weight, -bound, bound)

    def forward_projected(self, xp_t: Tensor, state: tuple[Tensor, Tensor]):
        h, c = state
        gates = torch.addmm(xp_t, h, self.weight_hh.t())  # xp_t holds both biases (LSTMCell.project_input)
        i, f, g, o = gates.chunk(4, dim=1)
        i = torch.sigmoid(i + self.weight_ci * c)
        f = torch.sigmoid(f + self.weight_cf * c)
        c = f * c + i * torch.tanh(g)
        h = torch.sigmoid(o + self.weight_co * c) * torch.tanh(c)
        return h, (h, c)

    # The hand-written backward (rnnbench.cells.sequence), defined here again on purpose: a cell's
    # backward must live in the class that holds its equations (forward_projected).
    batch_parallel = True  # rows never meet in a step: the sequence Function may split the batch

    def recurrent_weights(self) -> tuple[Tensor, ...]:
        return (self.weight_hh, self.weight_ci, self.weight_cf, self.weight_co)

    def prepare_weights(self, weights, batch_size):
        return lstm_prepare_weights(weights, batch_size)

    def step_forward(self, weights, xp_t, state):
        return lstm_step_forward(weights, xp_t, state)

    def step_backward(self, weights, saved, grad_h, grad_state, out=None):
        return lstm_step_backward(weights, saved, grad_h, grad_state, out)

    def weight_grads(self, weights, grad_xp, saved):
        return lstm_weight_grads(weights, grad_xp, saved)


@hookimpl
def rnnbench_cells():
    return {"peephole": PeepholeLSTMCell}
