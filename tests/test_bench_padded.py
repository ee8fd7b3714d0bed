"""``rnnbench bench --padded``: a task's lengths against full-length batches; bad input is one line."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from rnnbench.cli import app
from tests.helpers import run_cli

TINY = "--batch 8 --input-size 4 --hidden 4 --repeat 2 --warmup 0 --batches 3 --threads 1".split()


def test_padded_mode_times_every_cell_padded_full_and_packed():
    result = CliRunner().invoke(app, ["bench", "--padded", "sentiment:synthetic", "--json", *TINY])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["mode"] == "padded" and len(out["load_average"]) == 3
    lengths = out["lengths"]
    assert (lengths["task"], lengths["dataset"], lengths["batches"]) == ("sentiment", "synthetic", 3)
    assert lengths["tokens"]["padded"] == lengths["tokens"]["packed"] > 0
    assert 0 <= lengths["padding"] < 1
    rows = {row["name"]: row for row in out["cells"]}
    assert {"rnn", "lstm", "peephole", "gru"} <= set(rows)
    for name, row in rows.items():
        assert "error" not in row, row
        fused = name in ("rnn", "lstm", "gru")
        assert set(row["tokens_per_s"]) == ({"padded", "full", "packed"} if fused else {"padded", "full"})
        assert all(len(seconds) == 2 for seconds in row["samples_s"].values())
        assert row["ratio_to_full"]["padded"]["median"] > 0
    assert rows["lstm"]["path"] == "fused LSTM, segments" and rows["gru"]["path"] == "fused GRU, segments"
    assert rows["peephole"]["path"] == "generic"


def test_padded_table_names_the_lengths_and_the_load():
    result = CliRunner().invoke(app, ["bench", "--padded", "sentiment:synthetic", "--cells", "lstm", *TINY])
    assert result.exit_code == 0, result.output
    assert "synthetic lengths (sentiment)" in result.stdout and "Load average" in result.stdout
    row = next(line for line in result.stdout.splitlines() if "lstm" in line and "segments" in line)
    assert "padded" not in row  # a data row, not the header


def test_a_task_without_lengths_is_one_line_and_exit_2_in_a_child_process(tmp_path):
    done = run_cli(["bench", "--padded", "charlm", *TINY], tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "task 'charlm' gives full-length batches" in lines[0], done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--padded", "forecast"], "task 'forecast' gives full-length batches"),
        (["--padded", "sst3"], "did you mean 'sst2'"),
        (["--padded", "sentiment:tinyshakespeare"], "unknown dataset of task 'sentiment'"),
        (["--padded", "sentiment", "--batch", "4000", "--hidden", "400000"], "does not fit in memory"),
        (["--cells", "rnn", "--batch", "100000", "--seq-len", "100000"], "does not fit in memory"),
        (["--padded", "sentiment", "--check"], "--check and --padded"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, expected):
    result = CliRunner().invoke(app, ["bench", *args, "--repeat", "1"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.output
