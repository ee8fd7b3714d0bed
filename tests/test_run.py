"""`rnnbench run` end to end: exact trial counts, kill-and-resume, parallel workers, MLflow layout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import run_cli
from tests.helpers import write_tiny_experiment as _write


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "RNNBENCH_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(args: list[str], home: Path, timeout: float = 240):
    return run_cli(args, home, timeout=timeout, PYTHONUNBUFFERED="1")


def _counts(home: Path, name: str):
    """(Optuna trials by state per study kind, MLflow runs by (stage, study, trial) and status)."""
    import optuna
    from mlflow.tracking import MlflowClient

    from rnnbench.sweep import open_storage, trial_status
    from rnnbench.tracking import tracking_uri_for

    storage = open_storage(None, home)
    states = {}
    for summary in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        kind = "final" if summary.study_name.endswith("::final") else "search"
        states[kind] = Counter(trial_status(t) for t in study.get_trials())
    client = MlflowClient(tracking_uri_for(home))
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    keys = Counter(
        (
            r.data.tags.get("rnnbench.study"),
            r.data.tags.get("rnnbench.stage"),
            r.data.tags.get("rnnbench.trial"),
            r.data.tags.get("rnnbench.seed"),
        )
        for r in runs
    )
    return states, runs, keys


def _start_until(path: Path, home: Path, condition, timeout: float = 180, args=(), **popen):
    """Start `rnnbench run` and read its output until ``condition(line, lines so far)`` holds."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "rnnbench.cli", "run", str(path), *args],
        **popen,
        env=_env(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        if condition(line, seen):
            break
        assert time.monotonic() < deadline, "".join(seen)
    return proc, seen


def test_run_counts_and_mlflow_layout(tmp_path: Path):
    home = tmp_path / "home"
    result = _run(["run", str(_write(tmp_path, "plain"))], home)
    assert result.returncode == 0, result.stderr
    states, runs, keys = _counts(home, "plain")
    assert states["search"] == Counter({"complete": 3}) and states["final"] == Counter({"complete": 2})
    assert max(keys.values()) == 1  # no trial or seed has two runs
    parents = [r for r in runs if r.data.tags["rnnbench.stage"] == "study"]
    children = [r for r in runs if r.data.tags["rnnbench.stage"] in ("search", "final")]
    assert len(parents) == 1 and len(children) == 5
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    parent = parents[0].data
    assert parent.metrics["final_seeds"] == 2 and "test_mse_mean" in parent.metrics
    assert "test_mse_ci95_low" not in parent.metrics  # no interval from 2 seeds
    for r in children:
        assert {"rnnbench.version", "rnnbench.torch", "rnnbench.device_name", "rnnbench.threads"} <= set(
            r.data.tags
        )
        assert "valid_mse" in r.data.metrics and "train_tokens_per_s" in r.data.metrics
        assert r.data.params["hidden_size"] and r.data.params["lr"]
    searched = {
        (r.data.params["hidden_size"], r.data.params["lr"])
        for r in children
        if r.data.tags["rnnbench.stage"] == "search"
    }
    assert len(searched) == 3  # every search trial tries a new configuration
    finals = [r for r in children if r.data.tags["rnnbench.stage"] == "final"]
    assert all("test_mse" in r.data.metrics for r in finals)
    assert "baseline_test_mse" in parent.metrics  # the trivial baseline, for the report
    assert not any(
        "test_mse" in r.data.metrics for r in children if r.data.tags["rnnbench.stage"] == "search"
    )

    # Running it again changes nothing: finished trials and seeds are never re-run.
    again = _run(["run", str(_write(tmp_path, "plain"))], home)
    assert again.returncode == 0, again.stderr
    states2, runs2, _ = _counts(home, "plain")
    assert states2 == states and len(runs2) == len(runs)


def test_changed_budget_is_explained(tmp_path: Path):
    home = tmp_path / "home"
    assert _run(["run", str(_write(tmp_path, "b", trials=1, seeds=0))], home).returncode == 0
    changed = _run(["run", str(_write(tmp_path, "b", trials=2, seeds=0))], home)
    assert changed.returncode == 2 and "different budget" in changed.stderr
    assert "Traceback" not in changed.stderr


def test_kill_mid_trial_then_resume(tmp_path: Path):
    home = tmp_path / "home"
    path = _write(tmp_path, "killed", trials=3, epochs=4, seeds=1, train_size=2048)
    # kill once trial 1 is training (its first epoch logged)
    proc, seen = _start_until(
        path, home, lambda line, seen: "epoch 1/4" in line and "trial 1" in "".join(seen)
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    states, _, _ = _counts(home, "killed")
    assert states["search"]["running"] == 1  # the killed trial, left behind

    resumed = _run(["run", str(path)], home)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    states, runs, keys = _counts(home, "killed")
    # exactly the budget counted, the killed trial lost (its process is gone) and re-run once
    assert states["search"] == Counter({"complete": 3, "lost": 1})
    assert states["final"] == Counter({"complete": 1})
    assert max(keys.values()) == 1
    statuses = Counter(r.info.status for r in runs if r.data.tags["rnnbench.stage"] == "search")
    assert statuses == Counter({"FINISHED": 3, "KILLED": 1})
    lost = [r for r in runs if r.data.tags.get("rnnbench.status") == "lost"]
    assert lost[0].data.tags["rnnbench.failure_reason"] == "worker_lost"


@pytest.mark.parametrize("workers", [2])
def test_parallel_workers_run_the_same_counts(tmp_path: Path, workers: int):
    home = tmp_path / "home"
    path = tmp_path / "par.yaml"
    path.write_text(
        _write(tmp_path, "par", trials=3, seeds=2).read_text().replace("cells: [gru]", "cells: [gru, rnn]")
    )
    result = _run(["run", str(path), "--workers", str(workers)], home)
    assert result.returncode == 0, result.stdout + result.stderr
    import optuna

    from rnnbench.sweep import open_storage

    storage = open_storage(None, home)
    summaries = optuna.get_all_study_summaries(storage)
    assert len(summaries) == 4  # 2 architectures x (search, final)
    for s in summaries:
        expected = 2 if s.study_name.endswith("::final") else 3
        trials = optuna.load_study(study_name=s.study_name, storage=storage).get_trials()
        assert Counter(t.state.name for t in trials) == Counter({"COMPLETE": expected}), s.study_name
    _, _, keys = _counts(home, "par")
    assert max(keys.values()) == 1
    # which worker ran what depends on how fast each started: only the counts above are exact
    assert "[w0]" in result.stdout or "[w1]" in result.stdout


def test_ctrl_c_then_resume(tmp_path: Path):
    """SIGINT mid-trial: exit 130, the trial is `interrupted` (not counted, costs no retry), its
    configuration runs again on resume, and MLflow shows the same."""
    home = tmp_path / "home"
    path = _write(tmp_path, "ctrlc", trials=2, epochs=4, seeds=1, train_size=2048)
    proc, seen = _start_until(path, home, lambda line, seen: "epoch 1/4" in line)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, "".join(seen) + out
    assert "to resume" in out and "Traceback" not in out
    states, runs, _ = _counts(home, "ctrlc")
    assert states["search"] == Counter({"interrupted": 1, "waiting": 1})
    assert [r.data.tags["rnnbench.status"] for r in runs if r.data.tags["rnnbench.stage"] == "search"] == [
        "interrupted"
    ]
    resumed = _run(["run", str(path)], home)
    assert resumed.returncode == 0, resumed.stderr
    states, runs, keys = _counts(home, "ctrlc")
    assert states["search"] == Counter({"complete": 2, "interrupted": 1})
    assert max(keys.values()) == 1


@pytest.mark.slow  # about 40 s; Ctrl-C and SIGKILL resumes stay in the default suite
def test_sigterm_to_the_parent_stops_every_worker_then_resume(tmp_path: Path):
    """`kill <pid>` (a scheduler's time limit, `timeout`) on `run --workers 2`: exit 130, both
    workers' trials are `interrupted`, no worker outlives the run (it used to train on, orphaned),
    and a resume ends with exact counts. Started the way `cmd &` starts it: SIGINT ignored."""
    import psutil

    home = tmp_path / "home"
    path = _write(tmp_path, "term", trials=2, epochs=30, seeds=1, train_size=2048)
    proc, seen = _start_until(
        path,
        home,
        lambda line, seen: sum("epoch 1/30" in s for s in seen) >= 2,  # both workers are training
        args=("--workers", "2"),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    workers = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, "".join(seen) + out
    assert "to resume" in out and "Traceback" not in out
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, [p.cmdline() for p in alive]
    states, _, _ = _counts(home, "term")
    assert states["search"]["interrupted"] == 2
    resumed = _run(["run", str(path), "--workers", "2"], home, timeout=400)
    assert resumed.returncode == 0, resumed.stderr
    states, _, keys = _counts(home, "term")
    assert states["search"] == Counter({"complete": 2, "interrupted": 2})
    assert states["final"] == Counter({"complete": 1}) and max(keys.values()) == 1


def test_more_final_seeds_extend_a_finished_study(tmp_path: Path):
    """Raising final.seeds and running again adds the seeds; the parent run shows all of them."""
    home = tmp_path / "home"
    assert _run(["run", str(_write(tmp_path, "ext", trials=1, seeds=1))], home).returncode == 0
    again = _run(["run", str(_write(tmp_path, "ext", trials=1, seeds=2))], home)
    assert again.returncode == 0, again.stderr
    assert "[0/1 eta ?]" in again.stdout  # progress counts what is left: one seed, not 1 + 2
    assert "(seeds: " in again.stdout  # two seeds: their values, no interval
    states, runs, _ = _counts(home, "ext")
    assert states["search"] == Counter({"complete": 1}) and states["final"] == Counter({"complete": 2})
    parent = next(r for r in runs if r.data.tags["rnnbench.stage"] == "study")
    assert parent.data.metrics["final_seeds"] == 2 and parent.info.status == "FINISHED"
    seeds = sorted(
        int(r.data.tags["rnnbench.seed"]) for r in runs if r.data.tags["rnnbench.stage"] == "final"
    )
    assert seeds == [10_000, 10_001]  # apart from the search seed (sampler.seed 0)


OVER_BUDGET = """\
name: {name}
cells: [gru]
tasks:
  - name: charlm
    dataset: synthetic
    options: {{seq_len: 16}}
parameter_budget: 3000
search:
  embedding_dim: {{type: categorical, choices: [4, 512]}}
fixed: {{batch_size: 32}}
budget: {{trials: 4, epochs: 1, steps_per_epoch: 2}}
final: {{seeds: 1}}
sampler: {{name: grid, seed: 0}}
pruner: {{name: none}}
"""


@pytest.mark.slow  # about 10 s: a whole run
def test_error_before_training_fails_the_trial_once_with_its_reason(tmp_path: Path):
    """A sampled embedding over the parameter budget fails solve_hidden_size before training: that
    trial fails with its own reason, once (no retry, not worker_lost), and the sweep goes on."""
    from rnnbench.sweep import RETRY_OF, failure_of, open_storage, record_of, trial_status

    home, path = tmp_path / "home", tmp_path / "over.yaml"
    path.write_text(OVER_BUDGET.format(name="over"))
    result = _run(["run", str(path), "--max-retries", "1"], home)
    assert result.returncode == 0, result.stdout + result.stderr
    import optuna

    storage = open_storage(None, home)
    trials = optuna.load_study(study_name="over/charlm-synthetic/gru-1L-uni", storage=storage).get_trials()
    assert not [t for t in trials if RETRY_OF in t.user_attrs]  # nothing was queued again
    statuses = Counter(trial_status(t) for t in trials)
    assert statuses == Counter({"complete": 1, "failed": 1}), statuses
    bad = next(t for t in trials if trial_status(t) == "failed")
    reason, message = failure_of(bad, "failed")
    assert reason == "exception" and "ConfigError" in message and "parameter_budget 3,000" in message
    assert record_of(bad)["hparams"]["embedding_dim"] == 512


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_threads_per_worker_follow_the_cpus_this_process_may_use():
    """Slurm and cgroups restrict the affinity mask, not os.cpu_count(): one allowed CPU means one
    thread per worker, however many the machine has."""
    script = (
        "import os\n"
        "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "from rnnbench.workers import threads_per_worker\n"
        "print(threads_per_worker(1), threads_per_worker(4))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1"]


@pytest.mark.slow  # about 10 s: a whole run
def test_a_final_seed_out_of_memory_is_trained_again(tmp_path: Path):
    """An out-of-memory on a final seed (a neighbour took the GPU) says nothing about the
    configuration: the seed is trained again within the retry limit, so every seed scores."""
    from rnnbench.sweep import RETRY_OF, failure_of

    home, once = tmp_path / "home", tmp_path / "oom-once"
    env = {**_env(home), "RNNBENCH_FAULT": f"final_oom:{once}"}
    path = _write(tmp_path, "oom", trials=1, seeds=2)
    result = subprocess.run(
        [sys.executable, "-m", "rnnbench.cli", "run", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert once.exists()
    states, runs, _ = _counts(home, "oom")
    assert states["final"] == Counter({"complete": 2, "lost": 1}), states
    import optuna

    from rnnbench.sweep import open_storage

    storage = open_storage(None, home)
    name = next(
        s.study_name for s in optuna.get_all_study_summaries(storage) if s.study_name.endswith("::final")
    )
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    oom = next(t for t in trials if t.state == optuna.trial.TrialState.FAIL)
    assert failure_of(oom, "lost")[0] == "out_of_memory"
    copy = next(t for t in trials if t.user_attrs.get(RETRY_OF) == oom.number)
    assert (
        copy.user_attrs["seed"] == oom.user_attrs["seed"] and copy.state == optuna.trial.TrialState.COMPLETE
    )


def test_only_a_final_seeds_transient_failure_is_retried():
    from rnnbench.sweep import retry_decision

    assert retry_decision("final", "out_of_memory", 0, 3) == "retry"
    assert retry_decision("final", "worker_lost", 2, 3) == "retry"
    assert retry_decision("final", "out_of_memory", 3, 3) == "counted"  # retries spent: failed
    assert retry_decision("final", "nan_loss", 0, 3) is None  # deterministic: failed at once
    assert retry_decision("final", "exception", 0, 3) is None
    assert retry_decision("search", "out_of_memory", 0, 3) is None  # a configuration tried


@pytest.mark.parametrize("uri", ["file:relative/mlruns", "file:///tmp/mlruns", "/tmp/mlruns", "mlruns"])
def test_a_file_tracking_store_is_refused_in_one_line(uri: str):
    """MLflow's FileStore never de-duplicates (a repair would log every point twice): refused,
    whether as a file: URI or a bare path, pointing at the default store or a server."""
    from rnnbench.tracking import TrackingError, check_usable

    with pytest.raises(TrackingError) as caught:
        check_usable(uri)
    message = str(caught.value)
    assert "\n" not in message and "file store" in message
    assert "leave out --tracking-uri" in message and "tracking server" in message
    assert caught.value.exit_code == 2
