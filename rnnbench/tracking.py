"""MLflow: one experiment per experiment name, a parent run per study, a child run per trial/seed.

Uses MlflowClient with explicit run ids (no global active run), so parent links hold in any
process or thread. Metrics go in one ``log_batch`` call per epoch.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import socket
import subprocess
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
from filelock import FileLock

from rnnbench import __version__
from rnnbench.errors import RnnbenchError, first_line
from rnnbench.faults import fault

# mlflow (and flask) are imported where used: +2-3 s on `import rnnbench.tracking`, which
# `rnnbench run --dry-run`, `rnnbench ui` and the report import without writing to MLflow.

TAG = "rnnbench."  # prefix of our own tags
EXPERIMENT_KIND = "custom_model_development"


def tracking_uri_for(home: Path) -> str:
    """The embedded default store: an absolute sqlite URI under the run home."""
    return f"sqlite:///{(home / 'mlflow.db').resolve()}"


SUMMARY_STEP = 0  # a run's one-off values (counts, summary, best valid, test) and its model's link


class TrackingError(RnnbenchError):
    """An MLflow store that cannot be used as given."""

    exit_code = 2


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """One line, fast, when a tracking server does not answer (MLflow would retry for minutes)."""
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname or "127.0.0.1", port), timeout=timeout).close()
        except OSError as exc:
            raise TrackingError(
                f"MLflow tracking server {uri} is not reachable ({exc.strerror or exc}): start it "
                "(mlflow server ...) or fix --tracking-uri"
            ) from None
    elif parts.scheme == "file" or (parts.scheme == "" and uri != "databricks"):
        # MLflow 3 refuses its file store, but only once rnnbench has opened the ledger beside it
        raise TrackingError(
            f"MLflow's file store ({uri}) is not supported (it never de-duplicates, so a repair "
            "writes twice): leave out --tracking-uri for the run home's sqlite store, or give "
            "sqlite:///PATH/mlflow.db, a database URL or a tracking server (http://...)"
        )
    elif parts.scheme not in ("sqlite", "postgresql", "mysql", "databricks", "") and not (
        parts.scheme.startswith(("postgresql+", "mysql+"))
    ):
        raise TrackingError(f"unknown tracking URI scheme {parts.scheme!r} in {uri}")


def artifact_root_for(uri: str, home: Path) -> Path | None:
    """Where a new experiment's artifacts (weights, items, models) go: with the store they belong
    to, never only in a run home that may vanish (a Slurm job's $TMPDIR). A tracking server uses
    its own artifact store (None); an sqlite file keeps them in a folder beside it; a database
    without a server has no place of its own, so the run home's."""
    scheme = urlsplit(uri).scheme
    if scheme in ("http", "https", "databricks"):
        return None
    if scheme == "sqlite":
        db = Path(uri.removeprefix("sqlite:///"))
        return db.with_name(db.stem + "-artifacts")
    return home / "artifacts"


def check_usable(uri: str) -> None:
    """One line when MLflow cannot read a store given by URI: asked before the run home is
    written to, so a refused store leaves nothing behind."""
    check_reachable(uri)
    _quiet_mlflow()
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as exc:
        raise TrackingError(f"MLflow tracking store {uri} is not usable: {first_line(exc)}") from None


def create_sqlite_store(home: Path) -> str:
    """The run home's sqlite store, created whole or not at all.

    MLflow creates the file and then migrates its schema; a crash or a full disk in between
    leaves a file every later run fails on. So the store is built under a temporary name and
    renamed into place only once MLflow has answered from it. Processes starting together on one
    home build it one at a time (a file lock), and whoever finds it built uses it: renaming a new
    store over one in use would lose what was written to it. Temporary stores of processes that
    died building one are removed here."""
    path = (home / "mlflow.db").resolve()
    uri = f"sqlite:///{path}"
    _remove_dead_temporaries(path)
    if path.is_file():
        return uri
    _quiet_mlflow()
    from mlflow.tracking import MlflowClient

    tmp = path.with_name(f".mlflow.db.{os.getpid()}.tmp")
    try:
        (path.parent / "locks").mkdir(exist_ok=True)  # beside the run locks: nothing new in the home
        with FileLock(str(path.parent / "locks" / "mlflow-db.lock")):
            if path.is_file():  # built by another process while this one waited
                return uri
            MlflowClient(f"sqlite:///{tmp}").search_experiments(max_results=1)
            _dispose_engines(f"sqlite:///{tmp}")
            fault("sqlite_store_built")
            os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise TrackingError(f"cannot create the MLflow store {path}: {exc.strerror or exc}") from None
        if isinstance(exc, Exception):
            raise TrackingError(f"cannot create the MLflow store {path}: {first_line(exc)}") from None
        raise
    return uri


def _remove_dead_temporaries(path: Path) -> None:
    """Delete ``.mlflow.db.<pid>.tmp`` files (and their sqlite journals) whose process is gone:
    a SIGKILL between building a store and renaming it leaves one. Best effort: a read-only home
    keeps them, and a live process's own is never touched."""
    for tmp in path.parent.glob(".mlflow.db.*.tmp*"):
        pid = tmp.name.split(".")[3]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            try:
                tmp.unlink()
            except OSError:
                pass


def _dispose_engines(uri: str) -> None:
    """Close MLflow's cached engine of the temporary file before it is renamed."""
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        engine = SqlAlchemyStore._engine_map.pop(uri, None)
        if engine is not None:
            engine.dispose()
    except Exception:  # a private cache of MLflow's: if it moved, sqlite tolerates the rename
        pass


def _quiet_mlflow() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # mlflow sets its logger's level when imported (from this variable), so a level set before is lost
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # "View run … at: http://…"
    os.environ.setdefault("MLFLOW_PRINT_MODEL_URLS_ON_CREATION", "false")  # "View Logged Model at: …"
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # It logs a database error with its traceback before raising it; rnnbench reports it in one line.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


# The MLflow UI (3.x) keeps its view, "GenAI" or "Model training", in the browser: the page's
# ?workflowType= if it has one, else this localStorage entry, else GenAI. Only its sidebar switch
# writes the entry, and no server option or experiment tag sets it (mlflow.experimentKind is read
# only by Databricks builds of the UI), so a fresh browser opens every experiment in the GenAI view
# (traces, judges, "Agent versions") and drops back to it on every link without the parameter.
MLFLOW_APP = "rnnbench"  # `mlflow server --app-name rnnbench` (entry point group "mlflow.app")
WORKFLOW_STORAGE_KEY = "mlflow.workflowType_v1"
TRAINING_VIEW = "machine_learning"
_KEY, _VALUE = json.dumps(WORKFLOW_STORAGE_KEY), json.dumps(json.dumps(TRAINING_VIEW))  # the UI stores JSON
_SEED_TRAINING_VIEW = (
    f"<script>try{{if(localStorage.getItem({_KEY})===null)localStorage.setItem({_KEY},{_VALUE})}}"
    "catch(e){}</script>"
)


def mlflow_ui_app():
    """MLflow's own tracking server, whose UI opens in its "Model training" view: the one page it
    serves (index.html) first sets the browser's remembered view to it, where the browser has none
    yet. A view picked with the UI's GenAI / Model training switch is kept. Everything else is
    MLflow's server unchanged. Run by ``mlflow server --app-name rnnbench`` (what ``rnnbench ui``
    starts); MLflow imports it in each server worker."""
    from flask import Response
    from mlflow.environment_variables import _MLFLOW_SGI_NAME
    from mlflow.server import app as flask_app

    mlflow_serve = flask_app.view_functions["serve"]
    index = Path(flask_app.static_folder) / "index.html"

    def serve():
        if not index.is_file():  # a source checkout without the built UI: MLflow's own message
            return mlflow_serve()
        html = index.read_text(encoding="utf-8")
        # first thing in <head>: before the page's (deferred) bundle reads the entry
        html = re.sub(r"<head\b[^>]*>", lambda m: m.group(0) + _SEED_TRAINING_VIEW, html, count=1)
        return Response(html, mimetype="text/html", headers={"Cache-Control": "no-cache"})

    flask_app.view_functions["serve"] = serve
    if _MLFLOW_SGI_NAME.get() == "uvicorn":  # MLflow's default server: its FastAPI app wraps the Flask one
        from mlflow.server.fastapi_app import app

        return app
    return flask_app


def mlflow_app_registered() -> bool:
    """Whether ``mlflow server --app-name rnnbench`` is known (rnnbench installed with its entry points)."""
    return any(ep.name == MLFLOW_APP for ep in importlib.metadata.entry_points(group="mlflow.app"))


@lru_cache(maxsize=1)
def environment_tags() -> dict[str, str]:
    """Where a run ran: recorded on every run so results are comparable across machines."""
    import torch  # local: +2-3 s on `import rnnbench.tracking` (report, `rnnbench ui`); a run has it

    commit = _git_commit(short=False)
    tags = {
        f"{TAG}version": __version__,
        f"{TAG}torch": torch.__version__,
        f"{TAG}python": platform.python_version(),
        f"{TAG}threads": str(torch.get_num_threads()),
        f"{TAG}git_commit": commit[:7] if commit != "unknown" else commit,
        # MLflow's own source columns: what ran, and (from rnnbench's own checkout) which commit
        "mlflow.source.name": "rnnbench",
        "mlflow.source.type": "LOCAL",
        "mlflow.user": os.environ.get("USER") or os.environ.get("LOGNAME") or "rnnbench",
    }
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    if torch.cuda.is_available():
        tags[f"{TAG}device_name"] = torch.cuda.get_device_name(0)
        tags[f"{TAG}cuda"] = str(torch.version.cuda)
    else:
        tags[f"{TAG}device_name"] = "cpu"
        tags[f"{TAG}cpu"] = _cpu_model()
    return tags


def _git_commit(short: bool = True) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", *(["--short"] if short else []), "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,  # rnnbench's own checkout, wherever it runs
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class Tracker:
    """Thin layer over MlflowClient for the run layout rnnbench uses."""

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        artifact_root: Path | None = None,
        create: bool = True,
    ):
        _quiet_mlflow()
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri
        check_reachable(tracking_uri)
        try:
            self.client = MlflowClient(tracking_uri)
            exp = self.client.get_experiment_by_name(experiment_name)
            if exp is None and not create:
                raise TrackingError(f"MLflow store {tracking_uri} has no experiment {experiment_name!r}")
            if exp is None:
                location = (artifact_root / experiment_name).resolve().as_uri() if artifact_root else None
                exp_id = self._create_experiment(experiment_name, location)
            else:
                exp_id = exp.experiment_id
            if not exp or exp.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND:
                # MLflow's record of what the experiment is (model development, not GenAI). Databricks'
                # UI opens its view from it; the open-source UI does not read it: there the view
                # comes from `rnnbench ui`'s app (mlflow_ui_app below).
                self.client.set_experiment_tag(exp_id, "mlflow.experimentKind", EXPERIMENT_KIND)
        except RnnbenchError:
            raise
        except Exception as exc:  # unreachable server, bad URI, locked database...
            raise TrackingError(
                f"MLflow tracking store {tracking_uri} is not usable: {first_line(exc)}"
            ) from None
        self.experiment_id = exp_id

    def _create_experiment(self, name: str, location: str | None) -> str:
        """Create it, or take the one another machine created a moment ago (they race at start)."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS" and "already exists" not in str(exc).lower():
                raise
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def describe_experiment(self, text: str) -> None:
        """The experiment's description in the UI (its note): the experiment file, as run."""
        exp = self.client.get_experiment(self.experiment_id)
        note = f"rnnbench experiment. The file it ran, with every default filled in:\n\n```yaml\n{text}```\n"
        if exp.tags.get("mlflow.note.content") != note:
            self.client.set_experiment_tag(self.experiment_id, "mlflow.note.content", note)

    def log_dataset(
        self, run_id: str, name: str, source: str, describe: dict[str, Any], context: str
    ) -> None:
        """The data a run read, as an MLflow dataset input (Datasets column, run page): its name,
        where it comes from, a digest of what the task read and its sizes as the profile."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        profile = json.dumps(describe, sort_keys=True, default=str)
        if len(profile) > 4000:  # MLflow's limit: keep the scalars (sizes, lengths), valid JSON
            scalars = {
                k: v for k, v in describe.items() if isinstance(v, (int, float, str)) and len(str(v)) < 200
            }
            profile = json.dumps(scalars, sort_keys=True, default=str)[:4000]
        digest = hashlib.sha256(f"{name}\n{source}\n{profile}".encode()).hexdigest()[:16]
        source_type = "code" if source.startswith("synthetic") else "local"
        dataset = Dataset(name, digest, source_type, json.dumps({"uri": source}), None, profile[:4000])
        tag = InputTag("mlflow.data.context", context)
        self.client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[tag])])

    def system_metrics(self, run_id: str):
        """CPU, memory, disk and network (GPU with nvidia-ml-py) of this machine, sampled into the
        run's System metrics tab every second while it trains, and the samples of the last,
        unfinished second when it ends; finish() it when done. None if MLflow's monitor cannot
        start here."""
        try:
            monitor = _make_system_monitor(run_id, self.uri)
            monitor.start()
            return monitor
        except Exception:
            return None

    def runs_by_key(self) -> dict[tuple, list]:
        """Every live rnnbench run of the experiment, by (study, stage, trial or seed)."""
        out: dict[tuple, list] = {}
        token = None
        while True:
            page = self.client.search_runs([self.experiment_id], max_results=1000, page_token=token)
            for run in page:
                tags = run.data.tags
                if f"{TAG}stage" in tags:
                    out.setdefault(run_key(tags), []).append(run)
            token = page.token
            if not token:
                return out

    def get_run(self, run_id: str):
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return None
        return (
            run
            if run.info.lifecycle_stage == "active" and run.info.experiment_id == self.experiment_id
            else None
        )

    def start_run(
        self,
        name: str,
        tags: dict[str, Any],
        parent_id: str | None = None,
        start_time: int | None = None,
    ) -> str:
        all_tags = {
            **environment_tags(),
            **{f"{TAG}{k}": str(v) for k, v in tags.items()},
            "mlflow.runName": name,
        }
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, start_time=start_time, run_name=name, tags=all_tags)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(
        self, run_id: str, metrics: dict[str, float], step: int = 0, timestamp: int | None = None
    ) -> None:
        """One batch. With the same (step, timestamp, value) twice, MLflow keeps one point."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000) if timestamp is None else int(timestamp)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i : i + 1000])

    def log_batch(
        self,
        run_id: str,
        metrics: dict[str, float] | None = None,
        tags: dict[str, Any] | None = None,
        timestamp: int | None = None,
        step: int = 0,
        run_name: str | None = None,
    ) -> None:
        """Metrics and tags in one call (one transaction on a SQL store); ``run_name`` renames the
        run (MLflow keeps the name in its ``mlflow.runName`` tag)."""
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000) if timestamp is None else int(timestamp)
        items = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items() if v is not None]
        run_tags = [RunTag(f"{TAG}{k}", str(v)) for k, v in (tags or {}).items()]
        if run_name is not None:
            run_tags.append(RunTag("mlflow.runName", run_name))
        self.client.log_batch(run_id, metrics=items[:1000], tags=run_tags)
        if len(items) > 1000:
            self.log_metrics(run_id, {m.key: m.value for m in items[1000:]}, step, now)

    def rename(self, run_id: str, name: str) -> None:
        self.client.set_tag(run_id, "mlflow.runName", name)  # MLflow keeps a run's name there

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(f"{TAG}{k}", str(v)) for k, v in tags.items()])

    def log_text(self, run_id: str, text: str, filename: str) -> None:
        self.client.log_text(run_id, text, filename)

    def log_file(self, run_id: str, local_path: Path, artifact_dir: str) -> None:
        self.client.log_artifact(run_id, str(local_path), artifact_dir)

    def read_artifact(self, run_id: str, artifact_path: str) -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            return Path(self.client.download_artifacts(run_id, artifact_path, tmp)).read_bytes()

    def has_artifact(self, run_id: str, artifact_path: str) -> bool:
        folder = artifact_path.rpartition("/")[0] or None
        return any(f.path == artifact_path for f in self.client.list_artifacts(run_id, folder))

    def end_run(self, run_id: str, status: str = "FINISHED", end_time: int | None = None) -> None:
        self.client.set_terminated(run_id, status, end_time=end_time)

    def reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def delete_run(self, run_id: str) -> None:
        self.client.delete_run(run_id)


