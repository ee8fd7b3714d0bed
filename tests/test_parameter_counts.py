"""Parameter counts: equal to PyTorch's modules, to a closed form, and internally consistent."""

from __future__ import annotations

import pytest
from torch import nn

from rnnbench.encoder import Encoder, parameter_counts

GATES = {"rnn": 1, "gru": 3, "lstm": 4, "peephole": 4}
TORCH_MODULE = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}
SIZES = [(1, 1), (3, 4), (7, 5), (16, 32)]


def closed_form(cell: str, input_size: int, hidden: int, layers: int, bidirectional: bool) -> list[int]:
    """Per-layer totals: gates*(H*(I+H) + 2H) per direction; later layers read D*H inputs."""
    directions = 2 if bidirectional else 1
    per_layer = []
    for layer in range(layers):
        layer_input = input_size if layer == 0 else hidden * directions
        one_direction = GATES[cell] * (hidden * (layer_input + hidden) + 2 * hidden)
        if cell == "peephole":
            one_direction += 3 * hidden  # diagonal w_ci, w_cf, w_co
        per_layer.append(directions * one_direction)
    return per_layer


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("input_size, hidden", SIZES)
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_totals_equal_pytorch_modules(cell, input_size, hidden, layers, bidirectional):
    module = TORCH_MODULE[cell](input_size, hidden, layers, bidirectional=bidirectional)
    expected = sum(p.numel() for p in module.parameters())
    counts = parameter_counts(Encoder(cell, input_size, hidden, layers, bidirectional))
    assert counts["total"] == expected


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("input_size, hidden", SIZES)
@pytest.mark.parametrize("cell", list(GATES))
def test_counts_match_closed_form_and_add_up(cell, input_size, hidden, layers, bidirectional):
    encoder = Encoder(cell, input_size, hidden, layers, bidirectional)
    counts = parameter_counts(encoder)
    directions = 2 if bidirectional else 1

    assert [row["total"] for row in counts["per_layer"]] == closed_form(
        cell, input_size, hidden, layers, bidirectional
    )
    assert [row["layer"] for row in counts["per_layer"]] == list(range(layers))
    assert counts["total"] == sum(p.numel() for p in encoder.parameters())
    assert counts["total"] == counts["input"] + counts["recurrent"]
    for key in ("total", "input", "recurrent"):
        assert counts[key] == sum(row[key] for row in counts["per_layer"])
    for layer, row in enumerate(counts["per_layer"]):
        assert row["total"] == row["input"] + row["recurrent"]
        # Input side: W_ih and b_ih; recurrent side: W_hh, b_hh (and the peepholes).
        layer_input = input_size if layer == 0 else hidden * directions
        gates = GATES[cell]
        assert row["input"] == directions * gates * hidden * (layer_input + 1)
        peepholes = 3 * hidden if cell == "peephole" else 0
        assert row["recurrent"] == directions * (gates * hidden * (hidden + 1) + peepholes)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("layers", [1, 3])
def test_peephole_is_lstm_plus_three_vectors_per_layer_and_direction(layers, bidirectional):
    hidden, directions = 6, 2 if bidirectional else 1
    lstm = parameter_counts(Encoder("lstm", 5, hidden, layers, bidirectional))
    peephole = parameter_counts(Encoder("peephole", 5, hidden, layers, bidirectional))
    assert peephole["total"] == lstm["total"] + 3 * hidden * layers * directions
    assert peephole["input"] == lstm["input"]
    assert peephole["recurrent"] == lstm["recurrent"] + 3 * hidden * layers * directions


def test_counts_do_not_depend_on_the_path():
    fused = parameter_counts(Encoder("lstm", 3, 4, 2, True))
    generic = parameter_counts(Encoder("lstm", 3, 4, 2, True, fused=False))
    assert fused == generic
