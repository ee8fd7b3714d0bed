"""The encoder computes exactly the stacked, bidirectional, padded recurrence of its cells' equations.

The reference below is written straight from the published equations, in float64, one sequence at
a time with an explicit Python loop over its real steps (and an explicit reversal for the backward
direction), so it shares no code with the encoder: not the masking, not the packing, not the
hoisted projection, not the cells' own ``forward``. Only the parameter tensors are shared, so the
gradients of both can be compared parameter by parameter.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from rnnbench.cells.lstm import LSTMCell
from rnnbench.encoder import Encoder
from rnnbench.errors import ConfigError, UnknownNameError

INPUT, HIDDEN, STEPS, BATCH = 3, 4, 6, 3
LENGTHS = [STEPS - 2, STEPS, 1]  # unsorted on purpose: the fused path must sort and unsort
TOLERANCE = {"rtol": 1e-6, "atol": 1e-6}

# test case -> (registry name, cell hyperparameters)
CELLS = {
    "rnn-tanh": ("rnn", {"nonlinearity": "tanh"}),
    "rnn-relu": ("rnn", {"nonlinearity": "relu"}),
    "lstm": ("lstm", {}),
    "peephole": ("peephole", {}),
    "gru": ("gru", {}),
}
FUSED_MODE = {"rnn-tanh": "RNN_TANH", "rnn-relu": "RNN_RELU", "lstm": "LSTM", "peephole": None, "gru": "GRU"}
# fused: PyTorch's kernel; sequence: the whole-loop Function with the cell's hand-written backward
# (lstm, peephole; other cells fall back to autograd); autograd: the per-step loop under autograd.
PATHS = ["fused", "sequence", "autograd"]
SEQUENCE_CELLS = {"lstm", "peephole"}


# -- reference equations (one sequence, vectors [hidden]) ------------------------------------------
def _block(t: Tensor, k: int, size: int) -> Tensor:
    """Gate block k of a stacked weight or bias (PyTorch's layout: blocks of hidden_size rows)."""
    return t[k * size : (k + 1) * size]


def _gate_preactivation(cell, k: int, x: Tensor, h: Tensor) -> Tensor:
    """W_k x + b_ik + U_k h + b_hk for gate block k."""
    size = cell.hidden_size
    return (
        _block(cell.weight_ih, k, size) @ x
        + _block(cell.bias_ih, k, size)
        + _block(cell.weight_hh, k, size) @ h
        + _block(cell.bias_hh, k, size)
    )


def rnn_step(cell, x, state):
    (h,) = state
    pre = _gate_preactivation(cell, 0, x, h)
    return (torch.tanh(pre) if cell.nonlinearity == "tanh" else torch.relu(pre),)


def lstm_step(cell, x, state):
    h, c = state
    i = torch.sigmoid(_gate_preactivation(cell, 0, x, h))
    f = torch.sigmoid(_gate_preactivation(cell, 1, x, h))
    g = torch.tanh(_gate_preactivation(cell, 2, x, h))
    o = torch.sigmoid(_gate_preactivation(cell, 3, x, h))
    c = f * c + i * g
    return o * torch.tanh(c), c


def peephole_step(cell, x, state):
    """Gers & Schmidhuber (2000): i and f peek at c_{t-1}, o peeks at the new c_t."""
    h, c_prev = state
    i = torch.sigmoid(_gate_preactivation(cell, 0, x, h) + cell.weight_ci * c_prev)
    f = torch.sigmoid(_gate_preactivation(cell, 1, x, h) + cell.weight_cf * c_prev)
    g = torch.tanh(_gate_preactivation(cell, 2, x, h))
    c = f * c_prev + i * g
    o = torch.sigmoid(_gate_preactivation(cell, 3, x, h) + cell.weight_co * c)
    return o * torch.tanh(c), c


def gru_step(cell, x, state):
    """PyTorch's nn.GRU: r gates (W_hn h + b_hn), not h; h' = (1 - z) n + z h."""
    (h,) = state
    size = cell.hidden_size
    r = torch.sigmoid(_gate_preactivation(cell, 0, x, h))
    z = torch.sigmoid(_gate_preactivation(cell, 1, x, h))
    n = torch.tanh(
        _block(cell.weight_ih, 2, size) @ x
        + _block(cell.bias_ih, 2, size)
        + r * (_block(cell.weight_hh, 2, size) @ h + _block(cell.bias_hh, 2, size))
    )
    return ((1 - z) * n + z * h,)


REFERENCE_STEP = {"rnn": rnn_step, "lstm": lstm_step, "peephole": peephole_step, "gru": gru_step}


def as_parts(state) -> tuple[Tensor, ...]:
    """A cell state as a tuple (h,) or (h, c), whichever form the cell uses."""
    return state if isinstance(state, tuple) else (state,)


def reference_encoder(cell_name: str, encoder: Encoder, x: Tensor, lengths: list[int], init=None):
    """Outputs [batch, time, D*hidden] (zeros past each length) and final states, like Encoder."""
    step = REFERENCE_STEP[cell_name]
    directions = encoder.num_directions
    batch, steps = x.shape[0], x.shape[1]
    rows, finals = [], [[] for _ in encoder.cells]
    for b in range(batch):
        length = lengths[b]
        layer_input = [x[b, t] for t in range(length)]
        for layer in range(encoder.num_layers):
            per_direction = []
            for direction in range(directions):
                k = layer * directions + direction
                cell = encoder.cells[k]
                if init is None:
                    zeros = x.new_zeros(encoder.hidden_size)
                    state = (zeros, zeros) if cell_name in ("lstm", "peephole") else (zeros,)
                else:
                    state = tuple(part[b] for part in as_parts(init[k]))
                # The backward direction reads this sequence's real steps last to first.
                order = range(length) if direction == 0 else range(length - 1, -1, -1)
                outputs = [None] * length
                for t in order:
                    state = step(cell, layer_input[t], state)
                    outputs[t] = state[0]
                per_direction.append(outputs)
                finals[k].append(state)
            layer_input = [torch.cat([outs[t] for outs in per_direction]) for t in range(length)]
        padding = [x.new_zeros(encoder.output_size)] * (steps - length)
        rows.append(torch.stack(layer_input + padding))
    stacked_finals = [tuple(torch.stack(parts) for parts in zip(*per_seq)) for per_seq in finals]
    return torch.stack(rows), stacked_finals


# -- helpers ----------------------------------------------------------------------------------------
def make_encoder(case: str, num_layers: int, bidirectional: bool, *, path: str = "fused", seed: int = 0):
    cell_name, hparams = CELLS[case]
    torch.manual_seed(seed)
    encoder = Encoder(
        cell_name,
        INPUT,
        HIDDEN,
        num_layers,
        bidirectional,
        dropout=0.0,
        fused=path == "fused",
        sequence=path != "autograd",
        **hparams,
    )
    encoder = encoder.double()
    # Every parameter random and not small: no term (forget bias, peepholes) is constant or negligible.
    with torch.no_grad():
        for p in encoder.parameters():
            p.uniform_(-0.7, 0.7)
    return encoder


def scalar_loss(outputs: Tensor, finals, seed: int = 1) -> Tensor:
    """Random fixed weighting of every output and final-state entry: a gradient for each of them."""
    gen = torch.Generator().manual_seed(seed)
    loss = (outputs * torch.randn(outputs.shape, generator=gen, dtype=outputs.dtype)).sum()
    for state in finals:
        for part in as_parts(state):
            loss = loss + (part * torch.randn(part.shape, generator=gen, dtype=part.dtype)).sum()
    return loss


def random_input(steps: int = STEPS, seed: int = 2) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, steps, INPUT, generator=gen, dtype=torch.float64)


