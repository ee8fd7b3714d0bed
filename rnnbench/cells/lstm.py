"""LSTM with PyTorch's nn.LSTM layout and gate order (i, f, g, o)."""

from __future__ import annotations

import torch
from torch import Tensor

from rnnbench import hookimpl
from rnnbench.cells.base import GatedCell, init_forget_bias
from rnnbench.cells.kernels import RecurrentMatmul, linear, weight_grad
from rnnbench.hparams import Domain


class LSTMCell(GatedCell):
    """Long short-term memory (Hochreiter & Schmidhuber 1997), gates i, f, g, o as nn.LSTM."""

    gates = 4
    # null keeps PyTorch's uniform initialisation of the forget-gate bias
    hparam_domains = {"forget_bias": Domain("float", -100.0, 100.0, nullable=True)}

    def __init__(self, input_size: int, hidden_size: int, forget_bias: float | None = 1.0, **unknown):
        self.forget_bias = forget_bias
        super().__init__(input_size, hidden_size, forget_bias=forget_bias, **unknown)

    @classmethod
    def hparam_names(cls) -> tuple[str, ...]:
        return ("forget_bias",)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        init_forget_bias(self.bias_ih, self.bias_hh, self.hidden_size, self.forget_bias)

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> tuple[Tensor, Tensor]:
        zeros = torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)
        return zeros, zeros.clone()

    def project_input(self, x: Tensor) -> Tensor:
        """W_ih x + b_ih + b_hh: both biases add straight to the gates, so the recurrent one rides
        along with the hoisted projection (one add and one bias-gradient sum less per step, ~3%)."""
        return linear(x, self.weight_ih, self.bias_ih + self.bias_hh)

    def forward_projected(self, xp_t: Tensor, state: tuple[Tensor, Tensor]):
        h, c = state
        gates = torch.addmm(xp_t, h, self.weight_hh.t())
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, (h, c)

    # The hand-written backward (rnnbench.cells.sequence): same equations as forward_projected.
    batch_parallel = True  # rows never meet in a step: the sequence Function may split the batch

    def recurrent_weights(self) -> tuple[Tensor, ...]:
        return (self.weight_hh,)

    def prepare_weights(self, weights, batch_size):
        return lstm_prepare_weights(weights, batch_size)

    def step_forward(self, weights, xp_t, state):
        return lstm_step_forward(weights, xp_t, state)

    def step_backward(self, weights, saved, grad_h, grad_state, out=None):
        return lstm_step_backward(weights, saved, grad_h, grad_state, out)

    def weight_grads(self, weights, grad_xp, saved):
        return lstm_weight_grads(weights, grad_xp, saved)

    def fused_kernel(self) -> str | None:
        return "LSTM" if type(self) is LSTMCell else None


# -- the LSTM step and its backward, written out ------------------------------------------------------
# weights: (RecurrentMatmul of W_hh,) for lstm; peephole adds (w_ci, w_cf, w_co).
# Saved per step: the gate activations [B, 4H] (i, f, g, o), c_{t-1}, c_t, tanh(c_t) and h_{t-1}.
#
# tanh(x) = 2 sigmoid(2x) - 1, computed in place: on CPU torch.tanh is 3-7x slower than sigmoid
# (13-45 us vs 2-7 us for 64 x 60..256 floats); the identity is exact up to rounding (absolute
# error below 1e-7 in float32). Doubling by adding a tensor to itself and subtracting a tensor
# ``one``: a Python number costs each op a conversion to a tensor (12 vs 17 us at H = 60).


_ONES: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def _one_like(t: Tensor) -> Tensor:
    key = (t.dtype, t.device)
    if key not in _ONES:
        _ONES[key] = torch.ones((), dtype=t.dtype, device=t.device)
    return _ONES[key]


# one overload, looked up once: the op packet resolves its overload on every call
_sigmoid_backward = torch.ops.aten.sigmoid_backward.grad_input
_tanh_backward = torch.ops.aten.tanh_backward.grad_input
_tanh_backward_new = torch.ops.aten.tanh_backward.default


