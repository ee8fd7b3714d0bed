"""MLflow: one experiment per experiment name, a parent run per study, a child run per trial/seed.

Uses MlflowClient with explicit run ids (no global active run), so parent links hold in any
process or thread. Metrics go in one ``log_batch`` call per epoch.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from rnnbench.errors import RnnbenchError

TAG = "rnnbench."  # prefix of our own tags


def tracking_uri_for(home: Path) -> str:
    """The embedded default store: an absolute sqlite URI under the run home."""
    return f"sqlite:///{(home / 'mlflow.db').resolve()}"


def _quiet_mlflow() -> None:
    import logging

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # mlflow sets its logger's level when imported (from this variable), so a level set before is lost
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


@lru_cache(maxsize=1)
def environment_tags() -> dict[str, str]:
    """Where a run ran: recorded on every run so results are comparable across machines."""
    import torch

    from rnnbench import __version__

    tags = {
        f"{TAG}version": __version__,
        f"{TAG}torch": torch.__version__,
        f"{TAG}python": platform.python_version(),
        f"{TAG}threads": str(torch.get_num_threads()),
        f"{TAG}git_commit": _git_commit(),
    }
    if torch.cuda.is_available():
        tags[f"{TAG}device_name"] = torch.cuda.get_device_name(0)
        tags[f"{TAG}cuda"] = str(torch.version.cuda)
    else:
        tags[f"{TAG}device_name"] = "cpu"
        tags[f"{TAG}cpu"] = _cpu_model()
    return tags


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=os.getcwd(),
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

    def __init__(self, tracking_uri: str, experiment_name: str, artifact_root: Path | None = None):
        _quiet_mlflow()
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri
        try:
            self.client = MlflowClient(tracking_uri)
            exp = self.client.get_experiment_by_name(experiment_name)
            if exp is None:
                location = (artifact_root / experiment_name).resolve().as_uri() if artifact_root else None
                exp_id = self.client.create_experiment(experiment_name, artifact_location=location)
            else:
                exp_id = exp.experiment_id
        except RnnbenchError:
            raise
        except Exception as exc:  # unreachable server, bad URI, locked database...
            raise RnnbenchError(f"MLflow tracking store {tracking_uri} is not usable: {exc}") from None
        self.experiment_id = exp_id

    def find_run(self, **tags: str):
        """The one active run with these rnnbench tags, or None."""
        clause = " and ".join(f"tags.`{TAG}{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([self.experiment_id], filter_string=clause, max_results=10)
        return runs[0] if runs else None

    def start_run(self, name: str, tags: dict[str, Any], parent_id: str | None = None) -> str:
        all_tags = {
            **environment_tags(),
            **{f"{TAG}{k}": str(v) for k, v in tags.items()},
            "mlflow.runName": name,
        }
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i : i + 1000])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(f"{TAG}{k}", str(v)) for k, v in tags.items()])

    def log_text(self, run_id: str, text: str, filename: str) -> None:
        self.client.log_text(run_id, text, filename)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def delete_run(self, run_id: str) -> None:
        self.client.delete_run(run_id)

    def close_stale_runs(self) -> int:
        """Runs still RUNNING from a killed process: mark them KILLED (called before workers start)."""
        runs = self.client.search_runs(
            [self.experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=5000
        )
        for run in runs:
            if run.data.tags.get(f"{TAG}stage") in ("search", "final"):
                self.set_tags(run.info.run_id, {"status": "interrupted", "failure_reason": "killed"})
                self.end_run(run.info.run_id, "KILLED")
        return len(runs)
