"""The whole-sequence Function (hand-written reverse loop) and the oneDNN matmuls of the generic path.

tests/test_encoder.py checks every path against the published equations in float64; here: float32
(where the oneDNN kernels run), autocast, a plugin cell declaring its own step backward, and the
rule that a subclass changing the equations never inherits a stale backward.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from rnnbench import Cell
from rnnbench.cells import kernels
from rnnbench.cells.lstm import LSTMCell
from rnnbench.cells.peephole import PeepholeLSTMCell
from rnnbench.cells.sequence import declares_step_backward
from rnnbench.encoder import Encoder

LENGTHS = torch.tensor([7, 10, 3, 10])
F32 = {"rtol": 2e-4, "atol": 2e-5}


def _run(encoder: Encoder, x: Tensor, lengths, sequence: bool):
    encoder.sequence_path = sequence
    encoder.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out, finals = encoder(x, lengths)
    gen = torch.Generator().manual_seed(5)
    loss = (out * torch.randn(out.shape, generator=gen)).sum()
    for state in finals:
        for part in state if isinstance(state, tuple) else (state,):
            loss = loss + (part * torch.randn(part.shape, generator=gen)).sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in encoder.named_parameters()}
    return (
        out.detach(),
        [p.detach() for s in finals for p in (s if isinstance(s, tuple) else (s,))],
        grads,
        x.grad,
    )


@pytest.mark.parametrize("hidden", [32, kernels.ONEDNN_MIN_HIDDEN], ids=["addmm", "onednn"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("cell", ["lstm", "peephole"])
def test_sequence_path_equals_autograd_in_float32(cell, padded, hidden):
    """float32 on CPU: PyTorch's matmuls (small) or oneDNN's packed ones per step, and the sigmoid
    form of tanh: same numbers as autograd's loop up to rounding."""
    torch.manual_seed(0)
    encoder = Encoder(cell, 16, hidden, 2, True, fused=False)
    assert encoder.sequence_path
    x = torch.randn(4, 10, 16)
    lengths = LENGTHS if padded else None
    got, want = _run(encoder, x, lengths, True), _run(encoder, x, lengths, False)
    torch.testing.assert_close(got[0], want[0], **F32)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, **F32)
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], **F32, msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(got[3], want[3], **F32)


def test_subclass_changing_the_equations_falls_back_to_autograd():
    class Tweaked(LSTMCell):
        def forward_projected(self, xp_t, state):
            h, (h, c) = super().forward_projected(xp_t, state)
            return 2 * h, (2 * h, c)

    class Renamed(PeepholeLSTMCell):
        """Same equations (nothing overridden): the backward still belongs to them."""

    assert declares_step_backward(LSTMCell(2, 3)) and declares_step_backward(PeepholeLSTMCell(2, 3))
    assert not declares_step_backward(Tweaked(2, 3))
    assert declares_step_backward(Renamed(2, 3))
    assert not Encoder(Tweaked, 2, 3).sequence_path
    assert "sequence" in repr(Encoder("peephole", 2, 3))


