"""Open the MLflow UI of a run home in headless Chromium and screenshot what a user checks first:
a final seed's run (Datasets, Logged models, parameters), its Model metrics and System metrics tabs, its logged
model's page, and its study's parent run. Fails when one of those shows up empty.

    pip install -e ".[browser]" -c constraints.txt     # playwright (the Python package only)
    apt-get install chromium                            # or set CHROMIUM=/path/to/chrome
    python scripts/screenshot_mlflow.py runs smoke --out reports/smoke/mlflow

Starts `mlflow server` on 127.0.0.1 (a free port) over the run home's store, and stops it after.
Exit status 1 when an expected section is empty, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from screenshot_report import chromium, missing  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server(home: Path, port: int) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{(home / 'mlflow.db').resolve()}",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("error: mlflow server exited at start") from None
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("error: mlflow server did not answer in 120 s")


def pick(home: Path, experiment: str):
    """(experiment id, a final seed's run, its logged model, its parent run id)."""
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
    return exp.experiment_id, run, model, run.data.tags.get("mlflow.parentRunId")


def shoot(url: str, exp_id: str, run, model, parent_id: str, out: Path) -> list[str]:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    run_page = f"{url}/#/experiments/{exp_id}/runs/{run.info.run_id}"
    dataset = next(iter(run.inputs.dataset_inputs)).dataset.name if run.inputs.dataset_inputs else "?"
    ml = "?workflowType=machine_learning"  # MLflow 3's "Model training" view, not its GenAI one
    pages = [  # (file, address, text that must be on the page)
        ("child-run.png", run_page + ml, [dataset, model.name, "seed"]),
        ("child-model-metrics.png", f"{run_page}/model-metrics{ml}", ["valid_"]),
        ("child-system-metrics.png", f"{run_page}/system-metrics{ml}", ["cpu_utilization_percentage"]),
        (
            "logged-model.png",
            f"{url}/#/experiments/{exp_id}/models/{model.model_id}{ml}",
            [run.info.run_name],
        ),
        ("parent-run.png", f"{url}/#/experiments/{exp_id}/runs/{parent_id}{ml}", ["test_", "best_valid"]),
    ]
    problems = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium())
        for name, address, expected in pages:
            page = browser.new_page(viewport={"width": 1500, "height": 1100})  # a fresh load per page
            page.goto(address, wait_until="load")  # never "networkidle": the run page polls
            text = ""
            for _ in range(20):  # sections render as their requests return: up to 20 s
                page.wait_for_timeout(1000)
                text = page.inner_text("body")
                if all(want in text for want in expected):
                    break
            page.wait_for_timeout(1500)  # let charts finish drawing before the picture
            problems += [f"{name}: {want!r} not shown" for want in expected if want not in text]
            page.screenshot(path=str(out / name), full_page=True)
            print(f"{out / name}  ({address})")
            page.close()
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
    exp_id, run, model, parent_id = pick(args.home, args.experiment)
    port = _free_port()
    server = _server(args.home, port)
    try:
        problems = shoot(f"http://127.0.0.1:{port}", exp_id, run, model, parent_id, args.out)
    finally:
        server.terminate()
        server.wait(timeout=30)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