def random_state(encoder: Encoder, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    states = []
    for zero_state in encoder.init_state(BATCH, dtype=torch.float64):
        parts = tuple(
            (0.5 * torch.randn(p.shape, generator=gen, dtype=torch.float64)).requires_grad_()
            for p in as_parts(zero_state)
        )
        states.append(parts if isinstance(zero_state, tuple) else parts[0])
    return states


def assert_same_run(encoder, case, x, lengths, init=None):
    """Outputs, final states and every gradient of the encoder equal the reference's."""
    cell_name = CELLS[case][0]
    x = x.clone().requires_grad_()
    length_tensor = None if lengths is None else torch.tensor(lengths)
    real_lengths = lengths or [x.shape[1]] * x.shape[0]
    out, finals = encoder(x, length_tensor, init)
    ref_out, ref_finals = reference_encoder(cell_name, encoder, x, real_lengths, init)

    torch.testing.assert_close(out, ref_out, **TOLERANCE)
    assert len(finals) == len(ref_finals) == encoder.num_layers * encoder.num_directions
    for got, want in zip(finals, ref_finals):
        assert isinstance(got, tuple) == (cell_name in ("lstm", "peephole"))
        for got_part, want_part in zip(as_parts(got), want):
            torch.testing.assert_close(got_part, want_part, **TOLERANCE)

    names, wrt = ["input"], [x]
    for name, p in encoder.named_parameters():
        names.append(name)
        wrt.append(p)
    for k, state in enumerate(init or []):
        for part in as_parts(state):
            names.append(f"initial state {k}")
            wrt.append(part)
    grads = torch.autograd.grad(scalar_loss(out, finals), wrt)
    ref_grads = torch.autograd.grad(scalar_loss(ref_out, ref_finals), wrt)
    for name, got, want in zip(names, grads, ref_grads):
        torch.testing.assert_close(got, want, **TOLERANCE, msg=lambda m, name=name: f"grad of {name}: {m}")


# -- equivalence with the reference -----------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("case", list(CELLS))
def test_encoder_matches_reference_equations(case, num_layers, bidirectional, padded, path):
    encoder = make_encoder(case, num_layers, bidirectional, path=path)
    assert encoder.fused_mode == (FUSED_MODE[case] if path == "fused" else None)
    assert encoder.sequence_path == (path != "autograd" and CELLS[case][0] in SEQUENCE_CELLS)
    x = random_input()
    assert_same_run(encoder, case, x, LENGTHS if padded else None)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("case", list(CELLS))
def test_initial_state_is_used_on_every_path(case, padded, path):
    encoder = make_encoder(case, 2, True, path=path)
    init = random_state(encoder)
    assert_same_run(encoder, case, random_input(), LENGTHS if padded else None, init)


@pytest.mark.parametrize("case", ["rnn-tanh", "rnn-relu", "lstm", "gru"])
def test_encoder_matches_pytorch_modules(case):
    """Same layout as nn.RNN/LSTM/GRU: copying the weights over gives the same function."""
    encoder = make_encoder(case, 2, True)
    cell_name, hparams = CELLS[case]
    module_cls = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[cell_name]
    extra = {"nonlinearity": hparams["nonlinearity"]} if cell_name == "rnn" else {}
    torch_module = module_cls(INPUT, HIDDEN, 2, bidirectional=True, batch_first=True, **extra).double()
    with torch.no_grad():
        for layer in range(2):
            for direction, suffix in enumerate(("", "_reverse")):
                cell = encoder.cells[layer * 2 + direction]
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(torch_module, f"{name}_l{layer}{suffix}").copy_(getattr(cell, name))
    x, lengths = random_input(), torch.tensor(LENGTHS)
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    want, _ = nn.utils.rnn.pad_packed_sequence(torch_module(packed)[0], batch_first=True, total_length=STEPS)
    for fused in (True, False):
        encoder.fused_mode = FUSED_MODE[case] if fused else None
        torch.testing.assert_close(encoder(x, lengths)[0], want, **TOLERANCE)


# -- path selection and parameter sharing -----------------------------------------------------------
def test_fused_path_only_for_exact_builtins():
    class TweakedLSTM(LSTMCell):
        """A subclass may change the equations, so it must never run nn.LSTM's kernel."""

    for case, mode in FUSED_MODE.items():
        assert make_encoder(case, 2, True).fused_mode == mode
        assert make_encoder(case, 2, True, path="sequence").fused_mode is None
    assert Encoder(TweakedLSTM, INPUT, HIDDEN).fused_mode is None
    assert Encoder(LSTMCell, INPUT, HIDDEN).fused_mode == "LSTM"
    assert "fused=LSTM" in repr(Encoder("lstm", INPUT, HIDDEN))
    assert "generic" in repr(Encoder("peephole", INPUT, HIDDEN))


@pytest.mark.parametrize("case", ["rnn-tanh", "lstm", "gru"])
def test_fused_and_generic_paths_share_parameter_objects(case):
    encoder = make_encoder(case, 2, True)
    cell_params = [p for cell in encoder.cells for p in cell.parameters()]
    assert [id(p) for p in encoder.parameters()] == [id(p) for p in cell_params]

    x, lengths = random_input(), torch.tensor(LENGTHS)

    def run(mode):
        encoder.fused_mode = mode
        encoder.zero_grad(set_to_none=True)
        out, finals = encoder(x, lengths)
        scalar_loss(out, finals).backward()
        return out.detach(), [p.grad.clone() for p in cell_params]

    fused_out, fused_grads = run(FUSED_MODE[case])
    generic_out, generic_grads = run(None)
    torch.testing.assert_close(fused_out, generic_out, **TOLERANCE)
    for fused_grad, generic_grad in zip(fused_grads, generic_grads):
        torch.testing.assert_close(fused_grad, generic_grad, **TOLERANCE)

    # An in-place edit of a cell's weight is seen by the fused kernel: it holds no copy.
    with torch.no_grad():
        encoder.cells[1].weight_hh.mul_(-1.0)
    encoder.fused_mode = FUSED_MODE[case]
    edited_out = encoder(x, lengths)[0].detach()
    assert not torch.allclose(edited_out, fused_out)
    encoder.fused_mode = None
    torch.testing.assert_close(encoder(x, lengths)[0], edited_out, **TOLERANCE)


# -- cuDNN's flat weight buffer (the CUDA call itself runs in `rnnbench bench --check`) ----------------
@pytest.mark.parametrize("case", ["rnn-tanh", "rnn-relu", "lstm", "gru"])
def test_cudnn_flatten_gets_the_arguments_nn_modules_give_it(case):
    """Same weight order (nn.RNNBase._flat_weights), mode and sizes as nn.RNNBase.flatten_parameters."""
    encoder = make_encoder(case, 2, True)
    cell_name, hparams = CELLS[case]
    module_cls = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[cell_name]
    module = module_cls(INPUT, HIDDEN, 2, bidirectional=True, batch_first=True, **hparams)
    weights, count, input_size, mode, hidden, proj, layers, batch_first, bidirectional = (
        encoder.cudnn_flatten_arguments()
    )
    names = {id(p): n for n, p in encoder.named_parameters()}

    def ours(nn_name: str) -> str:  # weight_ih_l1_reverse -> cells.3.weight_ih
        kind, rest = nn_name.split("_l")
        layer, reverse = int(rest.split("_")[0]), rest.endswith("_reverse")
        return f"cells.{layer * 2 + reverse}.{kind}"

    assert [names[id(w)] for w in weights] == [ours(n) for n in module._flat_weights_names]
    assert (count, input_size, hidden, proj, layers, batch_first, bidirectional) == (
        4,
        INPUT,
        HIDDEN,
        0,
        2,
        True,
        True,
    )
    # cudnnRNNMode_t (cudnn.h): CUDNN_RNN_RELU 0, CUDNN_RNN_TANH 1, CUDNN_LSTM 2, CUDNN_GRU 3
    assert mode == {"RNN_RELU": 0, "RNN_TANH": 1, "LSTM": 2, "GRU": 3}[module.mode]


def test_flatten_runs_after_every_move_and_is_a_no_op_off_cuda(monkeypatch):
    encoder = make_encoder("lstm", 2, True)
    calls = []
    original = Encoder.flatten_parameters
    monkeypatch.setattr(Encoder, "flatten_parameters", lambda self: calls.append(original(self)))
    before = [p.data_ptr() for p in encoder.parameters()]
    encoder.float()
    assert len(calls) == 1  # _apply re-flattens, as nn.RNNBase does
    encoder.double()
    assert len(calls) == 2
    assert not encoder.weights_are_flat()  # on CPU, like nn.LSTM, the weights stay separate tensors
    assert len(set(before)) == len(before)


# -- padding ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", list(CELLS))
def test_padding_never_changes_real_outputs(case, path):
    encoder = make_encoder(case, 2, True, path=path)
    x, lengths = random_input(), torch.tensor(LENGTHS)
    out, finals = encoder(x, lengths)

    # Garbage in the padded positions and three extra padded steps: every length is now < time.
    gen = torch.Generator().manual_seed(9)
    garbage = 100.0 * torch.randn(BATCH, STEPS + 3, INPUT, generator=gen, dtype=torch.float64)
    real = (torch.arange(STEPS + 3) < lengths.unsqueeze(1)).unsqueeze(-1)
    x_long = torch.where(real, torch.cat([x, x.new_zeros(BATCH, 3, INPUT)], dim=1), garbage)
    out_long, finals_long = encoder(x_long, lengths)

    torch.testing.assert_close(out_long[:, :STEPS], out, **TOLERANCE)
    assert torch.all(out_long[~real.squeeze(-1)] == 0)
    for short, long in zip(finals, finals_long):
        for short_part, long_part in zip(as_parts(short), as_parts(long)):
            torch.testing.assert_close(long_part, short_part, **TOLERANCE)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", ["rnn-relu", "lstm", "peephole"])
def test_non_finite_padding_stays_out_of_outputs_and_gradients(case, path):
    """Padding may be uninitialised memory (torch.empty) or a NaN sentinel: it must not leak."""
    encoder = make_encoder(case, 2, True, path=path)
    lengths = torch.tensor(LENGTHS)
    real = (torch.arange(STEPS) < lengths.unsqueeze(1)).unsqueeze(-1)
    x = torch.where(real, random_input(), torch.tensor(float("nan"), dtype=torch.float64))
    x.requires_grad_()
    out, finals = encoder(x, lengths)
    assert torch.all(out[~real.squeeze(-1)] == 0)
    assert torch.isfinite(out).all()
    scalar_loss(out, finals).backward()
    for name, p in encoder.named_parameters():
        assert torch.isfinite(p.grad).all(), f"non-finite gradient of {name}"
    assert torch.all(x.grad[~real.squeeze(-1)] == 0) and torch.isfinite(x.grad).all()


# The fused kernel's ways through a padded batch (Encoder.padded): each must give what the
# reference equations give on each sequence alone, whatever the order of the lengths in the batch.
PADDED_PATHS = ["segments", "masked", "packed"]
FUSED_CASES = [case for case, mode in FUSED_MODE.items() if mode]
LENGTH_ORDERS = {
    "mixed": LENGTHS,
    "shortest-first": [1, STEPS - 2, STEPS - 2],  # as length-bucketed batches come
    "longest-first": [STEPS, 3, 1],
    "one-length-short": [STEPS - 2] * BATCH,  # every row padded, one span
}


@pytest.mark.parametrize("padded", PADDED_PATHS)
@pytest.mark.parametrize("order", list(LENGTH_ORDERS))
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("case", FUSED_CASES)
def test_every_padded_path_matches_reference_equations(case, bidirectional, order, padded):
    """Two layers: segments runs both in each call (unidirectional), masked one by one."""
    encoder = make_encoder(case, 2, bidirectional)
    encoder.padded = padded
    assert_same_run(encoder, case, random_input(), LENGTH_ORDERS[order], random_state(encoder))


@pytest.mark.parametrize("padded", ["segments", "masked"])
@pytest.mark.parametrize("order", ["mixed", "shortest-first"])
@pytest.mark.parametrize("path", ["sequence", "autograd"])
@pytest.mark.parametrize("case", ["lstm", "peephole", "gru"])
def test_generic_padded_paths_match_reference_equations(case, path, order, padded):
    """The generic path runs every step with a masked update (the default) or spans (segments)."""
    encoder = make_encoder(case, 2, True, path=path)
    encoder.padded = padded
    assert_same_run(encoder, case, random_input(), LENGTH_ORDERS[order], random_state(encoder))


@pytest.mark.parametrize("padded", PADDED_PATHS)
@pytest.mark.parametrize("case", FUSED_CASES)
def test_non_finite_padding_stays_out_on_every_padded_path(case, padded):
    encoder = make_encoder(case, 2, True)
    encoder.padded = padded
    lengths = torch.tensor(LENGTHS)
    real = (torch.arange(STEPS) < lengths.unsqueeze(1)).unsqueeze(-1)
    x = torch.where(real, random_input(), torch.tensor(float("nan"), dtype=torch.float64)).requires_grad_()
    out, finals = encoder(x, lengths)
    assert torch.all(out[~real.squeeze(-1)] == 0) and torch.isfinite(out).all()
    scalar_loss(out, finals).backward()
    for name, p in encoder.named_parameters():
        assert torch.isfinite(p.grad).all(), f"non-finite gradient of {name}"
    assert torch.all(x.grad[~real.squeeze(-1)] == 0) and torch.isfinite(x.grad).all()


def test_padded_path_choice_on_the_cpu():
    x = random_input().float()
    assert {make_encoder(case, 1, False).padded_path(x) for case in FUSED_CASES} == {"segments"}
    masked = {}
    for case in FUSED_CASES:
        encoder = make_encoder(case, 1, False)
        encoder.padded = "masked"
        masked[case] = encoder.padded_path(x)
    # only where the state is the output and stays bounded in the padding
    assert masked == {"rnn-tanh": "masked", "rnn-relu": "segments", "lstm": "segments", "gru": "masked"}
    with pytest.raises(ConfigError, match="padded must be one of"):
        Encoder("lstm", INPUT, HIDDEN, padded="sorted")


@pytest.mark.parametrize("case", FUSED_CASES)
def test_float32_padded_paths_agree_with_packed(case):
    """float32 on the CPU takes oneDNN's LSTM (float64 takes ATen's): the dense spans must still
    give the packed sequence's outputs, final states and gradients."""
    cell_name, hparams = CELLS[case]
    torch.manual_seed(0)
    encoder = Encoder(cell_name, 8, 16, 2, **hparams)
    gen = torch.Generator().manual_seed(4)
    lengths = torch.tensor([3, 5, 5, 9, 12, 12, 12, 20])
    x = torch.randn(8, 20, 8, generator=gen)
    results = {}
    for padded in ("packed", "auto"):
        encoder.padded = padded
        xi = x.clone().requires_grad_()
        out, finals = encoder(xi, lengths)
        grads = torch.autograd.grad(scalar_loss(out, finals), [xi, *encoder.parameters()])
        results[padded] = (out, [p for s in finals for p in as_parts(s)], grads)
    for got, want in zip(results["auto"], results["packed"]):
        for g, w in zip(
            got if isinstance(got, (list, tuple)) else [got],
            want if isinstance(want, (list, tuple)) else [want],
        ):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_full_lengths_equal_no_lengths():
    encoder = make_encoder("lstm", 2, True, path="sequence")
    x = random_input()
    with_lengths = encoder(x, torch.full((BATCH,), STEPS))[0]
    torch.testing.assert_close(with_lengths, encoder(x)[0], rtol=0, atol=0)


# -- bad input --------------------------------------------------------------------------------------
def test_unknown_cell_name_suggests_the_closest():
    with pytest.raises(UnknownNameError) as info:
        Encoder("lstn", INPUT, HIDDEN)
    message = str(info.value)
    assert "did you mean 'lstm'" in message
    for known in ("gru", "lstm", "peephole", "rnn"):
        assert known in message


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(BATCH, STEPS, INPUT + 1), (STEPS, INPUT), (1, BATCH, STEPS, INPUT)])
def test_wrong_input_shape_names_expected_and_received(shape, path):
    encoder = Encoder("gru", INPUT, HIDDEN, fused=path == "fused", sequence=path != "autograd")
    with pytest.raises(ValueError) as info:
        encoder(torch.zeros(shape))
    message = str(info.value)
    assert f"[batch, time, {INPUT}]" in message
    assert str(list(shape)) in message


