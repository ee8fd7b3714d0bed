"""The IndRNN plugin: found through its entry point, correct step, and at home in any encoder."""

from __future__ import annotations

import pytest
import torch

from rnnbench.encoder import Encoder, parameter_counts
from rnnbench.errors import ConfigError
from rnnbench.plugins import DISABLE_ENV, Registry

# The plugin is optional to rnnbench: without it installed these tests have nothing to test.
rnnbench_indrnn = pytest.importorskip(
    "rnnbench_indrnn", reason="install the plugin first: pip install -e plugins/rnnbench-indrnn"
)
IndRNNCell = rnnbench_indrnn.IndRNNCell

INPUT, HIDDEN, STEPS, BATCH = 3, 4, 6, 3
LENGTHS = torch.tensor([STEPS - 2, STEPS, 1])
TOLERANCE = {"rtol": 1e-6, "atol": 1e-6}


def random_tensor(*shape, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=gen, dtype=torch.float64)


def reference_step(cell: IndRNNCell, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Li et al. (2018), eq. 2: h_t = act(W x_t + u ⊙ h_{t-1} + b), u clipped to ±recurrent_max."""
    u = cell.weight_hh
    if cell.recurrent_max is not None:
        u = torch.clamp(u, -cell.recurrent_max, cell.recurrent_max)
    pre = x @ cell.weight_ih.T + u * h + cell.bias_ih
    return torch.relu(pre) if cell.nonlinearity == "relu" else torch.tanh(pre)


# -- discovery ----------------------------------------------------------------------------------------
def test_registry_lists_indrnn_with_its_distribution(monkeypatch):
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    entry = Registry().cell("indrnn")
    assert entry.cls is IndRNNCell
    assert entry.source == f"rnnbench-indrnn {rnnbench_indrnn.__version__}" == "rnnbench-indrnn 0.1.0"
    assert entry.description.startswith("Independently recurrent neural network")


def test_disabling_plugins_hides_indrnn(monkeypatch):
    monkeypatch.setenv(DISABLE_ENV, "1")
    assert "indrnn" not in Registry().cells


def test_encoder_builds_it_by_name():
    encoder = Encoder("indrnn", INPUT, HIDDEN, nonlinearity="tanh", recurrent_max=0.5)
    assert isinstance(encoder.cells[0], IndRNNCell)
    assert encoder.cells[0].nonlinearity == "tanh" and encoder.cells[0].recurrent_max == 0.5


# -- the step -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("nonlinearity", ["relu", "tanh"])
@pytest.mark.parametrize("recurrent_max", [1.0, 0.3, None])
def test_step_matches_the_paper_equation(nonlinearity, recurrent_max):
    cell = IndRNNCell(INPUT, HIDDEN, nonlinearity=nonlinearity, recurrent_max=recurrent_max).double()
    with torch.no_grad():
        cell.weight_hh.copy_(random_tensor(HIDDEN, seed=1))  # some entries beyond the bound
    x, h = random_tensor(BATCH, INPUT, seed=2), random_tensor(BATCH, HIDDEN, seed=3)
    out, state = cell(x, h)
    torch.testing.assert_close(out, reference_step(cell, x, h), **TOLERANCE)
    assert state is out
    # The hoisted path the encoder uses computes the same step.
    torch.testing.assert_close(cell.forward_projected(cell.project_input(x), h)[0], out, rtol=0, atol=1e-12)


def test_recurrence_is_elementwise():
    """Unit j's next state depends on h_j only: the defining property of IndRNN."""
    cell = IndRNNCell(INPUT, HIDDEN, nonlinearity="tanh").double()
    x = random_tensor(1, INPUT, seed=2)
    h = random_tensor(1, HIDDEN, seed=3).requires_grad_()
    jacobian = torch.autograd.functional.jacobian(lambda state: cell(x, state)[0], h).squeeze(0).squeeze(1)
    assert torch.count_nonzero(jacobian - torch.diag(torch.diagonal(jacobian))) == 0


def test_recurrent_weight_is_clipped_and_clipped_entries_get_no_gradient():
    cell = IndRNNCell(INPUT, HIDDEN, recurrent_max=0.5).double()
    with torch.no_grad():
        cell.weight_hh.copy_(torch.tensor([2.0, -3.0, 0.25, -0.1], dtype=torch.float64))
    torch.testing.assert_close(
        cell.recurrent_weight(), torch.tensor([0.5, -0.5, 0.25, -0.1], dtype=torch.float64)
    )
    h = torch.ones(BATCH, HIDDEN, dtype=torch.float64)
    # A large bias keeps every relu unit active, so only the clip can zero a gradient.
    with torch.no_grad():
        cell.bias_ih.fill_(10.0)
    cell(torch.zeros(BATCH, INPUT, dtype=torch.float64), h)[0].sum().backward()
    assert cell.weight_hh.grad[:2].abs().max() == 0
    assert torch.all(cell.weight_hh.grad[2:] != 0)


@pytest.mark.parametrize("recurrent_max", [1.0, 0.2, None])
def test_recurrent_weight_starts_within_zero_and_the_bound(recurrent_max):
    torch.manual_seed(0)
    u = IndRNNCell(INPUT, 64, recurrent_max=recurrent_max).weight_hh
    assert u.min() >= 0 and u.max() <= (recurrent_max or 1.0)


# -- hyperparameters ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "hparams",
    [
        {"nonlinearity": "sigmoid"},
        {"recurrent_max": 0},
        {"recurrent_max": -1.0},
        {"recurrent_max": float("inf")},
        {"recurrent_max": True},
        {"recurent_max": 1.0},
    ],
    ids=["nonlinearity", "zero-max", "negative-max", "infinite-max", "bool-max", "misspelt"],
)
def test_bad_hyperparameters_are_config_errors(hparams):
    with pytest.raises(ConfigError):
        IndRNNCell(INPUT, HIDDEN, **hparams)


