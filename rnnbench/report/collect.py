"""MLflow runs of one experiment → one tidy pandas table (one row per run) and per-epoch histories.

Reads only what ``rnnbench run`` logged (see tracking.py): tags ``rnnbench.*``, hyperparameters as
params, summary metrics (latest value), and, for the few runs the curves need, metric histories.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from rnnbench import stops
from rnnbench.data.resolve import DATA_ENV
from rnnbench.errors import ConfigError, RnnbenchError, UnknownNameError, first_line
from rnnbench.experiment import parse_margin
from rnnbench.plugins import declared_metric, get_task, metric_bounds
from rnnbench.tracking import _quiet_mlflow, tracking_uri_for

TAG = "rnnbench."
# Params every child run carries that are not hyperparameters (they are tags too).
_META_PARAMS = {"seed", "cell", "layers", "bidirectional"}
_ENV_TAGS = ("version", "torch", "python", "threads", "git_commit", "device_name", "cpu", "cuda")
_ID_COLUMNS = [
    "experiment", "study", "architecture", "cell", "layers", "bidirectional", "variant", "task",
    "benchmark", "dataset", "stage", "trial", "seed", "status", "failure_reason", "failure_message",
]  # fmt: skip
# steps: the optimiser steps done at each validation (budget sensitivity places validations by them)
HISTORY_METRICS = ("grad_norm", "grad_norm_max", "steps")
RUNS_FILE, HISTORIES_FILE, IMPORTANCE_FILE = "runs.parquet", "histories.parquet", "importance.parquet"
ITEMS_FILE = "items.parquet"  # per-item outcomes of the final seeds (collect_items), when any
# Run summaries that older stores logged under their per-epoch series' own name
_SUMMARIES_BEFORE_RENAME = {
    "train_tokens_per_s_median": "train_tokens_per_s",
    "eval_tokens_per_s_median": "eval_tokens_per_s",
    "train_memory_mib_peak": "train_memory_mib",
}
OLD_MEMORY_METRIC = "peak_memory_mb"  # before train_memory_mib: the worker's RSS, not the model's


@dataclass
class TaskInfo:
    """The primary metric of a task and which way is better."""

    name: str
    metric: str
    direction: str  # "minimize" | "maximize"
    bounds: tuple[float, float] = (-math.inf, math.inf)  # what the metric can take (Metric.bounds)
    margin: float | None = None  # of practical equivalence (Metric.margin, or the experiment's own)
    margin_relative: bool = False
    margin_source: str = "task"  # "task" (the metric's default) or "experiment" (the file's margin:)

    @property
    def better(self) -> str:
        return "lower is better" if self.direction == "minimize" else "higher is better"


@dataclass
class Collected:
    experiment: str
    tracking_uri: str
    runs: pd.DataFrame
    histories: pd.DataFrame  # run_id, metric, step (epoch), value
    tasks: dict[str, TaskInfo]
    notes: list[str] = field(default_factory=list)
    benchmarks: dict[str, TaskInfo] = field(default_factory=dict)  # benchmark → its task's metric
    items: pd.DataFrame = field(default_factory=pd.DataFrame)  # collect_items: run_id, split, item, ...


def resolve_tracking_uri(home: str | Path | None, tracking_uri: str | None) -> str:
    """The URI given, else the run home's sqlite store (which must exist: MLflow would create it)."""
    if tracking_uri:
        return tracking_uri
    # local: rnnbench.plan imports torch and optuna (+3.8 s on `import rnnbench.report.collect`);
    # only a missing tracking URI needs it
    from rnnbench.plan import run_home

    path = run_home(home)
    if not (path / "mlflow.db").is_file():
        raise ConfigError(
            f"no MLflow store in {path}: run `rnnbench run EXPERIMENT.yaml` first or pass --home"
        )
    return tracking_uri_for(path)


def open_client(uri: str):
    """An MlflowClient that has answered once; one clear line when the store is unreachable."""
    # Fail fast on an unreachable server instead of minutes of retries with backoff.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    _quiet_mlflow()
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.is_absolute():
            db = Path("/" + str(db)) if uri.startswith("sqlite:////") else db
        if not db.is_file():
            raise RnnbenchError(f"MLflow tracking store {uri} is not reachable: no such database file")
    try:
        # local: importing mlflow costs ~2.5 s, and the rebuilt report and load_results need none of it
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        client.search_experiments(max_results=1)
    except Exception as exc:  # connection refused, bad URI, locked or foreign database...
        raise RnnbenchError(f"MLflow tracking store {uri} is not reachable: {first_line(exc, 200)}") from None
    return client


