"""``rnnbench bench --check`` in its CPU form: every part of the GPU check that means something on a
CPU runs here (the CUDA-only parts, cuDNN's flat buffer and the sync guard, need a GPU machine)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rnnbench import gpu_check
from rnnbench.cli import app
from rnnbench.data.batching import prefetch, to_device
from rnnbench.task import Batch

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer of a machine without CUDA")


@no_cuda
def test_check_without_cuda_says_so_in_one_line_and_exits_0():
    result = CliRunner().invoke(app, ["bench", "--check"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "nothing to check" in lines[0] and "CUDA" in lines[0]


@no_cuda
def test_the_script_form_says_the_same():
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("\n") == 1 and "nothing to check" in run.stdout


def test_fused_kernels_equal_the_step_equations():
    lines = gpu_check.check_fused(CPU)
    assert len(lines) == len(gpu_check.FUSED_CELLS)


def test_sequence_backward_passes_gradcheck():
    assert len(gpu_check.check_generic(CPU)) == len(gpu_check.SEQUENCE_CELLS)


def test_training_steps_on_every_path_with_prefetched_padded_batches():
    lines = gpu_check.training_steps(CPU, "fp32", forbid_sync=False)
    assert [line.split()[2] for line in lines] == ["lstm", "peephole", "gru"]


def test_tiny_sweep_completes_every_trial(tmp_path, monkeypatch):
    monkeypatch.setenv("RNNBENCH_HOME", str(tmp_path))
    lines = gpu_check.tiny_sweep(CPU, "fp32")  # bf16 on a GPU; the trainer refuses it on CPU
    assert len(lines) == 2 and all("1 trial complete" in line for line in lines)


def test_off_cuda_prefetch_and_transfers_cost_nothing():
    items = iter([1, 2, 3])
    assert prefetch(items, CPU) is items  # no wrapper, no extra frame per batch
    tensor = torch.arange(4)
    assert to_device(tensor, "cpu") is tensor


def test_prefetch_finds_every_tensor_of_a_batch():
    """What the compute stream is told about on CUDA (the CUDA ones among these): every field and extra."""
    from rnnbench.data.batching import tensors_in

    inputs, targets, lengths, shapes, index = (torch.zeros(i + 1) for i in range(5))
    batch = Batch(inputs, targets, lengths, 3, {"shapes": shapes, "nested": [(index,)], "flag": True})
    assert {id(t) for t in tensors_in((batch, False))} == {
        id(t) for t in (inputs, targets, lengths, shapes, index)
    }
