"""Experiment files: every mistake is one line, exit 2, no traceback, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rnnbench.errors import ConfigError
from rnnbench.experiment import expand, parse
from rnnbench.tasks.memory import Memory, MemoryOptions

VALID = """\
name: ok
cells:
  - lstm
  - name: gru
    layers: [1, 2]
    bidirectional: [false, true]
tasks:
  - name: memory
    options: {seq_len: 10}
  - name: forecast
search:
  hidden_size: {type: int, low: 8, high: 16, log: true}
  lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
budget: {trials: 2, epochs: 1}
final: {seeds: 1}
skip_invalid: true
"""

# (broken text, a fragment the message must contain)
BROKEN = [
    ("name: x\ncells: [lstm]\ntasks: [memory]\nbudjet: {trials: 2}\n", "did you mean 'budget'"),
    ("name: x\ncells: [lstn]\ntasks: [memory]\n", "did you mean 'lstm'"),
    ("name: x\ncells: [lstm]\ntasks: [memroy]\n", "did you mean 'memory'"),
    ("name: x\ncells: [lstm]\ntasks: [{name: forecast, dataset: etth3}]\n", "did you mean 'etth"),
    ("name: x\ncells: [lstm]\ntasks: [{name: memory, options: {seq_lne: 5}}]\n", "seq_lne"),
    (
        "name: x\ncells: [lstm]\ntasks: [memory]\nsearch: {hiden_size: {type: int, low: 1, high: 2}}\n",
        "did you mean 'hidden_size'",
    ),
    (
        "name: x\ncells: [lstm]\ntasks: [memory]\nsearch: {lr: {type: float, low: 1.0, high: 0.1}}\n",
        "must be <=",
    ),
    (
        "name: x\ncells: [lstm]\ntasks: [memory]\nsearch: {lr: {type: float, low: 0.0, high: 0.1, log: true}}\n",
        "log-scaled",
    ),
    ("name: x\ncells: [lstm]\ntasks: [memory]\nsearch: {lr: {type: normal, low: 0, high: 1}}\n", "search.lr"),
    ("name: x\ncells: [lstm]\ntasks: [memory]\nbudget: {trials: -1}\n", "budget.trials"),
    ("name: x\ncells: [{name: lstm, layers: [0]}]\ntasks: [memory]\n", "cells[0].layers"),
    ("name: x\ncells: [{name: gru, bidirectional: [true]}]\ntasks: [memory]\n", "causal"),
    ("name: x\ncells: []\ntasks: [memory]\n", "cells"),
    ("cells: [lstm]\ntasks: [memory]\n", "name"),
    ("name: x\ncells: [lstm]\ntasks: [memory]\nsampler: {name: cmaes}\n", "sampler.name"),
    ("name: x\ncells: [lstm]\ntasks: [memory, {name: memory, options: {seq_len: 9}}]\n", "distinct `label:`"),
    ("name: x\ncells: [{name: lstm, label: 'a b'}]\ntasks: [memory]\n", "cells[0].label"),
    (
        "name: x\ncells: [lstm]\ntasks: [memory]\nsearch: {lr: {type: float, low: 0.1, high: 1}}\nsampler: {name: grid}\n",
        "grid",
    ),
    ("name: x\ncells: [{name: lstm, hparams: {nonlinearity: relu}}]\ntasks: [memory]\n", "nonlinearity"),
    (
        "name: x\ncells: [lstm]\ntasks: [memory]\nparameter_budget: 1000\nfixed: {hidden_size: 8}\n",
        "parameter_budget",
    ),
    ("name: x\ncells: [lstm]\ntasks: [{name: memory, margin: -0.01}]\n", "margin must be a positive"),
    ("name: x\ncells: [lstm]\ntasks: [{name: memory, margin: '0%'}]\n", "margin must be a positive"),
    ("name: x\ncells: [lstm]\ntasks: [{name: memory, margin: wide}]\n", "margin must be a positive"),
    ("name: x\ncells: [lstm\ntasks: [memory]\n", "not valid YAML"),
    ("- just\n- a list\n", "mapping"),
    ("name: 'bad name!'\ncells: [lstm]\ntasks: [memory]\n", "name"),
]


def test_valid_experiment_expands_to_studies():
    exp = parse(VALID)
    studies, skipped = expand(exp)
    names = [s.name for s in studies]
    # memory is causal: the two bidirectional gru variants are skipped there, kept for forecast
    assert len(names) == 3 + 5 and len(skipped) == 2
    assert "ok/memory-synthetic/gru-2L-uni" in names and "ok/forecast-synthetic/gru-2L-bi" in names
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("text,fragment", BROKEN)
def test_broken_experiment_is_one_clear_error(text, fragment):
    with pytest.raises(ConfigError) as info:
        parse(text, "exp.yaml")
    message = str(info.value)
    assert fragment in message and "\n" not in message and message.startswith("exp.yaml")


def test_error_names_the_yaml_line():
    with pytest.raises(ConfigError, match=r"line 4"):
        parse("name: x\ncells: [lstm]\ntasks: [memory]\nbudjet: {trials: 2}\n", "exp.yaml")


def test_cli_broken_files_exit_2_one_line_nothing_on_disk(tmp_path: Path):
    """Through the real command: exit 2, one stderr line, no traceback, no run home created."""
    env = {**os.environ, "RNNBENCH_HOME": str(tmp_path / "home")}
    script = (
        "import sys, subprocess\n"
        "from click.testing import CliRunner\n"
        "from rnnbench.cli import app\n"
        "runner = CliRunner()\n"
        "for path in sys.argv[1:]:\n"
        "    r = runner.invoke(app, ['run', path])\n"
        "    print(r.exit_code, repr(r.stderr.strip()))\n"
    )
    files = []
    for i, (text, _) in enumerate(BROKEN):
        f = tmp_path / f"broken{i}.yaml"
        f.write_text(text)
        files.append(str(f))
    files.append(str(tmp_path / "missing.yaml"))
    out = subprocess.run(
        [sys.executable, "-c", script, *files], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == len(files) >= 15
    for line in lines:
        code, message = line.split(" ", 1)
        assert code == "2", line
        assert "Traceback" not in message and "\\n" not in message and message[1:].startswith("error: ")
    assert not (tmp_path / "home").exists() and not (tmp_path / "runs").exists()


def test_labels_tell_repeated_entries_apart():
    text = VALID.replace(
        "  - name: forecast\n", "  - name: memory\n    label: memory-T30\n    options: {seq_len: 30}\n"
    )
    text = text.replace(
        "  - lstm\n", "  - lstm\n  - {name: lstm, label: lstm-fb0, hparams: {forget_bias: 0.0}}\n"
    )
    studies, _ = expand(parse(text))
    names = [s.name for s in studies]
    assert len(names) == len(set(names))
    assert "ok/memory-T30/lstm-fb0-1L-uni" in names and "ok/memory-synthetic/lstm-1L-uni" in names


def test_a_task_can_run_only_some_of_the_cells_architectures():
    text = VALID.replace("  - name: forecast\n", "  - name: forecast\n    architectures: [gru-2L-bi, lstm-1L-uni]\n")
    studies, _ = expand(parse(text))
    forecast = sorted(s.name for s in studies if "/forecast-" in s.name)
    assert forecast == ["ok/forecast-synthetic/gru-2L-bi", "ok/forecast-synthetic/lstm-1L-uni"]
    assert sum("/memory-" in s.name for s in studies) == 3  # the other task keeps every architecture


def test_an_architecture_the_cells_do_not_give_is_one_clear_error():
    text = VALID.replace("  - name: forecast\n", "  - name: forecast\n    architectures: [gru-3L-uni]\n")
    with pytest.raises(ConfigError, match=r"architectures \['gru-3L-uni'\] are not among the cells'") as info:
        expand(parse(text))
    assert "gru-2L-bi" in str(info.value) and "\n" not in str(info.value)


# -- one causality check: the task's own check_architecture, at parse time as at run time ---------
class BackwardShyOptions(MemoryOptions):
    backward_ok: bool = False


class BackwardShy(Memory):
    """A plugin-style task: not declared causal, but refusing bidirectional encoders by option."""

    name = "backward-shy"
    causal = False
    Options = BackwardShyOptions

    def check_architecture(self, *, bidirectional: bool) -> None:
        if bidirectional and not self.options.backward_ok:
            raise ConfigError("task 'backward-shy' refuses bidirectional encoders unless backward_ok")


SHY = """\
name: shy
cells: [{name: gru, bidirectional: [false, true]}]
tasks: [{name: backward-shy, options: {seq_len: 10%s}}]
"""


@pytest.fixture
def backward_shy(monkeypatch):
    from rnnbench.plugins import Registered, registry

    monkeypatch.setitem(registry().tasks, "backward-shy", Registered("backward-shy", BackwardShy, "tests"))


def test_a_refusal_in_check_architecture_is_known_at_parse_time(backward_shy):
    assert not BackwardShy.causal  # the class attribute alone would let the combination through
    with pytest.raises(ConfigError, match="refuses bidirectional encoders unless backward_ok") as info:
        parse(SHY % "", "exp.yaml")
    assert "shy/backward-shy-synthetic/gru-1L-bi" in str(info.value) and "skip_invalid" in str(info.value)

    studies, skipped = expand(parse(SHY % "" + "skip_invalid: true\n"))
    assert [s.name for s in studies] == ["shy/backward-shy-synthetic/gru-1L-uni"]
    assert skipped == [
        (
            "shy/backward-shy-synthetic/gru-1L-bi",
            "task 'backward-shy' refuses bidirectional encoders unless backward_ok",
        )
    ]
    # The check runs on an instance with the entry's options, as the trainer's does.
    studies, skipped = expand(parse(SHY % ", backward_ok: true"))
    assert len(studies) == 2 and skipped == []
    for study in studies:  # what parse time keeps, run time accepts
        study.make_task().check_architecture(bidirectional=study.arch.bidirectional)


def test_builtin_causal_tasks_give_their_own_reason_at_parse_time():
    _, skipped = expand(parse(VALID))
    with pytest.raises(ConfigError) as refusal:
        Memory(seq_len=10).check_architecture(bidirectional=True)
    assert [reason for _, reason in skipped] == [str(refusal.value)] * 2


def test_skipped_studies_are_one_line_per_reason():
    from rnnbench.plan import skipped_lines

    _, skipped = expand(parse(VALID))
    lines = skipped_lines(skipped + [("x/other/rnn-1L-bi", "another reason")])
    assert len(lines) == 2
    names = [name for name, _ in skipped]
    assert lines[0] == f"skipped 2 studies ({', '.join(names)}): {skipped[0][1]}"
    assert lines[1] == "skipped x/other/rnn-1L-bi: another reason"
