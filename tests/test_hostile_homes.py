"""Hostile homes, plugins and limits (issue 25), through real `rnnbench` processes where the
fault is one of processes: weights paths from labels, plugin name clashes, evaluation under the
time limit, concurrent starts on one home, leftovers of killed processes, a read-only run home
and a ledger database that goes away mid-run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

TINY = """\
name: {name}
cells: [gru]
tasks:
  - name: memory
    options: {{problem: adding, seq_len: 8, train_size: 64, valid_size: 32, test_size: 32}}
search:
  hidden_size: {{type: int, low: 4, high: 8}}
budget: {{trials: {trials}, epochs: {epochs}}}
final: {{seeds: 1}}
pruner: {{name: none}}
"""


def tiny(tmp_path: Path, name: str, trials: int = 1, epochs: int = 1) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(TINY.format(name=name, trials=trials, epochs=epochs))
    return path


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def rnnbench(*args: str, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("env", env())
    return subprocess.run(
        [sys.executable, "-m", "rnnbench.cli", *args], capture_output=True, text=True, timeout=300, **kwargs
    )


def lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]


# -- 3: weights paths ----------------------------------------------------------------------------
def test_weights_path_stays_in_its_experiment_and_never_collides(tmp_path: Path):
    from rnnbench.models import weights_path

    home = tmp_path / "home"
    models = (home / "models").resolve()
    names = ["a/../gru-1L-uni", "b/../gru-1L-uni", "a/./gru-1L-uni", "a/x+y/gru-1L-uni", "a/x_y/gru-1L-uni"]
    paths = [weights_path(home, name, 10_000) for name in names]
    assert len(set(paths)) == len(paths)
    for name, path in zip(names, paths):
        assert path.resolve().is_relative_to(models / name.split("/")[0]), path
        assert ".." not in path.parts and "." not in path.parts
    # clean names keep the layout the README shows (and that older ledgers point at)
    assert weights_path(home, "smoke/memory-synthetic/gru-1L-uni", 3) == (
        home / "models" / "smoke" / "memory-synthetic" / "gru-1L-uni" / "seed-3.pt"
    )


def test_weights_recorded_under_an_old_path_still_load(tmp_path: Path):
    import hashlib
    import io

    from rnnbench.models import load_weights

    old = tmp_path / "models" / "gru-1L-uni" / "seed-1.pt"  # where a label '..' used to put them
    old.parent.mkdir(parents=True)
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buffer)
    old.write_bytes(buffer.getvalue())
    record = {"path": "models/gru-1L-uni/seed-1.pt", "sha256": hashlib.sha256(buffer.getvalue()).hexdigest()}
    assert torch.equal(load_weights(tmp_path, record)["w"], torch.ones(2))


# -- 9: plugin name clashes ----------------------------------------------------------------------
def installed_plugins(folder: Path, dists: dict[str, list[str]]) -> str:
    """A folder for PYTHONPATH holding one installed distribution (a .dist-info with an entry
    point, what pip leaves behind) per item of ``dists``: distribution name -> its cell names."""
    folder.mkdir(parents=True)
    for dist, cells in dists.items():
        module = dist.replace("-", "_")
        hook = ", ".join(f"{c!r}: ToyCell" for c in cells)
        (folder / f"{module}.py").write_text(
            textwrap.dedent(
                f"""
                from rnnbench import Cell, hookimpl

                class ToyCell(Cell):
                    def forward(self, x_t, state):
                        return state, state

                @hookimpl
                def rnnbench_cells():
                    return {{{hook}}}
                """
            )
        )
        info = folder / f"{module}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[rnnbench]\n{module} = {module}\n")
    return str(folder)


def test_plugin_name_clash_blocks_only_experiments_that_use_the_name(tmp_path: Path):
    plugins = installed_plugins(
        tmp_path / "site",
        {"rnnbench-first": ["toy"], "rnnbench-second": ["toy"], "rnnbench-shadow": ["lstm"]},
    )
    script = (
        "import json, sys\n"
        "from click.testing import CliRunner\n"
        "from rnnbench.cli import app\n"
        "for path in sys.argv[1:]:\n"
        "    r = CliRunner().invoke(app, ['run', '--dry-run', path])\n"
        "    print(json.dumps([r.exit_code, r.output]))\n"
    )
    files = []
    for name, cell in (("gru", "gru"), ("toy", "toy"), ("lstm", "lstm")):
        files.append(tmp_path / f"{name}.yaml")
        files[-1].write_text(TINY.format(name=name, trials=1, epochs=1).replace("[gru]", f"[{cell}]"))
    home = tmp_path / "home"
    out = subprocess.run(
        [sys.executable, "-c", script, *map(str, files)],
        capture_output=True,
        text=True,
        env=env(PYTHONPATH=plugins, RNNBENCH_HOME=str(home)),
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    (gru_code, gru_out), (toy_code, toy_out), (lstm_code, lstm_out) = map(json.loads, out.stdout.splitlines())
    assert gru_code == 0, gru_out  # builtin cells only: the clash is none of its business
    for code, output, who in (
        (toy_code, toy_out, ("rnnbench-first 1.0", "rnnbench-second 1.0")),
        (lstm_code, lstm_out, ("builtin", "rnnbench-shadow 1.0")),
    ):
        error = [line for line in output.splitlines() if line.startswith("error: ")]
        assert code == 2 and len(error) == 1 and "Traceback" not in output, output
        assert "registered twice" in error[0] and all(w in error[0] for w in who), error[0]
    assert not home.exists()


# -- 8: the time limit covers evaluation ---------------------------------------------------------
def test_time_limit_covers_a_slow_evaluation():
    from rnnbench.errors import TrialFailed
    from rnnbench.tasks.memory import Memory
    from rnnbench.trainer import Architecture, Trainer

    class SlowToScore(Memory):
        """Trains at full speed, scores at 0.2 s a batch (10 batches a validation)."""

        def batches(self, split, batch_size, **kwargs):
            for batch in super().batches(split, batch_size, **kwargs):
                if split != "train":
                    time.sleep(0.2)
                yield batch

    task = SlowToScore("synthetic", problem="adding", seq_len=8, train_size=64, valid_size=320, test_size=32)
    task.setup()
    trainer = Trainer({"epochs": 5, "max_minutes": 0.01}, {"device": "cpu"})  # 0.6 s
    started = time.perf_counter()
    with pytest.raises(TrialFailed) as failed:
        trainer.fit(task, Architecture("gru"), {"hidden_size": 4, "batch_size": 32}, setup_done=True)
    assert failed.value.reason == "time_limit"
    # unbounded: each of 5 epochs validated in 2 s, and the tokens counted once in 2 s more
    assert time.perf_counter() - started < 3.0


# -- 10: concurrent starts on one home -----------------------------------------------------------
OTHER_PROCESS = """
import sys
from pathlib import Path
from mlflow.tracking import MlflowClient
from rnnbench.tracking import create_sqlite_store
MlflowClient(create_sqlite_store(Path(sys.argv[1]))).create_experiment("other")
"""


def test_a_store_created_meanwhile_is_never_replaced(tmp_path: Path, monkeypatch):
    """The race behind concurrent starts, made to happen: while this process builds the run home's
    MLflow store, another process starts, creates the store and writes to it (or, where creation
    is atomic, waits for this one). Its write must survive: nobody renames a store over one in use."""
    from filelock import FileLock, Timeout
    from mlflow.tracking import MlflowClient

    from rnnbench import tracking

    home = tmp_path / "home"
    home.mkdir()
    built = tracking._dispose_engines
    other: list[subprocess.Popen] = []

    def other_process_meanwhile(uri: str) -> None:
        built(uri)
        other.append(subprocess.Popen([sys.executable, "-c", OTHER_PROCESS, str(home)], env=env()))
        try:  # if nothing keeps it out, let it finish first: the worst interleaving
            FileLock(str(home / "locks" / "mlflow-db.lock")).acquire(timeout=0).lock.release()
        except Timeout:
            return  # it will wait for this builder
        other[0].wait(timeout=120)

    monkeypatch.setattr(tracking, "_dispose_engines", other_process_meanwhile)
    uri = tracking.create_sqlite_store(home)
    assert other[0].wait(timeout=120) == 0
    assert MlflowClient(uri).get_experiment_by_name("other") is not None
    assert not list(home.glob(".mlflow.db.*.tmp*"))


@pytest.mark.slow  # three `rnnbench run` processes on 2 cores: 30-50 s
def test_concurrent_starts_on_one_home(tmp_path: Path):
    """Two experiments and a second copy of one, started together on a fresh home: the two run
    to the end, the copy says the experiment is already running (exit 2) or finds it finished."""
    from mlflow.tracking import MlflowClient

    from rnnbench.sweep import open_storage, study_names
    from rnnbench.tracking import tracking_uri_for

    home = tmp_path / "home"
    files = [tiny(tmp_path, "alpha"), tiny(tmp_path, "beta"), tiny(tmp_path, "alpha")]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "rnnbench.cli", "run", str(f), "--home", str(home)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env(),
        )
        for f in files
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    codes = [p.returncode for p in procs]
    report = "\n\n".join(f"exit {c}:\n{o[-1500:]}" for c, o in zip(codes, outputs))
    assert codes[1] == 0 and sorted([codes[0], codes[2]]) in ([0, 0], [0, 2]), report
    for code, output in zip(codes, outputs):
        assert "Traceback" not in output and "unexpected" not in output, report
        assert "readonly" not in output.lower() and "disk i/o" not in output.lower(), report
        if code == 2:
            assert output.strip().splitlines()[-1].startswith("error: experiment 'alpha' is already running")
    client = MlflowClient(tracking_uri_for(home))
    storage = open_storage(None, home)
    for name in ("alpha", "beta"):
        experiment = client.get_experiment_by_name(name)
        assert experiment is not None, name
        runs = client.search_runs([experiment.experiment_id])
        assert len(runs) == len(study_names(storage, name)) * 3, name  # parent, trial, seed
    assert not list(home.glob(".mlflow.db.*.tmp*"))


# -- 11, 12: a finished home, then killed syncs and read-only storage ----------------------------
@pytest.fixture(scope="module")
def finished_home(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("finished")
    home = folder / "home"
    result = rnnbench("run", str(tiny(folder, "done")), "--home", str(home))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return home


@pytest.mark.slow  # a finished run, then SIGKILLed syncs: about 15 s
def test_killed_sync_leaves_no_temporary_store_behind(finished_home: Path, tmp_path: Path):
    home = tmp_path / "home"
    shutil.copytree(finished_home, home)
    (home / "mlflow.db").unlink()  # lost: the next sync builds it again from the ledger
    killed = rnnbench("sync", "done", "--home", str(home), env=env(RNNBENCH_FAULT="sqlite_store_built"))
    assert killed.returncode == -signal.SIGKILL
    assert list(home.glob(".mlflow.db.*.tmp")), "the fault point must sit after the temporary store exists"
    from rnnbench.tracking import create_sqlite_store

    create_sqlite_store(home)  # what the next run, sync or report starts with
    assert not list(home.glob(".mlflow.db.*.tmp*")) and (home / "mlflow.db").is_file()


def read_only(home: Path, *command: str) -> subprocess.CompletedProcess:
    """``command`` with ``home`` mounted read-only (a private mount namespace: root ignores file
    modes, so chmod would prove nothing); skips where namespaces are not allowed."""
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("unshare -m is not permitted here")
    script = 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" "$1" && shift && exec "$@"'
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", str(home), *command],
        capture_output=True,
        text=True,
        timeout=300,
        env=env(),
    )


@pytest.mark.slow  # a finished run reported read-only: about 20 s
def test_finished_home_on_read_only_storage_can_be_reported(finished_home: Path, tmp_path: Path):
    home = tmp_path / "home"
    shutil.copytree(finished_home, home)
    before = {p: p.stat().st_mtime_ns for p in home.rglob("*")}
    out = tmp_path / "report"
    cli = [sys.executable, "-m", "rnnbench.cli"]
    result = read_only(
        home, *cli, "report", "done", "--home", str(home), "--out", str(out), "--format", "html"
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (out / "report.html").is_file()
    assert {p: p.stat().st_mtime_ns for p in home.rglob("*")} == before
    exported = read_only(home, *cli, "export", "done", "memory-synthetic/gru-1L-uni", "--home", str(home),
                         "--out", str(tmp_path / "model"))  # fmt: skip
    assert exported.returncode == 0, exported.stdout[-2000:] + exported.stderr[-2000:]


# -- 13: the ledger database goes away mid-run ---------------------------------------------------
@pytest.mark.slow  # a PostgreSQL cluster stopped mid-run: about 10 s
def test_ledger_database_down_mid_run_is_named_not_reported_as_a_bug(tmp_path: Path):
    from tests.services import Postgres, postgres_bin

    if postgres_bin() is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    pg = Postgres().start()
    try:
        url = pg.create_database("optuna")
        path = tiny(tmp_path, "pgdown", trials=4, epochs=3)
        proc = subprocess.Popen(
            [sys.executable, "-m", "rnnbench.cli", "run", str(path), "--home", str(tmp_path / "home"),
             "--storage", url],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(),
        )  # fmt: skip
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "-> complete" in line:  # a trial is in the ledger: take the database away
                pg._run(pg.bin / "pg_ctl", "-D", pg.dir / "data", "-m", "immediate", "stop")
                break
        output = "".join(seen) + proc.communicate(timeout=200)[0]
    finally:
        pg.stop()
    last = output.strip().splitlines()[-1]
    assert proc.returncode == 1, output[-3000:]
    assert "Traceback" not in output and "please report" not in output, output[-3000:]
    assert last.startswith("error: the ledger database at 127.0.0.1") and "is unreachable" in last, last
    assert "start it and run the same command again" in last, last
