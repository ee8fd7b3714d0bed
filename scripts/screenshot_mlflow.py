"""Open the MLflow UI of a run home the way a user does, in headless Chromium, and screenshot each step:
`rnnbench ui`'s printed address → the experiment → a study's parent run → a final seed's run (Overview, then
its Model metrics and System metrics tabs) → its logged model → the experiment's Models tab. Every step is a
click, as a person would make it: no address is typed after the first, none carries ?workflowType=.
Fails when a page shows MLflow's GenAI view (its "Training runs", "Evaluation runs", "Agent versions"...)
or when a section a user checks first is empty.

    pip install -e ".[browser]" -c constraints.txt     # playwright (the Python package only)
    apt-get install chromium                            # or set CHROMIUM=/path/to/chrome
    python scripts/screenshot_mlflow.py runs smoke --out reports/smoke/mlflow

Starts `rnnbench ui` on 127.0.0.1 (a free port) over the run home, in a fresh browser (nothing remembered
from an earlier visit), and stops it after. Exit status 1 when a page is in the GenAI view or an expected
section is empty, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from screenshot_report import chromium, missing  # noqa: E402

# Shown only in MLflow 3's GenAI view (sidebar, Overview page, the Models tab's title there): never in
# its "Model training" view. ("Traces" is in both: a tab of the training view's run page and sidebar.)
GENAI_MARKERS = (
    "Training runs",
    "Evaluation runs",
    "Agent versions",
    "Detect Issues",
    "Observability",
    "Judges",
    "Prompts & versions",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(home: Path, port: int, log: Path, timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """`rnnbench ui --home HOME --port PORT` in its own session: (the process, the address it prints)
    once the server answers. Its output goes to LOG."""
    with open(log, "wb") as sink:
        ui = subprocess.Popen(
            [sys.executable, "-m", "rnnbench.cli", "ui", "--home", str(home), "--port", str(port)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    address = None
    while time.monotonic() < deadline:
        if address is None and (
            found := re.search(r"MLflow UI for \S+ at (\S+)", log.read_text(errors="replace"))
        ):
            address = found.group(1)
        if address is not None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    return ui, address
            except OSError:
                pass
        if ui.poll() is not None:
            raise SystemExit(
                f"error: rnnbench ui exited at start:\n{log.read_text(errors='replace')[-2000:]}"
            )
        time.sleep(0.5)
    stop_ui(ui)
    raise SystemExit(f"error: the MLflow UI did not answer in {timeout:.0f} s")


def stop_ui(ui: subprocess.Popen) -> None:
    """SIGTERM, as a closed terminal would: `rnnbench ui` ends its server's whole process group."""
    if ui.poll() is None:
        ui.send_signal(signal.SIGTERM)
        try:
            ui.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait()