def experiment_names(client) -> list[str]:
    names, token = [], None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        names += [e.name for e in page if e.lifecycle_stage == "active"]
        token = page.token
        if not token:
            return sorted(names)


def find_experiment(client, name: str):
    exp = client.get_experiment_by_name(name)
    if exp is None or exp.lifecycle_stage != "active":
        known = [n for n in experiment_names(client) if n != "Default"]
        raise UnknownNameError("experiment", name, known)
    return exp


def search_all_runs(client, experiment_id: str, progress: Callable[[str], None] | None = None) -> list:
    """Every run of the experiment, page by page (search_runs caps a page at a few thousand)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if progress and token:
            progress(f"collected {len(runs)} runs...")
        if not token:
            return runs


def task_info(task: str, columns: list[str]) -> tuple[TaskInfo, str | None]:
    """The primary metric from the task plugin; guessed from the columns when it is not installed."""
    try:
        metric = get_task(task).metrics[0]
        return TaskInfo(
            task, metric.name, metric.direction, metric.bounds, metric.margin, metric.margin_relative
        ), None
    except Exception:
        guesses = sorted(c.removeprefix("best_valid_") for c in columns if c.startswith("best_valid_"))
        name = guesses[0] if guesses else "loss"
        note = f"task {task!r} is not installed: ranked on {name!r}, assuming lower is better"
        return TaskInfo(task, name, "minimize"), note


def _number(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        as_float = float(value)
    except ValueError:
        return {"True": True, "False": False}.get(value, value)
    return (
        int(as_float) if as_float.is_integer() and "." not in value and "e" not in value.lower() else as_float
    )


def run_row(run, experiment: str) -> dict[str, Any]:
    tags, info = run.data.tags, run.info
    own = {k.removeprefix(TAG): v for k, v in tags.items() if k.startswith(TAG)}
    layers = _number(own.get("layers"))
    bidirectional = own.get("bidirectional") == "True" if "bidirectional" in own else None
    study = own.get("study")
    row: dict[str, Any] = {
        "experiment": experiment,
        "study": study,
        "architecture": study.rsplit("/", 1)[-1] if study else None,
        "cell": own.get("cell"),
        "layers": layers,
        "bidirectional": bidirectional,
        "variant": variant_label(layers, bidirectional) if layers is not None else None,
        "task": own.get("task"),
        # the task entry (task-dataset, or its label): tables and panels are per benchmark
        "benchmark": study.split("/")[1] if study and study.count("/") >= 2 else own.get("task"),
        "dataset": own.get("dataset"),
        "stage": own.get("stage"),
        "trial": _number(own.get("trial")),
        "seed": _number(own.get("seed")),
        "status": own.get("status"),
        "failure_reason": own.get("failure_reason"),
        "failure_message": own.get("failure_message"),
        "best_trial": _number(own.get("best_trial")),
        "stop_reason": stops.normalized(own.get("stop_reason")),
        "primary_metric": own.get("metric"),  # on study runs: the task instance's own primary metric
        "direction": own.get("direction"),
        "margin": own.get("margin"),  # the experiment's margin of practical equivalence, if it set one
        "run_id": info.run_id,
        "run_name": tags.get("mlflow.runName"),
        "parent_run_id": tags.get("mlflow.parentRunId"),
        "artifact_uri": info.artifact_uri,  # where its files are (collect_items reads from there)
        "mlflow_status": info.status,
        "start_time": pd.to_datetime(info.start_time, unit="ms", utc=True) if info.start_time else pd.NaT,
        "end_time": pd.to_datetime(info.end_time, unit="ms", utc=True) if info.end_time else pd.NaT,
    }
    for key, value in run.data.params.items():
        if key.startswith("best."):  # the study run carries its best configuration
            row[f"hp_{key[5:]}"] = _number(value)
        elif key.startswith("data."):  # stores written before datasets were MLflow inputs
            row[f"data_{key[5:]}"] = _number(value)
        elif key not in _META_PARAMS:
            row[f"hp_{key}"] = _number(value)
    for dataset_input in run.inputs.dataset_inputs if run.inputs else ():
        try:  # the dataset's profile: what the task read (sizes, seq_len, vocabulary...)
            profile = json.loads(dataset_input.dataset.profile or "{}")
        except ValueError:
            continue
        row |= {f"data_{k}": _number(v) for k, v in profile.items() if isinstance(v, (int, float, str))}
    row.update(run.data.metrics)
    for summary, series in _SUMMARIES_BEFORE_RENAME.items():
        if summary not in row and series in row:  # an older store: its only value of the series
            row[summary] = row[series]
    for name in _ENV_TAGS:
        row[f"env_{name}"] = own.get(name)
    return row


def variant_label(layers: Any, bidirectional: Any) -> str:
    return f"{layers}L-{'bi' if bidirectional else 'uni'}"


def _tidy(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    for col in ("layers", "trial", "seed", "best_trial"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    for col in df.columns:
        if col.startswith(("hp_", "data_")) and df[col].dtype == object:
            converted = pd.to_numeric(df[col], errors="coerce")
            if converted.notna().sum() == df[col].notna().sum():
                df[col] = converted
            else:  # mixed types would break Parquet
                df[col] = df[col].map(
                    lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
                )
    first = [c for c in _ID_COLUMNS if c in df.columns]
    hps = sorted(c for c in df.columns if c.startswith("hp_"))
    env = sorted(c for c in df.columns if c.startswith("env_"))
    rest = [c for c in df.columns if c not in first and c not in hps and c not in env]
    order = {"study": 0, "search": 1, "final": 2}
    df = df[first + hps + rest + env]
    df["_o"] = df["stage"].map(order).fillna(3)
    df = df.sort_values(["task", "study", "_o", "trial", "seed"], na_position="last").drop(columns="_o")
    return df.reset_index(drop=True)


def collect(
    client,
    experiment: str,
    *,
    tracking_uri: str = "",
    progress: Callable[[str], None] | None = None,
) -> Collected:
    exp = find_experiment(client, experiment)
    runs = search_all_runs(client, exp.experiment_id, progress)
    rows = [run_row(r, experiment) for r in runs if r.data.tags.get(f"{TAG}stage")]
    if not rows:
        raise RnnbenchError(
            f"experiment {experiment!r} has no runs yet: start it with `rnnbench run` and report again"
        )
    df = _tidy(rows)
    benchmarks, notes = benchmark_infos(df)
    tasks = {info.name: info for info in benchmarks.values()}
    notes += status_notes(df)
    histories = collect_histories(client, df, benchmarks, progress)
    histories.insert(0, "experiment", experiment)
    items = collect_items(client, df, progress)
    return Collected(experiment, tracking_uri, df, histories, tasks, notes, benchmarks, items)


def collect_many(
    client,
    experiments: list[str],
    *,
    tracking_uri: str = "",
    progress: Callable[[str], None] | None = None,
) -> Collected:
    """Several experiments as one tidy table: their rows concatenated, told apart by ``experiment``."""
    parts = [collect(client, e, tracking_uri=tracking_uri, progress=progress) for e in experiments]
    if len(parts) == 1:
        return parts[0]
    runs = pd.concat([p.runs for p in parts], ignore_index=True)
    histories = pd.concat([p.histories for p in parts], ignore_index=True)
    benchmarks, notes = benchmark_infos(runs)
    for p in parts:
        notes += [f"{p.experiment}: {n}" for n in status_notes(p.runs)]
    tasks = {info.name: info for info in benchmarks.values()}
    items = pd.concat([p.items for p in parts if len(p.items)] or [empty_items()], ignore_index=True)
    items.attrs["missing"] = [run_id for p in parts for run_id in p.items.attrs.get("missing", [])]
    return Collected(" vs ".join(experiments), tracking_uri, runs, histories, tasks, notes, benchmarks, items)


def natural_key(label: str) -> list:
    """Sort key that puts memory-T10 before memory-T40 before memory-T100."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", str(label))]