@pytest.mark.parametrize(
    "lengths", [[STEPS, STEPS], [0, STEPS, 1], [STEPS + 1, 1, 1]], ids=["wrong-batch", "zero", "too-long"]
)
def test_bad_lengths_are_refused(lengths):
    encoder = Encoder("gru", INPUT, HIDDEN)
    with pytest.raises(ValueError, match="lengths"):
        encoder(torch.zeros(BATCH, STEPS, INPUT), torch.tensor(lengths))


def test_wrong_number_of_initial_states_is_refused():
    encoder = Encoder("gru", INPUT, HIDDEN, 2, True)
    with pytest.raises(ValueError, match="4 cell states"):
        encoder(torch.zeros(BATCH, STEPS, INPUT), state=encoder.init_state(BATCH)[:3])


@pytest.mark.parametrize("cell", ["rnn", "lstm", "peephole", "gru"])
@pytest.mark.parametrize(
    "config",
    [
        {"hidden_size": 0},
        {"hidden_size": -4},
        {"input_size": 0},
        {"num_layers": 0},
        {"num_layers": True},
        {"dropout": -0.1},
        {"dropout": 1.0},
        {"dropout": float("nan")},
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_bad_configuration_is_a_config_error(cell, config):
    arguments = {"input_size": INPUT, "hidden_size": HIDDEN, "num_layers": 1, "dropout": 0.0, **config}
    with pytest.raises(ConfigError):
        Encoder(cell, **arguments)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "peephole", "gru"])
def test_unknown_cell_hyperparameter_is_a_config_error(cell):
    with pytest.raises(ConfigError, match="bogus"):
        Encoder(cell, INPUT, HIDDEN, bogus=1)
