"""GRU (Cho et al. 2014) in PyTorch's variant: gates r, z, n; r applied to (W_hn h + b_hn)."""

from __future__ import annotations

import torch
from torch import Tensor

from rnnbench import hookimpl
from rnnbench.cells.base import GatedCell


class GRUCell(GatedCell):
    """Gated recurrent unit (Cho et al. 2014), nn.GRU's equations and r, z, n layout."""

    gates = 3

    def forward_projected(self, xp_t: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        hp = torch.addmm(self.bias_hh, h, self.weight_hh.t())
        x_r, x_z, x_n = xp_t.chunk(3, dim=1)
        h_r, h_z, h_n = hp.chunk(3, dim=1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        h = n + z * (h - n)  # = (1 - z) * n + z * h
        return h, h

    def fused_kernel(self) -> str | None:
        return "GRU" if type(self) is GRUCell else None


@hookimpl
def rnnbench_cells():
    return {"gru": GRUCell}