def run_key(tags: dict[str, str]) -> tuple:
    """The identity of an rnnbench run: its ledger coordinates, never its MLflow id."""
    stage = tags.get(f"{TAG}stage")
    number = tags.get(f"{TAG}trial") if stage in ("search", "final") else None
    return (tags.get(f"{TAG}study"), stage, number)


def _make_system_monitor(run_id: str, uri: str):
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class TrialSystemMetrics(SystemMetricsMonitor):
        """MLflow's monitor drops the samples of an unfinished interval, so a trial shorter than
        the interval (every smoke trial) had an empty System metrics tab: publish them at the end.
        And psutil's first CPU reading in a thread is a meaningless 0.0 (its docs): that was the
        only CPU value a short trial showed, and every trial's first. Read it once and discard it."""

        _primed = False

        def collect_metrics(self):
            if not self._primed:  # runs in the monitor's thread, not the training one
                psutil.cpu_percent()
                self._shutdown_event.wait(0.1)
                self._primed = True
            return super().collect_metrics()

        def finish(self):
            running = getattr(self, "_process", None) is not None
            super().finish()
            try:
                if running and any(getattr(m, "_metrics", None) for m in self.monitors):
                    self.publish_metrics(self.aggregate_metrics())
                    self.mlflow_logger.flush()
            except Exception:  # a private detail of MLflow changed: the sampled seconds still stand
                pass

    return TrialSystemMetrics(run_id, sampling_interval=1, tracking_uri=uri)