def lstm_prepare_weights(weights, batch_size: int):
    return (RecurrentMatmul(weights[0], batch_size), *weights[1:])


def lstm_step_forward(weights, xp_t: Tensor, state: tuple[Tensor, Tensor]):
    w_hh, peep = weights[0], weights[1:]
    h, c = state
    gates = w_hh.forward(h, xp_t)  # xp_t holds both biases
    size = h.shape[1]
    one = _one_like(gates)
    i, f, g, o = gates.unsafe_split(size, dim=1)  # no autograd here: the cheapest views (2.5 vs 4.8 us)
    if peep:
        i.addcmul_(c, peep[0])
        f.addcmul_(c, peep[1])
    # One sigmoid for every gate whose input is ready (all four for lstm; i, f, g for peephole,
    # whose o waits for c_t), g doubled first for tanh's identity (above). At a chain's 32 rows
    # (rnnbench.cells.sequence) a [B, 3H] block stays under PyTorch's parallel grain.
    g.add_(g)
    gates[:, : 3 * size if peep else 4 * size].sigmoid_()
    g.add_(g).sub_(one)
    c_new = torch.addcmul(f * c, i, g)
    if peep:
        o.addcmul_(c_new, peep[2]).sigmoid_()
    tanh_c = torch.add(c_new, c_new).sigmoid_()
    tanh_c.add_(tanh_c).sub_(one)
    h_new = o * tanh_c
    return h_new, (h_new, c_new), (gates, c, c_new, tanh_c, h)


def lstm_step_backward(weights, saved, grad_h: Tensor, grad_state: tuple[Tensor, Tensor], out=None):
    w_hh, peep = weights[0], weights[1:]
    gates, c_prev, _, tanh_c, _ = saved
    size = c_prev.shape[1]
    i, f, g, o = gates.unsafe_split(size, dim=1)
    grad_h = grad_h + grad_state[0]
    grad_gates = torch.empty_like(gates) if out is None else out
    d_i, d_f, d_g, d_o = grad_gates.unsafe_split(size, dim=1)
    torch.mul(grad_h, tanh_c, out=d_o)
    _sigmoid_backward(d_o, o, grad_input=d_o)
    # dL/dc_t: through h_t = o tanh(c_t), from step t+1, and (peephole) through o's peek at c_t
    grad_c = _tanh_backward_new(grad_h * o, tanh_c).add_(grad_state[1])
    if peep:
        grad_c.addcmul_(d_o, peep[2])
    torch.mul(grad_c, g, out=d_i)
    torch.mul(grad_c, c_prev, out=d_f)
    d_if = grad_gates[:, : 2 * size]
    _sigmoid_backward(d_if, gates[:, : 2 * size], grad_input=d_if)
    torch.mul(grad_c, i, out=d_g)
    _tanh_backward(d_g, g, grad_input=d_g)
    grad_c_prev = grad_c * f
    if peep:
        grad_c_prev.addcmul_(d_i, peep[0]).addcmul_(d_f, peep[1])
    grad_h_prev = w_hh.backward(grad_gates)
    return grad_gates, (grad_h_prev, grad_c_prev)


def lstm_weight_grads(weights, grad_xp: Tensor, saved):
    """All steps at once: dW_hh = sum_t dgates_t^T h_{t-1} as one [4H, T*B] @ [T*B, H] matmul."""
    steps, batch, rows = grad_xp.shape
    flat_grad = grad_xp.reshape(steps * batch, rows)
    h_prev = torch.stack([s[4] for s in saved]).reshape(steps * batch, -1)
    grads = [weight_grad(flat_grad, h_prev)]
    if len(weights) > 1:
        size = rows // 4
        c_prev = torch.stack([s[1] for s in saved]).reshape(steps * batch, size)
        c_new = torch.stack([s[2] for s in saved]).reshape(steps * batch, size)
        grads.append((flat_grad[:, :size] * c_prev).sum(0))
        grads.append((flat_grad[:, size : 2 * size] * c_prev).sum(0))
        grads.append((flat_grad[:, 3 * size :] * c_new).sum(0))
    return tuple(grads)


@hookimpl
def rnnbench_cells():
    return {"lstm": LSTMCell}