class ElementwiseCell(Cell):
    """A plugin-style cell, h_t = tanh(W x_t + b + u * h_{t-1}), that declares its step's backward."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__(input_size, hidden_size)
        self.weight_ih = nn.Parameter(torch.randn(hidden_size, input_size) / input_size**0.5)
        self.bias_ih = nn.Parameter(torch.randn(hidden_size) * 0.1)
        self.weight_hh = nn.Parameter(torch.rand(hidden_size))

    def project_input(self, x):
        return nn.functional.linear(x, self.weight_ih, self.bias_ih)

    def forward_projected(self, xp_t, h):
        h = torch.tanh(xp_t + self.weight_hh * h)
        return h, h

    def forward(self, x_t, h):
        return self.forward_projected(self.project_input(x_t), h)

    def recurrent_weights(self):
        return (self.weight_hh,)

    def step_forward(self, weights, xp_t, h):
        h_new = torch.tanh(torch.addcmul(xp_t, weights[0], h))
        return h_new, h_new, (h_new, h)

    def step_backward(self, weights, saved, grad_h, grad_state):
        h_new, _ = saved
        grad_pre = torch.ops.aten.tanh_backward(grad_h + grad_state, h_new)
        return grad_pre, grad_pre * weights[0]

    def weight_grads(self, weights, grad_xp, saved):
        h_prev = torch.stack([s[1] for s in saved])
        return ((grad_xp * h_prev).sum((0, 1)),)


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_a_plugin_cell_with_its_own_step_backward_runs_the_sequence_function(padded):
    torch.manual_seed(1)
    encoder = Encoder(ElementwiseCell, 3, 5, 2, True).double()
    assert encoder.sequence_path and encoder.fused_mode is None
    x = torch.randn(4, 10, 3, dtype=torch.float64)
    lengths = LENGTHS if padded else None
    got, want = _run(encoder, x, lengths, True), _run(encoder, x, lengths, False)
    tight = {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(got[0], want[0], **tight)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, **tight)
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], **tight)
    torch.testing.assert_close(got[3], want[3], **tight)


def test_sequence_function_under_cpu_bf16_autocast():
    """Autocast hands the loop a bfloat16 projection: the recurrence runs in bfloat16, the
    parameters' gradients come back in their own dtype (float32), close to the float32 ones."""
    torch.manual_seed(2)
    encoder = Encoder("peephole", 16, 32)
    x = torch.randn(4, 10, 16)
    out32, (final32,) = encoder(x, LENGTHS)
    (out32.sum() + final32[1].sum()).backward()
    want = {n: p.grad.clone() for n, p in encoder.named_parameters()}
    encoder.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (final,) = encoder(x, LENGTHS)
    assert out.dtype == torch.bfloat16
    (out.float().sum() + final[1].float().sum()).backward()
    for name, p in encoder.named_parameters():
        assert p.grad.dtype == torch.float32
        scale = want[name].abs().max().clamp_min(1.0)
        assert (p.grad - want[name]).abs().max() <= 0.05 * scale, name


# -- the oneDNN matmuls -------------------------------------------------------------------------------
@pytest.mark.skipif(not kernels.ONEDNN, reason="this PyTorch build has no oneDNN")
def test_onednn_matmuls_equal_torch_in_float32():
    gen = torch.Generator().manual_seed(3)
    h, add = torch.randn(8, 16, generator=gen), torch.randn(8, 64, generator=gen)
    weight, grad = torch.randn(64, 16, generator=gen), torch.randn(8, 64, generator=gen)
    assert kernels.uses_onednn(h, weight)
    assert not kernels.RecurrentMatmul(weight, 8).packed  # small: PyTorch's addmm is faster
    wide = kernels.ONEDNN_MIN_HIDDEN
    h_wide, weight_wide = torch.randn(8, wide, generator=gen), torch.randn(64, wide, generator=gen)
    matmul = kernels.RecurrentMatmul(weight_wide, 8)
    assert matmul.packed
    torch.testing.assert_close(matmul.forward(h_wide, add), torch.addmm(add, h_wide, weight_wide.t()), **F32)
    torch.testing.assert_close(matmul.backward(grad), grad @ weight_wide, **F32)
    torch.testing.assert_close(kernels.weight_grad(grad, h), grad.t() @ h, **F32)

    x = torch.randn(3, 8, 16, generator=gen, requires_grad=True)
    w = weight.clone().requires_grad_()
    b = torch.randn(64, generator=gen, requires_grad=True)
    out = kernels.linear(x, w, b)
    upstream = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad(out, (x, w, b), upstream)
    ref = nn.functional.linear(x, w, b)
    want = torch.autograd.grad(ref, (x, w, b), upstream)
    torch.testing.assert_close(out, ref, **F32)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **F32)


def test_float64_and_autocast_keep_torchs_own_matmuls():
    x = torch.randn(2, 3, dtype=torch.float64)
    assert not kernels.uses_onednn(x)
    assert not kernels.RecurrentMatmul(torch.randn(4, 3, dtype=torch.float64), 2).packed
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not kernels.uses_onednn(torch.randn(2, 3))


def test_saved_activations_are_visible_to_saved_tensor_hooks():
    """What `rnnbench bench` and train_memory_mib count on CPU: the gate activations of every step."""
    from rnnbench.bench import _memory_mb

    x, grad = torch.randn(4, 10, 16), torch.randn(4, 10, 8)
    encoder = Encoder("peephole", 16, 8)
    gates_mib = 10 * 4 * 4 * 8 * 4 / 2**20  # [T, B, 4H] float32, kept by the sequence Function
    assert _memory_mb(encoder, x, grad, torch.device("cpu")) >= gates_mib
    encoder.sequence_path = False
    autograd_mib = _memory_mb(encoder, x, grad, torch.device("cpu"))
    encoder.sequence_path = True
    assert _memory_mb(encoder, x, grad, torch.device("cpu")) >= 0.5 * autograd_mib