def benchmark_infos(runs: pd.DataFrame) -> tuple[dict[str, TaskInfo], list[str]]:
    """Each benchmark's primary metric, in natural order, read from the runs alone (the notebook
    has no MLflow): the study run's own tag, else the task plugin's first metric."""
    notes: list[str] = []
    tasks: dict[str, TaskInfo] = {}
    for task in sorted(runs["task"].dropna().unique()):
        tasks[task], note = task_info(task, list(runs.columns))
        if note:
            notes.append(note)
    benchmarks = {}
    named = runs.dropna(subset=["benchmark"])
    for bench in sorted(named["benchmark"].unique(), key=natural_key):
        group = named[named["benchmark"] == bench]
        info = tasks[group["task"].iloc[0]]
        tagged = group.dropna(subset=["primary_metric", "direction"]) if "direction" in group else group[:0]
        if len(tagged):  # the study run says which metric it optimised (options can change it)
            metric = tagged["primary_metric"].iloc[0]
            declared = declared_metric(info.name, metric)
            info = TaskInfo(
                info.name,
                metric,
                tagged["direction"].iloc[0],
                metric_bounds(info.name, metric),
                declared.margin if declared else None,
                declared.margin_relative if declared else False,
            )
        override = group["margin"].dropna() if "margin" in group else group[:0]
        if len(override):  # the experiment file's margin: of this task entry
            size, relative = parse_margin(str(override.iloc[0]))
            info = replace(info, margin=size, margin_relative=relative, margin_source="experiment")
        benchmarks[bench] = info
    return benchmarks, notes


