"""``train_memory_mib``: the model's own training memory, checked against a count by hand."""

from __future__ import annotations

import pytest
import torch

from rnnbench.tasks.forecast import ForecastTask
from rnnbench.trainer import Architecture, Trainer

FLOAT = 4  # bytes of a float32
BATCH, STEPS, HORIZON = 16, 20, 4


def expected_bytes(model: torch.nn.Module, hidden: int) -> int:
    """An Elman RNN (``rnn`` cell) forecasting one target from one input column, trained with Adam.

    Persistent: every parameter, its gradient and Adam's two moments (exp_avg, exp_avg_sq) are one
    float each; Adam also keeps a one-element ``step`` tensor per parameter tensor.
    Saved for backward, on one batch: backprop through h_t = tanh(W_ih x_t + W_hh h_{t-1} + b)
    needs every hidden state h_0 ... h_T (the matmul's input h_{t-1}, tanh's output h_t: T + 1
    tensors [B, H]); the head reads the last step of the stacked outputs [B, T, H], which keeps the
    whole stack alive; the input, laid out time-major for the recurrence [T, B, 1]; and the
    prediction [B, horizon, 1] the MSE loss saves. Parameters and the batch are not activations.
    """
    params = sum(p.numel() for p in model.parameters())
    persistent = 4 * params * FLOAT + len(list(model.parameters())) * FLOAT
    states = (STEPS + 1) * BATCH * hidden
    stacked_outputs = STEPS * BATCH * hidden
    time_major_input = STEPS * BATCH * 1
    prediction = BATCH * HORIZON * 1
    return persistent + (states + stacked_outputs + time_major_input + prediction) * FLOAT


@pytest.fixture(scope="module")
def measured() -> dict[int, tuple[float, int]]:
    """hidden size -> (train_memory_mib of a short CPU run, the expected bytes)."""
    out = {}
    for hidden in (8, 256):
        task = ForecastTask("synthetic", input_width=STEPS, label_width=HORIZON)
        trainer = Trainer({"epochs": 2, "steps_per_epoch": 2}, {"device": "cpu"})
        result = trainer.fit(task, Architecture("rnn"), {"hidden_size": hidden, "batch_size": BATCH})
        from rnnbench.encoder import Encoder

        model = task.build_model(lambda n, h=hidden: Encoder("rnn", n, h), {})
        assert sum(p.numel() for p in model.parameters()) == result.parameters["total"]
        assert all(r.metrics["train_memory_mib"] > 0 for r in result.history)
        out[hidden] = (result.summary["train_memory_mib_peak"], expected_bytes(model, hidden))
    return out


def test_train_memory_matches_a_count_by_hand(measured):
    for hidden, (mib, expected) in measured.items():
        assert mib * 2**20 == pytest.approx(expected, rel=0.02), hidden  # exact on torch 2.13


def test_train_memory_grows_with_the_model(measured):
    small, large = measured[8][0], measured[256][0]
    # 8 -> 256 hidden: parameters grow ~1000x, activations 32x; RSS would barely move
    assert large > 20 * small


def test_old_rss_metric_is_gone():
    task = ForecastTask("synthetic", input_width=4, label_width=1)
    result = Trainer({"epochs": 1, "steps_per_epoch": 1}, {"device": "cpu"}).fit(
        task, Architecture("gru"), {"hidden_size": 4, "batch_size": 4}
    )
    assert "peak_memory_mb" not in result.summary and "train_memory_mib_peak" in result.summary
