"""``rnnbench bench``: a row per registered cell, measured times, ratios computed from the rounds."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rnnbench.cli import app
from rnnbench.plugins import registry

TINY = "--batch 2 --seq-len 5 --input-size 8 --hidden 8 --repeat 3 --warmup 1".split()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_result() -> dict:
    result = CliRunner().invoke(app, ["bench", "--json", "--threads", "1", *TINY])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_json_has_a_measured_row_for_every_registered_cell(tiny_result):
    names = [row["name"] for row in tiny_result["cells"]]
    assert names == list(registry().cells)
    if importlib.util.find_spec("rnnbench_indrnn") is not None:
        assert "indrnn" in names  # the example plugin is benchmarked like a builtin
    for row in tiny_result["references"] + tiny_result["cells"]:
        assert "error" not in row, row
        for key in ("forward_ms", "train_ms"):
            stats = row[key]
            assert 0 < stats["q1"] <= stats["median"] <= stats["q3"]
            assert len(row["samples_ms"][key.split("_")[0]]) == 3
        assert row["train_tokens_per_s"] == pytest.approx(2 * 5 / (row["train_ms"]["median"] / 1e3))
        assert row["memory_mb"] > 0
        assert row["parameters"] > 0


def test_each_cell_is_compared_with_lstm_and_its_own_reference(tiny_result):
    own = {row["name"]: row["reference"] for row in tiny_result["cells"]}
    assert own["lstm"] == own["peephole"] == "nn.LSTM"
    assert (own["gru"], own["rnn"]) == ("nn.GRU", "nn.RNN")
    assert {row["name"] for row in tiny_result["references"]} == {"nn.LSTM", "nn.GRU", "nn.RNN"}
    paths = {row["name"]: row["path"] for row in tiny_result["cells"]}
    assert paths["lstm"] == "fused LSTM" and paths["peephole"] == "generic"
    if "indrnn" in own:
        assert own["indrnn"] == "nn.LSTM" and paths["indrnn"] == "generic"


def test_ratios_are_medians_of_the_paired_rounds(tiny_result):
    references = {row["name"]: row for row in tiny_result["references"]}
    for row in tiny_result["cells"]:
        for ref_name in ("nn.LSTM", row["reference"]):
            ref = references[ref_name]
            for key in ("forward", "train"):
                paired = np.array(row["samples_ms"][key]) / np.array(ref["samples_ms"][key])
                assert row["ratios"][ref_name][key]["median"] == pytest.approx(float(np.median(paired)))
    machine = tiny_result["machine"]
    assert machine["device"] == "cpu" and machine["threads"] == 1 and machine["torch"] and machine["cpu"]


def test_table_output_names_the_cell_and_its_reference_uncut_when_piped():
    # stdout is not a terminal here, as in `rnnbench bench | tee log`: no cell is cut to "…"
    result = CliRunner().invoke(app, ["bench", "--cells", "rnn,peephole", "--threads", "1", *TINY])
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout
    rows = [line for line in result.stdout.splitlines() if "peephole" in line]
    assert rows and "generic" in rows[0] and "nn.LSTM" in rows[0]  # the whole row on one line
    assert "rnn" in result.stdout and "nn.RNN" in result.stdout and "fused RNN_TANH" in result.stdout


def test_unknown_cell_is_a_one_line_error():
    result = CliRunner().invoke(app, ["bench", "--cells", "lstm,lsmt", *TINY])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert "unknown cell 'lsmt'" in lines[0] and "did you mean 'lstm'" in lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["charlm", "sentiment"])
def test_overhead_script_runs_on_a_few_steps(tmp_path, task):
    """Both modes, the full-length one and the padded one, train the same thing on both sides."""
    env = {**os.environ, "RNNBENCH_OFFLINE": "1"}
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "overhead.py"),
        "--task",
        task,
        "--dataset",
        "synthetic",
    ]
    command += ["--blocks", "2", "--steps", "2", "--hidden", "16", "--threads", "1", "--home", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "ratio" in done.stdout and "tokens/s" in done.stdout
    assert done.stdout.startswith(task) and "DIFFERENT" not in done.stdout