def test_sizes_are_validated_by_the_base_class():
    with pytest.raises(ConfigError):
        IndRNNCell(INPUT, 0)


# -- in an encoder ----------------------------------------------------------------------------------------
@pytest.fixture
def encoder():
    torch.manual_seed(0)
    return Encoder(IndRNNCell, INPUT, HIDDEN, num_layers=2, bidirectional=True).double()


def test_runs_on_the_generic_path_with_a_hoisted_projection(encoder):
    assert encoder.fused_mode is None
    assert encoder._hoists  # the input matmul leaves the time loop


def test_two_layer_bidirectional_padded_output(encoder):
    out, finals = encoder(random_tensor(BATCH, STEPS, INPUT, seed=4), LENGTHS)
    assert out.shape == (BATCH, STEPS, 2 * HIDDEN)
    assert len(finals) == 4 and all(f.shape == (BATCH, HIDDEN) for f in finals)
    padded = torch.arange(STEPS) >= LENGTHS.unsqueeze(1)
    assert torch.all(out[padded] == 0)
    # Forward direction's final state is its output at each sequence's last real step.
    last = LENGTHS - 1
    torch.testing.assert_close(finals[2], out[torch.arange(BATCH), last, :HIDDEN], rtol=0, atol=0)
    # Backward direction's final state is its output at position 0.
    torch.testing.assert_close(finals[3], out[:, 0, HIDDEN:], rtol=0, atol=0)


def test_padding_does_not_change_real_outputs(encoder):
    x = random_tensor(BATCH, STEPS, INPUT, seed=4)
    out, finals = encoder(x, LENGTHS)
    garbage = random_tensor(BATCH, STEPS + 2, INPUT, seed=5, scale=50.0)
    real = (torch.arange(STEPS + 2) < LENGTHS.unsqueeze(1)).unsqueeze(-1)
    x_long = torch.where(real, torch.cat([x, torch.zeros(BATCH, 2, INPUT, dtype=x.dtype)], dim=1), garbage)
    out_long, finals_long = encoder(x_long, LENGTHS)
    torch.testing.assert_close(out_long[:, :STEPS], out, **TOLERANCE)
    assert torch.all(out_long[:, STEPS:] == 0)
    for short, long in zip(finals, finals_long):
        torch.testing.assert_close(long, short, **TOLERANCE)


def test_gradients_reach_every_parameter_and_only_real_inputs(encoder):
    x = random_tensor(BATCH, STEPS, INPUT, seed=4).requires_grad_()
    out, finals = encoder(x, LENGTHS)
    (out.square().sum() + sum(f.sum() for f in finals)).backward()
    for name, p in encoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    real = torch.arange(STEPS) < LENGTHS.unsqueeze(1)
    assert torch.all(x.grad[~real] == 0)
    assert x.grad[real].abs().sum() > 0


def test_single_layer_matches_a_hand_written_loop():
    torch.manual_seed(0)
    encoder = Encoder(IndRNNCell, INPUT, HIDDEN, nonlinearity="tanh").double()
    cell, x = encoder.cells[0], random_tensor(BATCH, STEPS, INPUT, seed=6)
    h, expected = torch.zeros(BATCH, HIDDEN, dtype=torch.float64), []
    for t in range(STEPS):
        h = reference_step(cell, x[:, t], h)
        expected.append(h)
    out, (final,) = encoder(x)
    torch.testing.assert_close(out, torch.stack(expected, dim=1), **TOLERANCE)
    torch.testing.assert_close(final, h, **TOLERANCE)


def test_parameter_counts_split_input_and_recurrent():
    counts = parameter_counts(Encoder(IndRNNCell, INPUT, HIDDEN, num_layers=2, bidirectional=True))
    # Per direction: W (H x in) and b on the input side, u (H) on the recurrent side.
    assert counts["per_layer"][0] == {
        "layer": 0,
        "input": 2 * HIDDEN * (INPUT + 1),
        "recurrent": 2 * HIDDEN,
        "total": 2 * HIDDEN * (INPUT + 2),
    }
    assert counts["per_layer"][1]["input"] == 2 * HIDDEN * (2 * HIDDEN + 1)
    assert counts["total"] == 2 * HIDDEN * (INPUT + 2) + 2 * HIDDEN * (2 * HIDDEN + 2)
