"""One step of each builtin cell: PyTorch's own cells (or the paper's equations) agree with it.

The sequence-level reference lives in test_encoder.py; here each cell's step is checked against an
independent implementation, plus the cell contract (hoisted projection, states, hyperparameters).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rnnbench.cells.base import Cell
from rnnbench.cells.gru import GRUCell
from rnnbench.cells.lstm import LSTMCell
from rnnbench.cells.peephole import PeepholeLSTMCell
from rnnbench.cells.rnn import RNNCell
from rnnbench.errors import ConfigError, UnknownNameError
from rnnbench.plugins import Registry

INPUT, HIDDEN, BATCH = 3, 4, 5
TOLERANCE = {"rtol": 1e-6, "atol": 1e-6}
BUILTIN_CELLS = {"rnn": RNNCell, "lstm": LSTMCell, "peephole": PeepholeLSTMCell, "gru": GRUCell}


def randomised(cell: Cell, seed: int = 0) -> Cell:
    """The cell in float64 with every parameter random (no special forget-bias init to hide behind)."""
    gen = torch.Generator().manual_seed(seed)
    cell = cell.double()
    with torch.no_grad():
        for p in cell.parameters():
            p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) * 1.4 - 0.7)
    return cell


def random_batch(*shape, seed: int = 1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def copy_weights(ours: Cell, theirs: nn.Module) -> nn.Module:
    theirs = theirs.double()
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(theirs, name).copy_(getattr(ours, name))
    return theirs


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_rnn_step_matches_torch_rnn_cell(nonlinearity):
    cell = randomised(RNNCell(INPUT, HIDDEN, nonlinearity=nonlinearity))
    torch_cell = copy_weights(cell, nn.RNNCell(INPUT, HIDDEN, nonlinearity=nonlinearity))
    x, h = random_batch(BATCH, INPUT), random_batch(BATCH, HIDDEN, seed=2)
    out, state = cell(x, h)
    torch.testing.assert_close(out, torch_cell(x, h), **TOLERANCE)
    assert state is out


def test_lstm_step_matches_torch_lstm_cell():
    cell = randomised(LSTMCell(INPUT, HIDDEN))
    torch_cell = copy_weights(cell, nn.LSTMCell(INPUT, HIDDEN))
    x, h, c = (
        random_batch(BATCH, INPUT),
        random_batch(BATCH, HIDDEN, seed=2),
        random_batch(BATCH, HIDDEN, seed=3),
    )
    out, (h_new, c_new) = cell(x, (h, c))
    want_h, want_c = torch_cell(x, (h, c))
    torch.testing.assert_close(h_new, want_h, **TOLERANCE)
    torch.testing.assert_close(c_new, want_c, **TOLERANCE)
    assert out is h_new


def test_gru_step_matches_torch_gru_cell():
    cell = randomised(GRUCell(INPUT, HIDDEN))
    torch_cell = copy_weights(cell, nn.GRUCell(INPUT, HIDDEN))
    x, h = random_batch(BATCH, INPUT), random_batch(BATCH, HIDDEN, seed=2)
    out, state = cell(x, h)
    torch.testing.assert_close(out, torch_cell(x, h), **TOLERANCE)
    assert state is out


def test_peephole_step_matches_gers_schmidhuber_equations():
    cell = randomised(PeepholeLSTMCell(INPUT, HIDDEN))
    x, h, c = (
        random_batch(BATCH, INPUT),
        random_batch(BATCH, HIDDEN, seed=2),
        random_batch(BATCH, HIDDEN, seed=3),
    )
    W_i, W_f, W_g, W_o = cell.weight_ih.chunk(4)
    U_i, U_f, U_g, U_o = cell.weight_hh.chunk(4)
    b = cell.bias_ih + cell.bias_hh
    b_i, b_f, b_g, b_o = b.chunk(4)
    i = torch.sigmoid(x @ W_i.T + h @ U_i.T + b_i + cell.weight_ci * c)
    f = torch.sigmoid(x @ W_f.T + h @ U_f.T + b_f + cell.weight_cf * c)
    g = torch.tanh(x @ W_g.T + h @ U_g.T + b_g)
    c_new = f * c + i * g
    o = torch.sigmoid(x @ W_o.T + h @ U_o.T + b_o + cell.weight_co * c_new)  # o sees c_t, not c_{t-1}
    out, (h_new, c_got) = cell(x, (h, c))
    torch.testing.assert_close(c_got, c_new, **TOLERANCE)
    torch.testing.assert_close(h_new, o * torch.tanh(c_new), **TOLERANCE)


def test_peephole_with_zero_peepholes_is_an_lstm():
    peephole = randomised(PeepholeLSTMCell(INPUT, HIDDEN))
    lstm = LSTMCell(INPUT, HIDDEN).double()
    lstm.load_state_dict({k: v for k, v in peephole.state_dict().items() if not k.startswith("weight_c")})
    with torch.no_grad():
        for weight in (peephole.weight_ci, peephole.weight_cf, peephole.weight_co):
            weight.zero_()
    x, state = (
        random_batch(BATCH, INPUT),
        (random_batch(BATCH, HIDDEN, seed=2), random_batch(BATCH, HIDDEN, seed=3)),
    )
    torch.testing.assert_close(peephole(x, state)[1], lstm(x, state)[1], **TOLERANCE)


@pytest.mark.parametrize("name", list(BUILTIN_CELLS))
def test_hoisted_projection_equals_plain_step(name):
    """forward(x) == forward_projected(project_input(x)): the generic loop relies on it."""
    cell = randomised(BUILTIN_CELLS[name](INPUT, HIDDEN))
    x = random_batch(BATCH, INPUT)
    state = cell.init_state(BATCH, dtype=torch.float64)
    plain_out, plain_state = cell(x, state)
    # Projecting a whole [batch, time, input] sequence at once must equal projecting each step.
    sequence = random_batch(BATCH, 2, INPUT, seed=4)
    sequence[:, 0] = x
    projected_out, projected_state = cell.forward_projected(cell.project_input(sequence)[:, 0], state)
    torch.testing.assert_close(projected_out, plain_out, rtol=0, atol=1e-12)
    for a, b in zip(
        plain_state if isinstance(plain_state, tuple) else (plain_state,),
        projected_state if isinstance(projected_state, tuple) else (projected_state,),
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(BUILTIN_CELLS))
def test_init_state_is_zeros_of_the_requested_dtype(name):
    cell = BUILTIN_CELLS[name](INPUT, HIDDEN)
    state = cell.init_state(BATCH, dtype=torch.float64)
    parts = state if isinstance(state, tuple) else (state,)
    assert len(parts) == (2 if name in ("lstm", "peephole") else 1)
    for part in parts:
        assert part.shape == (BATCH, HIDDEN) and part.dtype == torch.float64
        assert torch.count_nonzero(part) == 0
    if len(parts) == 2:
        assert parts[0].data_ptr() != parts[1].data_ptr()  # h and c must not alias


@pytest.mark.parametrize("name", list(BUILTIN_CELLS))
def test_step_refuses_wrong_input_shape(name):
    cell = BUILTIN_CELLS[name](INPUT, HIDDEN)
    with pytest.raises(ValueError) as info:
        cell(torch.zeros(BATCH, INPUT + 2), cell.init_state(BATCH))
    assert f"[batch, {INPUT}]" in str(info.value)
    assert str([BATCH, INPUT + 2]) in str(info.value)


@pytest.mark.parametrize("name", list(BUILTIN_CELLS))
def test_parameters_start_in_pytorch_range(name):
    """Uniform in ±1/sqrt(hidden), like nn.LSTM, so both paths and nn modules start alike."""
    cell = BUILTIN_CELLS[name](
        INPUT, HIDDEN, **({"forget_bias": None} if name in ("lstm", "peephole") else {})
    )
    bound = 1 / HIDDEN**0.5
    for param_name, p in cell.named_parameters():
        assert p.abs().max() <= bound, param_name
        assert p.std() > 0, param_name


# -- hyperparameters ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [LSTMCell, PeepholeLSTMCell])
@pytest.mark.parametrize("value", [1.0, 2.5, 0.0, -1.0])
def test_forget_bias_sets_the_effective_forget_gate_bias(cls, value):
    cell = cls(INPUT, HIDDEN, forget_bias=value)
    forget = slice(HIDDEN, 2 * HIDDEN)  # gate order i, f, g, o
    effective = cell.bias_ih + cell.bias_hh
    torch.testing.assert_close(effective[forget], torch.full((HIDDEN,), value))
    # The other gates keep PyTorch's random init.
    others = torch.cat([effective[:HIDDEN], effective[2 * HIDDEN :]])
    assert others.std() > 0


def test_forget_bias_defaults_to_one_and_none_keeps_random_init():
    assert torch.all(
        (LSTMCell(INPUT, HIDDEN).bias_ih + LSTMCell(INPUT, HIDDEN).bias_hh)[HIDDEN : 2 * HIDDEN] == 1
    )
    cell = LSTMCell(INPUT, HIDDEN, forget_bias=None)
    assert cell.bias_hh[HIDDEN : 2 * HIDDEN].std() > 0


def test_forget_bias_survives_reset_parameters():
    cell = LSTMCell(INPUT, HIDDEN, forget_bias=2.0)
    with torch.no_grad():
        cell.bias_ih.zero_()
    cell.reset_parameters()
    torch.testing.assert_close((cell.bias_ih + cell.bias_hh)[HIDDEN : 2 * HIDDEN], torch.full((HIDDEN,), 2.0))


@pytest.mark.parametrize("name", list(BUILTIN_CELLS))
def test_unknown_hyperparameter_is_a_config_error(name):
    with pytest.raises(ConfigError, match="bogus"):
        BUILTIN_CELLS[name](INPUT, HIDDEN, bogus=1)


def test_hparam_names_declare_what_each_cell_accepts():
    assert RNNCell.hparam_names() == ("nonlinearity",)
    assert LSTMCell.hparam_names() == PeepholeLSTMCell.hparam_names() == ("forget_bias",)
    assert GRUCell.hparam_names() == ()


def test_rnn_nonlinearity_must_be_tanh_or_relu():
    with pytest.raises(ConfigError, match="sigmoid"):
        RNNCell(INPUT, HIDDEN, nonlinearity="sigmoid")


@pytest.mark.parametrize("name", list(BUILTIN_CELLS))
@pytest.mark.parametrize("sizes", [(0, HIDDEN), (INPUT, 0), (INPUT, -1), (INPUT, 2.0), (True, HIDDEN)])
def test_sizes_must_be_positive_integers(name, sizes):
    with pytest.raises(ConfigError):
        BUILTIN_CELLS[name](*sizes)


def test_fused_kernel_only_for_the_exact_class():
    class MyGRU(GRUCell):
        pass

    assert RNNCell(INPUT, HIDDEN).fused_kernel() == "RNN_TANH"
    assert RNNCell(INPUT, HIDDEN, nonlinearity="relu").fused_kernel() == "RNN_RELU"
    assert LSTMCell(INPUT, HIDDEN).fused_kernel() == "LSTM"
    assert GRUCell(INPUT, HIDDEN).fused_kernel() == "GRU"
    assert PeepholeLSTMCell(INPUT, HIDDEN).fused_kernel() is None
    assert MyGRU(INPUT, HIDDEN).fused_kernel() is None


# -- registry names -----------------------------------------------------------------------------------
def test_builtin_cells_are_registered():
    cells = Registry(load_entry_points=False).cells
    for name, cls in BUILTIN_CELLS.items():
        assert cells[name].cls is cls
        assert cells[name].source == "builtin"
        assert cells[name].description  # first docstring line, shown by `rnnbench list`


@pytest.mark.parametrize("typo, suggestion", [("lstn", "lstm"), ("gruu", "gru"), ("peepole", "peephole")])
def test_unknown_cell_name_lists_known_cells_and_closest_match(typo, suggestion):
    with pytest.raises(UnknownNameError) as info:
        Registry(load_entry_points=False).cell(typo)
    message = str(info.value)
    assert f"did you mean {suggestion!r}" in message
    assert "known: gru, lstm, peephole, rnn" in message
    assert info.value.name == typo


def test_unknown_cell_name_without_close_match_has_no_suggestion():
    with pytest.raises(UnknownNameError) as info:
        Registry(load_entry_points=False).cell("transformer")
    assert "did you mean" not in str(info.value)