def status_notes(df: pd.DataFrame) -> list[str]:
    """What is missing or went wrong, in words a reader acts on."""
    notes = []
    search = df[df["stage"] == "search"]
    for state in ("failed", "pruned", "lost", "interrupted", "running"):
        n = int((search["status"] == state).sum())
        if n:
            reasons = ""
            if state == "failed":
                counts = search.loc[search["status"] == "failed", "failure_reason"].fillna("unknown")
                reasons = " (" + ", ".join(f"{k}: {v}" for k, v in counts.value_counts().items()) + ")"
            notes.append(f"{n} search trial(s) {state}{reasons}")
    final = df[(df["stage"] == "final") & (df["status"] == "complete")]
    studies = sorted(df["study"].dropna().unique())
    without = [s for s in studies if s not in set(final["study"])]
    if without:
        notes.append(
            f"{len(without)} of {len(studies)} studies have no final seeds yet (not ranked on test): "
            + ", ".join(s.split("/", 1)[-1] for s in without)
        )
    failed_final = int(((df["stage"] == "final") & (df["status"] == "failed")).sum())
    if failed_final:
        notes.append(f"{failed_final} final seed run(s) failed")
    if OLD_MEMORY_METRIC in df and df[OLD_MEMORY_METRIC].notna().any():
        old = df[df[OLD_MEMORY_METRIC].notna()]
        if "train_memory_mib_peak" in old:
            old = old[old["train_memory_mib_peak"].isna()]
        if len(old):
            notes.append(
                f"{len(old)} run(s) were logged by an older rnnbench with {OLD_MEMORY_METRIC} (the worker "
                "process's whole RSS, about the same for every model): kept in runs.parquet, not shown as "
                "memory; train_memory_mib comes with runs logged from now on"
            )
    return notes


def best_search_runs(df: pd.DataFrame, benchmarks: dict[str, TaskInfo]) -> pd.DataFrame:
    """Per study, the search run of its best trial (from the study run's tag, else by best valid)."""
    out = []
    search = df[(df["stage"] == "search") & (df["status"] == "complete")]
    parents = df[df["stage"] == "study"].set_index("study")
    for study, group in search.groupby("study"):
        best = None
        if study in parents.index:
            tag = parents.loc[[study], "best_trial"].iloc[0]
            if pd.notna(tag):
                match = group[group["trial"] == tag]
                best = match.iloc[0] if len(match) else None
        info = benchmarks.get(group["benchmark"].iloc[0])
        col = f"best_valid_{info.metric}" if info else None
        if best is None and col in group and group[col].notna().any():
            idx = group[col].idxmin() if info.direction == "minimize" else group[col].idxmax()
            best = group.loc[idx]
        if best is not None:
            out.append(best)
    return pd.DataFrame(out)


def collect_histories(client, df, benchmarks, progress=None) -> pd.DataFrame:
    """Per-epoch curves for the runs the figures draw: best search trials and final seeds."""
    best = best_search_runs(df, benchmarks)
    finals = df[(df["stage"] == "final") & (df["status"] == "complete")]
    records = []
    wanted = list(best.itertuples()) + list(finals.itertuples())
    for i, run in enumerate(wanted):
        info = benchmarks.get(run.benchmark)
        metrics = ([f"valid_{info.metric}"] if info else []) + list(HISTORY_METRICS)
        for metric in metrics:
            for m in client.get_metric_history(run.run_id, metric):
                records.append((run.run_id, metric, int(m.step), float(m.value)))
        if progress and i and i % 50 == 0:
            progress(f"collected curves of {i}/{len(wanted)} runs...")
    hist = pd.DataFrame(records, columns=["run_id", "metric", "step", "value"])
    best_ids = set(best["run_id"]) if len(best) else set()
    hist["best_trial"] = hist["run_id"].isin(best_ids)
    return hist


def empty_items() -> pd.DataFrame:
    return pd.DataFrame(
        {"run_id": pd.Series(dtype=str), "split": pd.Series(dtype=str), "item": pd.Series(dtype="int32")}
    )


