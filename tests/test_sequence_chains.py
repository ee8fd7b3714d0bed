"""The sequence Function's batch-parallel chains (issue 27): a batch split in row blocks, one time
loop per thread, gives the same outputs, final states and gradients as one loop over the batch.

The chain count is forced here (the machine's thread count decides it otherwise), so the split runs
on any machine, uneven splits and padding included.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import Tensor

from rnnbench.cells import kernels, sequence
from rnnbench.cells.lstm import LSTMCell, lstm_step_forward
from rnnbench.cells.peephole import PeepholeLSTMCell
from rnnbench.encoder import Encoder

TIGHT = {"rtol": 1e-10, "atol": 1e-12}
F32 = {"rtol": 2e-4, "atol": 2e-5}


def _run(encoder: Encoder, x: Tensor, lengths, sequence_path: bool = True):
    encoder.sequence_path = sequence_path
    encoder.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out, finals = encoder(x, lengths)
    gen = torch.Generator().manual_seed(5)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum()
    for state in finals:
        for part in state:
            loss = loss + (part * torch.randn(part.shape, generator=gen, dtype=part.dtype)).sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in encoder.named_parameters()}
    return out.detach(), [p.detach() for s in finals for p in s], grads, x.grad


def _assert_same(got, want, tolerance):
    torch.testing.assert_close(got[0], want[0], **tolerance)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, **tolerance)
    for name in want[2]:
        torch.testing.assert_close(
            got[2][name], want[2][name], **tolerance, msg=lambda m, n=name: f"{n}: {m}"
        )
    torch.testing.assert_close(got[3], want[3], **tolerance)


@pytest.fixture
def chains(monkeypatch):
    """Force the chain count (capped by the batch), and count the Function calls that split."""
    calls = []

    def force(count: int):
        def chain_count(cell, xp):
            calls.append(min(count, xp.shape[1]))
            return calls[-1]

        monkeypatch.setattr(sequence, "chain_count", chain_count)
        return calls

    return force


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("cell", ["lstm", "peephole"])
def test_chains_equal_one_loop_and_autograd_in_float64(chains, cell, padded, count):
    torch.manual_seed(0)
    encoder = Encoder(cell, 3, 5, 2, True, fused=False).double()
    x = torch.randn(7, 9, 3, dtype=torch.float64)
    lengths = torch.tensor([9, 4, 9, 1, 6, 9, 2]) if padded else None
    want = _run(encoder, x, lengths, sequence_path=False)
    one = _run(encoder, x, lengths)
    calls = chains(count)
    got = _run(encoder, x, lengths)
    assert calls and set(calls) == {count}  # every layer and direction split
    _assert_same(got, want, TIGHT)
    _assert_same(got, one, TIGHT)


@pytest.mark.parametrize("hidden", [32, kernels.ONEDNN_MIN_HIDDEN], ids=["addmm", "onednn"])
@pytest.mark.parametrize("cell", ["lstm", "peephole"])
def test_chains_equal_autograd_in_float32(chains, cell, hidden):
    """float32 on CPU, where the chains' per-step matmuls run single-threaded through oneDNN."""
    torch.manual_seed(1)
    encoder = Encoder(cell, 16, hidden, 1, False, fused=False)
    x = torch.randn(10, 6, 16)
    lengths = torch.tensor([6, 3, 6, 6, 1, 5, 6, 2, 6, 4])
    want = _run(encoder, x, lengths, sequence_path=False)
    chains(2)
    _assert_same(_run(encoder, x, lengths), want, F32)


def test_thread_count_and_modes_come_back(chains):
    threads = torch.get_num_threads()
    chains(2)
    encoder = Encoder("peephole", 4, 6)
    x = torch.randn(4, 5, 4)
    _run(encoder, x, None)
    assert torch.get_num_threads() == threads
    with torch.no_grad():
        out, _ = encoder(x)
    assert not out.requires_grad and torch.get_num_threads() == threads
    with torch.inference_mode():
        out, _ = encoder(x)
    assert out.is_inference() and torch.get_num_threads() == threads


def test_an_error_in_a_worker_chain_is_raised_here(chains, monkeypatch):
    threads = torch.get_num_threads()
    chains(2)
    this_thread = threading.get_ident()  # fail in the worker's chain only

    def step_forward(self, weights, xp_t, state):
        if threading.get_ident() != this_thread:
            raise RuntimeError("chain failed")
        return lstm_step_forward(weights, xp_t, state)

    monkeypatch.setattr(PeepholeLSTMCell, "step_forward", step_forward)
    with pytest.raises(RuntimeError, match="chain failed"):
        Encoder("peephole", 4, 6)(torch.randn(4, 5, 4))
    assert torch.get_num_threads() == threads


def test_chain_count_follows_threads_rows_and_the_equations_class(monkeypatch):
    xp = torch.zeros(3, 64, 4 * 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert sequence.chain_count(PeepholeLSTMCell(4, 8), xp) == 2
    assert sequence.chain_count(LSTMCell(4, 8), xp) == 2
    few = torch.zeros(3, 2 * sequence.MIN_CHAIN_ROWS - 1, 4 * 8)
    assert sequence.chain_count(PeepholeLSTMCell(4, 8), few) == 1

    class Mixing(LSTMCell):
        """New equations and their own step methods, but no batch_parallel of their own."""

        def forward_projected(self, xp_t, state):
            return super().forward_projected(xp_t, state)

        recurrent_weights = LSTMCell.recurrent_weights
        step_forward = LSTMCell.step_forward
        step_backward = LSTMCell.step_backward
        weight_grads = LSTMCell.weight_grads

    assert sequence.chain_count(Mixing(4, 8), xp) == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert sequence.chain_count(PeepholeLSTMCell(4, 8), xp) == 1


def test_chains_under_cpu_bf16_autocast(chains):
    """Autocast is thread-local: the worker chains run the bfloat16 recurrence as this thread does."""
    torch.manual_seed(2)
    encoder = Encoder("peephole", 16, 32)
    x = torch.randn(6, 10, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, (want_final,) = encoder(x)
        chains(3)
        got, (got_final,) = encoder(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_final[1], want_final[1], rtol=0, atol=0)