def pick(home: Path, experiment: str):
    """(a final seed's run, its logged model, its parent run, the newest logged model) of EXPERIMENT
    in HOME."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{(home / 'mlflow.db').resolve()}")
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"error: no experiment {experiment!r} in {home}")
    models = mlflow.search_logged_models(experiment_ids=[exp.experiment_id], output_format="list")
    if not models:
        raise SystemExit(f"error: experiment {experiment!r} has no logged model: run it to the end")
    # the longest-running seed: system metrics are sampled every second, so a run shorter than
    # that has none to show
    runs = {r.info.run_id: r for r in mlflow.search_runs([exp.experiment_id], output_format="list")}
    with_run = [m for m in models if m.source_run_id in runs]

    def duration(m) -> int:
        info = runs[m.source_run_id].info
        return (info.end_time or 0) - (info.start_time or 0)

    model = max(with_run or models, key=duration)
    run = mlflow.get_run(model.source_run_id)
    parent_id = run.data.tags.get("mlflow.parentRunId")
    if parent_id is None:
        raise SystemExit(f"error: run {run.info.run_name!r} has no parent run")
    newest = max(models, key=lambda m: m.creation_timestamp or 0)  # the Models list shows it first
    return run, model, mlflow.get_run(parent_id), newest


def click_through(
    address: str,
    experiment: str,
    parent: tuple[str, str],
    child: tuple[str, str],
    model: tuple[str, str],
    out: Path,
    expect: dict[str, list[str]] | None = None,
) -> list[str]:
    """From ADDRESS, click experiment → PARENT run → CHILD run (its tabs) → its logged MODEL → the
    experiment's Models tab, screenshotting each page into OUT; PARENT, CHILD and MODEL are (name, id).
    Problems found (empty when clean): a page in the GenAI view, a click that leads elsewhere, or one of
    EXPECT[step] (texts) missing from that step's page."""
    from playwright.sync_api import sync_playwright

    expect = expect or {}
    (parent_name, parent_id), (child_name, child_id), (model_name, model_id) = parent, child, model
    out.mkdir(parents=True, exist_ok=True)
    steps = [  # (screenshot, what to click to get there, where it leads, texts that must show)
        ("01-experiments.png", None, "#/experiments", [experiment]),
        ("02-experiment.png", ("link", experiment, 0), "#/experiments/", [parent_name]),
        ("03-parent-run.png", ("link", parent_name, 0), f"/runs/{parent_id}", ["Child runs", child_name]),
        ("04-child-run.png", ("link", child_name, 0), f"/runs/{child_id}", [model_name]),
        ("05-child-model-metrics.png", ("tab", "Model metrics", 0), f"/runs/{child_id}/model-metrics", []),
        ("06-child-system-metrics.png", ("tab", "System metrics", 0), f"/runs/{child_id}/system-metrics", []),
        ("07-child-run-again.png", ("tab", "Overview", 0), f"/runs/{child_id}", [model_name]),
        # the run's "Logged models" table: its last link to the model (the metrics table's come first)
        ("08-logged-model.png", ("link", model_name, -1), f"/models/{model_id}", [child_name]),
        # newest first and paged: the model above may be pages down in a full run (165 models)
        ("09-experiment-models.png", ("link", "Models", 0), "/models", []),
    ]
    problems = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium())
        page = browser.new_page(
            viewport={"width": 1500, "height": 1100}
        )  # a fresh profile: nothing remembered
        page.goto(address, wait_until="load")  # never "networkidle": the run page polls
        for name, click, leads_to, base in steps:
            wanted = base + expect.get(name, [])
            if click is not None:
                role, label, index = click
                try:
                    page.get_by_role(role, name=label, exact=True).nth(index).click(timeout=30_000)
                except Exception as exc:  # playwright's TimeoutError: nothing to click there
                    problems.append(
                        f"{name}: no {role} {label!r} to click on {page.url} ({type(exc).__name__})"
                    )
                    page.screenshot(path=str(out / name), full_page=True)
                    break
            text = ""
            for _ in range(30):  # sections render as their requests return: up to 30 s
                page.wait_for_timeout(1000)
                text = page.inner_text("body")
                if leads_to in page.url.split("?")[0] and all(want in text for want in wanted):
                    break
            page.wait_for_timeout(1500)  # let charts (and any late sidebar) finish drawing
            text = page.inner_text("body")
            genai = [m for m in GENAI_MARKERS if m in text]
            if "workflowType=genai" in page.url:
                genai.append("workflowType=genai in its address")
            if genai:
                problems.append(f"{name}: MLflow's GenAI view at {page.url}: {', '.join(map(repr, genai))}")
            if leads_to not in page.url.split("?")[0]:
                problems.append(f"{name}: the click led to {page.url}, not …{leads_to}")
            problems += [f"{name}: {want!r} not shown at {page.url}" for want in wanted if want not in text]
            page.screenshot(path=str(out / name), full_page=True)
            print(f"{out / name}  ({page.url})")
        browser.close()
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("home", type=Path, help="a run home (holds mlflow.db)")
    parser.add_argument("experiment", help="experiment name")
    parser.add_argument("--out", type=Path, default=Path("mlflow-screenshots"))
    args = parser.parse_args()
    if problem := missing(args.home / "mlflow.db", "run an experiment first"):
        print(problem, file=sys.stderr)
        return 2
    run, model, parent, newest = pick(args.home, args.experiment)
    dataset = next(iter(run.inputs.dataset_inputs)).dataset.name if run.inputs.dataset_inputs else None
    expect = {  # what a user checks first on each page
        "03-parent-run.png": ["test_", "best_valid"],
        "04-child-run.png": ["seed", *([dataset] if dataset else [])],
        "05-child-model-metrics.png": ["valid_"],
        "06-child-system-metrics.png": ["cpu_utilization_percentage"],
        "09-experiment-models.png": [newest.name],
    }
    with tempfile.TemporaryDirectory() as scratch:
        ui, address = start_ui(args.home, _free_port(), Path(scratch) / "rnnbench-ui.log")
        try:
            problems = click_through(
                address,
                args.experiment,
                (parent.info.run_name, parent.info.run_id),
                (run.info.run_name, run.info.run_id),
                (model.name, model.model_id),
                args.out,
                expect,
            )
        finally:
            stop_ui(ui)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