def collect_items(client, runs: pd.DataFrame, progress: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Per-item outcomes of every complete final seed (the artifact rnnbench.items logs): one long
    frame of ``run_id``, ``split``, ``item`` and the union of the tasks' columns (NaN where a task
    lacks one). Runs without the artifact (stores older than it, tasks that declare no items) are
    absent; ``attrs["missing"]`` lists their run ids."""
    # local: mlflow (~2.5 s) and rnnbench.items, which imports torch (+3.8 s), serve only this fetch
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from rnnbench.items import ARTIFACT_PATH

    wanted = runs[(runs["stage"] == "final") & (runs["status"] == "complete")] if len(runs) else runs
    uris = wanted["artifact_uri"] if "artifact_uri" in wanted else pd.Series(None, index=wanted.index)
    frames, missing = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (run_id, uri) in enumerate(zip(wanted.get("run_id", ()), uris, strict=True)):
            try:
                # from the run's artifact URI: a tenth of the time of asking the store for the run
                uri = uri if isinstance(uri, str) else client.get_run(run_id).info.artifact_uri
                path = download_artifacts(
                    artifact_uri=f"{uri}/{ARTIFACT_PATH}", dst_path=tmp, tracking_uri=client.tracking_uri
                )
            except (MlflowException, OSError):
                missing.append(run_id)
                continue
            frame = pd.read_parquet(path)
            frame.insert(0, "run_id", run_id)
            frames.append(frame)
            if progress and i and i % 100 == 0:
                progress(f"collected items of {i}/{len(wanted)} final runs...")
    items = pd.concat(frames, ignore_index=True) if frames else empty_items()
    items.attrs["missing"] = missing
    return items


def save(collected: Collected, out: Path) -> list[Path]:
    """The tidy tables the notebook reads: runs (Parquet and CSV), per-epoch histories and, when
    any final seed logged them, per-item outcomes."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / RUNS_FILE, out / "runs.csv", out / HISTORIES_FILE]
    shared = shareable_runs(collected.runs)
    shared.to_parquet(paths[0], index=False)
    shared.to_csv(paths[1], index=False)
    collected.histories.to_parquet(paths[2], index=False)
    if len(collected.items):
        paths.append(out / ITEMS_FILE)
        collected.items.to_parquet(paths[-1], index=False, compression="zstd")
    return paths


def shareable_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs table as it is saved for others: no path of this machine in it. Artifact locations
    go; a dataset file the profile names becomes its path under ``$RNNBENCH_DATA`` (the manifest's
    relative path) or, elsewhere, its file name."""
    data_root = Path(os.environ[DATA_ENV]).resolve() if os.environ.get(DATA_ENV) else None

    def shared(value: Any) -> Any:
        if not isinstance(value, str) or not Path(value).is_absolute():
            return value
        path = Path(value)
        if data_root is not None and path.resolve().is_relative_to(data_root):
            return path.resolve().relative_to(data_root).as_posix()
        return path.name

    out = runs.drop(columns=["artifact_uri"], errors="ignore")
    for column in [c for c in out.columns if c.startswith("data_")]:
        if not pd.api.types.is_numeric_dtype(out[column]):
            out[column] = out[column].map(shared)
    return out


def load_saved(folder: Path) -> Collected:
    """A saved report's tidy tables as collected, without MLflow: an archived report (its
    ``runs.parquet`` and the files beside it) can be rendered again by a newer rnnbench."""
    folder = Path(folder)
    if not (folder / RUNS_FILE).is_file():
        raise RnnbenchError(f"{folder} holds no saved report ({RUNS_FILE} is missing)")
    runs = pd.read_parquet(folder / RUNS_FILE)
    histories = (
        pd.read_parquet(folder / HISTORIES_FILE) if (folder / HISTORIES_FILE).is_file() else pd.DataFrame()
    )
    experiments = list(runs["experiment"].dropna().unique())
    benchmarks, notes = benchmark_infos(runs)
    for e in experiments:
        prefix = f"{e}: " if len(experiments) > 1 else ""
        notes += [prefix + n for n in status_notes(runs[runs["experiment"] == e])]
    tasks = {info.name: info for info in benchmarks.values()}
    return Collected(
        " vs ".join(experiments), "", runs, histories, tasks, notes, benchmarks, load_saved_items(folder)
    )


def load_saved_items(folder: Path = Path(".")) -> pd.DataFrame:
    """A saved report's per-item outcomes; an empty frame when it has none (older stores)."""
    path = Path(folder) / ITEMS_FILE
    return pd.read_parquet(path) if path.is_file() else empty_items()
