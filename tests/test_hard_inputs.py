"""Hostile and mistyped input: refused before anything is written, in one line, with exit code 2.

Domains of hyperparameters, devices, encodings, YAML alias bombs, huge values and strings are
checked by `rnnbench.experiment`; data errors by the pre-flight (before any store exists). The CLI
test at the end runs every bad input of this file through `rnnbench run` with a fresh run home.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from rnnbench.errors import ConfigError, DataError, clip_message, shorten
from rnnbench.experiment import load, parse

BASE = "name: x\ncells: [lstm]\ntasks: [memory]\n"


def alias_bomb(levels: int = 9, fanout: int = 9) -> str:
    """`levels` anchors, each a list of `fanout` aliases to the one before: fanout**levels values."""
    lines = [BASE + "fixed:", f"  x0: &a0 [{', '.join(['1'] * fanout)}]"]
    lines += [f"  x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * fanout)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


# (experiment text, a fragment the one-line message must contain)
REFUSED = {
    "dropout searched up to 1.5": (
        BASE + "search: {dropout: {type: float, low: 0.0, high: 1.5}}\n",
        "search.dropout: high got 1.5; expected a number in [0, 1)",
    ),
    "hidden_size searched from 0": (
        BASE + "search: {hidden_size: {type: int, low: 0, high: 8}}\n",
        "search.hidden_size: low got 0; expected an integer in [1, 8192]",
    ),
    "hidden_size up to 1e9": (
        BASE + "search: {hidden_size: {type: int, low: 8, high: 1000000000}}\n",
        "high got 1000000000; expected an integer in [1, 8192]",
    ),
    "hidden_size searched as float": (
        BASE + "search: {hidden_size: {type: float, low: 8, high: 16}}\n",
        "search it with type: int",
    ),
    "optimizer not a choice": (BASE + "fixed: {optimizer: adagrad}\n", "expected one of 'adam'"),
    "optimizer searched as a range": (
        BASE + "search: {optimizer: {type: int, low: 1, high: 3}}\n",
        "search it with type: categorical",
    ),
    "batch size choice 0": (
        BASE + "search: {batch_size: {type: categorical, choices: [32, 0]}}\n",
        "batch_size: choice got 0",
    ),
    "lr written as 1e-3 (YAML text)": (BASE + "fixed: {lr: 1e-3}\n", "write 1.0e-3"),
    "nan clip_norm": (BASE + "fixed: {clip_norm: .nan}\n", "fixed.clip_norm: got nan"),
    "cell hparam out of its domain": (
        "name: x\ncells: [{name: lstm, hparams: {forget_bias: 1000}}]\ntasks: [memory]\n",
        "cells[0].hparams.forget_bias: got 1000",
    ),
    "cell hparam searched out of its domain": (
        "name: x\ncells: [rnn]\ntasks: [memory]\nsearch: {nonlinearity: {type: categorical, choices: [tanh, gelu]}}\n",
        "choice got 'gelu'; expected one of 'tanh', 'relu' (as cell 'rnn' declares)",
    ),
    "task hparam out of its domain": (
        "name: x\ncells: [lstm]\ntasks: [{name: charlm, hparams: {embedding_dim: 0}}]\n",
        "tasks[0].hparams.embedding_dim: got 0",
    ),
    "unknown device": (
        BASE + "device: tpu\n",
        "unknown device 'tpu'; expected auto, cpu, cuda, cuda:N or mps",
    ),
    "seeds 1e12": (BASE + "final: {seeds: 1000000000000}\n", "final.seeds"),
    "trials 1e9": (BASE + "budget: {trials: 1000000000}\n", "budget.trials"),
    "epochs 1e9": (BASE + "budget: {epochs: 1000000000}\n", "budget.epochs"),
    "infinite minutes": (BASE + "budget: {max_minutes_per_trial: .inf}\n", "finite"),
    "memory seq_len 1e12": (
        "name: x\ncells: [lstm]\ntasks: [{name: memory, options: {seq_len: 1000000000000}}]\n",
        "seq_len",
    ),
    "memory data too large": (
        "name: x\ncells: [lstm]\ntasks: [{name: memory, options: {seq_len: 50000}}]\n",
        "at most 50,000,000 are generated",
    ),
    "sample_prime of 2,000 characters": (
        "name: x\ncells: [lstm]\ntasks: [{name: charlm, options: {sample_prime: '" + "y" * 2000 + "'}}]\n",
        "sample_prime",
    ),
    "a 5,000-character string": (
        "name: x\ncells: [lstm]\ntasks: [{name: charlm, options: {sample_prime: '" + "y" * 5000 + "'}}]\n",
        "tasks[0].options.sample_prime: a value of 5,000 characters; at most 4,096",
    ),
    "YAML alias bomb": (alias_bomb(), "expands to more than 10,000 values through YAML aliases"),
    "recursive alias": (BASE + "fixed: &a {x: *a}\n", "refers to its own parent"),
    "a duplicate key (two budget: blocks)": (
        BASE + "budget: {trials: 1}\nfinal: {seeds: 0}\nbudget: {trials: 2}\n",
        "line 6: duplicate key 'budget' (first on line 4)",
    ),
    "a duplicate nested key": (
        BASE + "budget:\n  trials: 1\n  epochs: 2\n  trials: 3\n",
        "line 7: duplicate key 'trials' (first on line 5)",
    ),
    "a duplicate key in a flow mapping": (
        BASE + "fixed: {lr: 0.1, dropout: 0.0, lr: 0.2}\n",
        "line 4: duplicate key 'lr' (first on line 4)",
    ),
    "a duplicate key spelt two ways": (
        BASE + "fixed:\n  lr: 0.1\n  'lr': 0.2\n",
        "line 6: duplicate key 'lr' (first on line 5)",
    ),
    "a python object tag": (
        BASE + "fixed: !!python/object/apply:os.system ['touch PWNED']\n",
        "line 4: not valid YAML: could not determine a constructor",
    ),
    "task label '..'": (
        "name: x\ncells: [lstm]\ntasks: [{name: memory, label: '..'}]\n",
        "tasks[0].label: a label of dots only",
    ),
    "cell label '.'": (
        "name: x\ncells: [{name: lstm, label: '.'}]\ntasks: [memory]\n",
        "cells[0].label: a label of dots only",
    ),
    "int step 0": (
        BASE + "search: {hidden_size: {type: int, low: 4, high: 8, step: 0}}\n",
        "search.hidden_size.step: Input should be greater than or equal to 1",
    ),
    "int step below 0": (
        BASE + "search: {hidden_size: {type: int, low: 4, high: 8, step: -2}}\n",
        "search.hidden_size.step: Input should be greater than or equal to 1",
    ),
    "log with a step": (
        BASE + "search: {hidden_size: {type: int, low: 4, high: 64, log: true, step: 2}}\n",
        "a log-scaled range takes no step",
    ),
    "a list as a categorical choice": (
        BASE + "search: {hidden_size: {type: categorical, choices: [8, [16, 32]]}}\n",
        "choice [16, 32]: choices are numbers, text, true/false or null",
    ),
    "too many studies": (
        "name: x\ncells: [{name: gru, layers: [1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16], "
        "bidirectional: [false, true]}]\ntasks: [" + ", ".join(["forecast"] * 40) + "]\n",
        "studies; at most 1,000",
    ),
}


@pytest.mark.parametrize("text,fragment", REFUSED.values(), ids=REFUSED.keys())
def test_refused_before_anything_runs(text, fragment):
    with pytest.raises(ConfigError) as info:
        parse(text, "exp.yaml")
    message = str(info.value)
    assert fragment in message and "\n" not in message and message.startswith("exp.yaml")
    assert len(message) < 400


def test_alias_bomb_is_refused_in_milliseconds():
    import time

    started = time.perf_counter()
    with pytest.raises(ConfigError):
        parse(alias_bomb(levels=12, fanout=12), "bomb.yaml")  # 12^12 values if expanded
    assert time.perf_counter() - started < 1.0


def test_aliases_within_bounds_still_work():
    text = (
        BASE + "search:\n  lr: &r {type: float, low: 1.0e-3, high: 1.0e-2, log: true}\n  weight_decay: *r\n"
    )
    assert parse(text).search["weight_decay"].high == 0.01


def test_merge_keys_may_override_what_they_merge():
    text = (
        BASE
        + "search:\n  lr: &r {type: float, low: 1.0e-3, high: 1.0e-2}\n  weight_decay:\n    <<: *r\n    low: 0.0\n"
    )
    assert parse(text).search["weight_decay"].low == 0.0


def test_log_range_with_step_1_is_fine():
    text = BASE + "search: {hidden_size: {type: int, low: 4, high: 64, log: true, step: 1}}\n"
    assert parse(text).search["hidden_size"].log


@pytest.mark.parametrize("value", ["abc", "0", "-5", "inf", "nan", "1e9"])
def test_lease_seconds_must_be_a_sane_number(monkeypatch, value):
    from rnnbench.sweep import lease_duration

    monkeypatch.setenv("RNNBENCH_LEASE_SECONDS", value)
    with pytest.raises(
        ConfigError, match=r"RNNBENCH_LEASE_SECONDS=.*expected a number of seconds from 1 to 86400"
    ):
        lease_duration()
    monkeypatch.setenv("RNNBENCH_LEASE_SECONDS", "2.5")
    assert lease_duration() == 2.5


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1"])
def test_known_devices_pass_validation(device):
    assert parse(BASE + f"device: '{device}'\n").device == device


def test_domains_are_declared_for_every_builtin_hyperparameter():
    from rnnbench.hparams import TRAINER_HPARAM_DOMAINS, TRAINER_HPARAMS
    from rnnbench.plugins import registry

    assert set(TRAINER_HPARAM_DOMAINS) == set(TRAINER_HPARAMS)
    for name, domain in TRAINER_HPARAM_DOMAINS.items():
        assert domain.problem(TRAINER_HPARAMS[name]) is None, name  # the defaults are inside
    for entry in [*registry().cells.values(), *registry().tasks.values()]:
        if entry.source != "builtin":
            continue
        names = entry.cls.hparam_names() if hasattr(entry.cls, "hparam_names") else entry.cls.hparam_defaults
        assert set(entry.cls.hparam_domains) == set(names), entry.name


def test_non_utf8_file_names_the_line(tmp_path: Path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(BASE.encode() + "# caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"line 4: not UTF-8 text \(byte 0xe9 at offset \d+\)"):
        load(path)
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbf" + BASE.encode())  # a BOM is fine
    assert load(bom).name == "x"


def test_oversized_file_is_refused_without_parsing(tmp_path: Path):
    path = tmp_path / "huge.yaml"
    path.write_text(BASE + "fixed: {x: '" + "z" * (2 << 20) + "'}\n")
    with pytest.raises(ConfigError, match="at most 1 MiB"):
        load(path)


def test_echoed_values_are_cut_short():
    assert len(shorten("x" * 10_000_000)) < 120
    message = clip_message("no column " + repr("y" * 10_000_000) + " in file.csv")
    assert len(message) < 300 and message.endswith("in file.csv")
    err = DataError("file.csv has no text column " + repr("z" * 100_000))
    assert len(str(err)) < 300


# -- data, found by the pre-flight before any store exists ---------------------------------------
def forecast_csv(
    path: Path, *, nan_row: int | None = None, value_at: tuple[int, float] | None = None
) -> Path:
    values = [float(i % 24) for i in range(400)]
    if value_at is not None:
        values[value_at[0]] = value_at[1]
    frame = pd.DataFrame({"date": pd.date_range("2020-01-01", periods=400, freq="h"), "y": values})
    if nan_row is not None:
        frame.loc[nan_row, "y"] = float("nan")
    frame.to_csv(path, index=False)
    return path


def sentiment_csv(folder: Path, *, labels=("pos", "neg"), text_column: str = "text") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 40), ("test", 10)):
        rows = [{text_column: f"review {i} good" if i % 2 else f"review {i} bad", "label": labels[i % len(labels)]}
                for i in range(n)]  # fmt: skip
        pd.DataFrame(rows).to_csv(folder / f"{split}.csv", index=False)
    return folder


def tiny_experiment(task_yaml: str, name: str = "bad") -> str:
    return (
        f"name: {name}\ncells: [gru]\ntasks:\n{task_yaml}"
        "search: {hidden_size: {type: int, low: 4, high: 8}}\n"
        "budget: {trials: 1, epochs: 1, steps_per_epoch: 2}\nfinal: {seeds: 0}\npruner: {name: none}\n"
    )


def test_single_class_sentiment_data_is_refused(tmp_path: Path):
    from rnnbench.plugins import get_task

    task = get_task("sentiment")("csv", data_path=sentiment_csv(tmp_path / "one", labels=("pos",)))
    with pytest.raises(DataError, match="every training example has label 'pos'; a classifier needs two"):
        task.setup()


def test_report_tables_of_labels_with_dots_do_not_overwrite_each_other(tmp_path: Path):
    from rnnbench.report.collect import TaskInfo
    from rnnbench.report.tables import rank_task, write

    rows = []
    for label, value in (("mem.T10", 0.1), ("mem.T20", 0.2)):
        base = {"study": f"e/{label}/gru-1L-uni", "architecture": "gru-1L-uni", "cell": "gru",
                "variant": "1L-uni", "task": "memory", "benchmark": label}  # fmt: skip
        rows.append({**base, "stage": "study", "status": "complete", "best_valid": value})
        rows += [
            {**base, "stage": "final", "status": "complete", "seed": s, "test_mse": value} for s in (0, 1)
        ]
    runs = pd.DataFrame(rows)
    info = TaskInfo("memory", "mse", "minimize")
    written = write(
        [rank_task(runs, info, label) for label in ("mem.T10", "mem.T20")], pd.DataFrame(), tmp_path
    )
    assert {p.name for p in written["mem.T10"]} == {"mem.T10.csv", "mem.T10.md", "mem.T10.html"}
    assert pd.read_csv(tmp_path / "mem.T10.csv")["mean"].iloc[0] == pytest.approx(0.1)
    assert pd.read_csv(tmp_path / "mem.T20.csv")["mean"].iloc[0] == pytest.approx(0.2)


# -- every bad input through the real command ----------------------------------------------------
def cli_cases(tmp_path: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    """name -> (arguments of `rnnbench run`, extra environment)."""
    cases: dict[str, tuple[list[str], dict[str, str]]] = {}
    for i, (name, (text, _)) in enumerate(REFUSED.items()):
        path = tmp_path / f"refused{i}.yaml"
        path.write_text(text)
        cases[name] = ([str(path)], {})
    (tmp_path / "latin1.yaml").write_bytes(BASE.encode() + b"# caf\xe9\n")
    cases["not UTF-8"] = ([str(tmp_path / "latin1.yaml")], {})
    (tmp_path / "ok.yaml").write_text(BASE)
    cases["--device tpu"] = ([str(tmp_path / "ok.yaml"), "--device", "tpu"], {})
    cases["a CUDA device this machine lacks"] = ([str(tmp_path / "ok.yaml"), "--device", "cuda:99"], {})
    nan = forecast_csv(tmp_path / "nan.csv", nan_row=123)
    (tmp_path / "nan.yaml").write_text(
        tiny_experiment(
            f"  - {{name: forecast, dataset: csv, data_path: {nan}, options: {{target_columns: y, "
            "date_column: date, input_width: 8, label_width: 2}}\n"
        )  # fmt: skip
    )
    cases["NaN in a forecast CSV"] = ([str(tmp_path / "nan.yaml")], {})
    folder = sentiment_csv(tmp_path / "nolabel", text_column="review")
    (tmp_path / "nolabel.yaml").write_text(
        tiny_experiment(f"  - {{name: sentiment, dataset: csv, data_path: {folder}}}\n")
    )
    cases["missing text column"] = ([str(tmp_path / "nolabel.yaml")], {})
    long_column = "c" * 4000
    (tmp_path / "longcol.yaml").write_text(
        tiny_experiment(
            f"  - {{name: sentiment, dataset: csv, data_path: {folder}, options: {{text_column: {long_column}}}}}\n"
        )
    )
    cases["4,000-character text_column echoed"] = ([str(tmp_path / "longcol.yaml")], {})
    single = sentiment_csv(tmp_path / "single", labels=("pos",))
    (tmp_path / "single.yaml").write_text(
        tiny_experiment(f"  - {{name: sentiment, dataset: csv, data_path: {single}}}\n")
    )
    cases["single-class sentiment"] = ([str(tmp_path / "single.yaml")], {})
    for value in ("abc", "0", "-5", "inf"):
        cases[f"RNNBENCH_LEASE_SECONDS={value}"] = (
            [str(tmp_path / "ok.yaml")],
            {"RNNBENCH_LEASE_SECONDS": value},
        )
    conll = conll_missing_a_column(tmp_path / "chunk-as-ner.conll")
    (tmp_path / "conll.yaml").write_text(
        tiny_experiment(
            f"  - {{name: ner, dataset: conll, options: {{train_file: {conll}, valid_file: {conll}, "
            f"test_file: {conll}}}}}\n"
        )
    )
    cases["CoNLL line without its NER column"] = ([str(tmp_path / "conll.yaml")], {})
    huge = forecast_csv(tmp_path / "huge.csv", value_at=(120, 1e39))
    (tmp_path / "huge.yaml").write_text(
        tiny_experiment(
            f"  - {{name: forecast, dataset: csv, data_path: {huge}, options: {{target_columns: y, "
            "date_column: date, input_width: 8, label_width: 2}}\n"
        )  # fmt: skip
    )
    cases["forecast value beyond float32"] = ([str(tmp_path / "huge.yaml")], {})
    mlruns = (tmp_path / "mlruns").as_uri()
    cases["--tracking-uri file://"] = ([str(tmp_path / "ok.yaml"), "--tracking-uri", mlruns], {})
    return cases


def conll_missing_a_column(path: Path) -> Path:
    """CoNLL-2003 columns (token, POS, chunk, NER) with the NER column missing on line 3."""
    path.write_text(
        "EU NNP B-NP B-ORG\nrejects VBZ B-VP O\nGerman JJ B-NP\ncall NN I-NP O\n\n"
        "Peter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n\n"
    )
    return path


def test_conll_line_missing_a_column_names_file_and_line(tmp_path: Path):
    from rnnbench.data.readers import read_conll

    path = conll_missing_a_column(tmp_path / "train.txt")
    with pytest.raises(DataError, match=r"train.txt line 3 has 3 columns where line 1 has 4"):
        read_conll(path)


def test_forecast_value_beyond_float32_is_refused(tmp_path: Path):
    from rnnbench.data.series import read_series_csv

    path = forecast_csv(tmp_path / "huge.csv", value_at=(120, -1e39))
    with pytest.raises(DataError, match=r"line 122 \(data row 121\): column 'y' holds -1e\+39, beyond"):
        read_series_csv(path, target_columns=["y"], date_column="date")


def test_cli_bad_inputs_exit_2_in_at_most_3_lines_and_write_nothing(tmp_path: Path):
    """Through `rnnbench run` (CliRunner in one subprocess: one torch import for all cases)."""
    cases = cli_cases(tmp_path)
    script = (
        "import json, sys\n"
        "from click.testing import CliRunner\n"
        "from rnnbench.cli import app\n"
        "for args, env in json.loads(sys.argv[1]):\n"
        "    r = CliRunner().invoke(app, ['run', *args], env=env)\n"
        "    print(json.dumps([r.exit_code, r.output]))\n"
    )
    import json

    home = tmp_path / "home"
    env = {**os.environ, "RNNBENCH_HOME": str(home), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps(list(cases.values()))],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    results = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(results) == len(cases)
    for name, (code, output) in zip(cases, results):
        lines = [line for line in output.splitlines() if line.strip()]
        assert code == 2, (name, output[-500:])
        assert 1 <= len(lines) <= 3 and lines[-1].startswith("error: "), (name, output[-500:])
        assert "Traceback" not in output and len(output) < 1000, name
    assert not home.exists() and not (tmp_path / "runs").exists()  # no mlflow.db, journal or locks/
    assert not (tmp_path / "PWNED").exists()  # the python tag ran nothing


def test_fixed_data_then_simply_runs(tmp_path: Path):
    """A data error writes nothing, so the corrected file (or a new data_path) runs at once."""
    home = tmp_path / "home"
    env = {**os.environ, "RNNBENCH_HOME": str(home), "OMP_NUM_THREADS": "1"}
    data = forecast_csv(tmp_path / "series.csv", nan_row=200)
    task = (f"  - {{name: forecast, dataset: csv, data_path: {data}, options: {{target_columns: y, "
            "date_column: date, input_width: 8, label_width: 2}}\n")  # fmt: skip
    (tmp_path / "fc.yaml").write_text(tiny_experiment(task, "fc"))
    run = [sys.executable, "-m", "rnnbench.cli", "run", str(tmp_path / "fc.yaml")]
    bad = subprocess.run(run, capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "row" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert not home.exists()
    forecast_csv(data)  # fixed in place
    good = subprocess.run(run, capture_output=True, text=True, env=env, timeout=300)
    assert good.returncode == 0, good.stdout[-1500:] + good.stderr[-1500:]
    assert "pre-flight: 1 dataset(s) loaded" in good.stdout and (home / "mlflow.db").is_file()
