"""An exported model installs and serves where this checkout is not: a fresh venv that has only
mlflow (from the registry) runs `mlflow models predict` with MLflow's own environment manager,
which installs the model's requirements.txt (its wheels of rnnbench and the plugins included)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import run_cli

PLUGIN_EXPERIMENT = """\
name: srv
cells: [indrnn]
tasks:
  - {name: parity, dataset: synthetic}
fixed: {hidden_size: 8}
budget: {trials: 0, epochs: 1, steps_per_epoch: 2}
final: {seeds: 1}
"""


def _installed(*names: str) -> bool:
    try:
        for name in names:
            importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _export_plugin_model(root: Path) -> Path:
    (root / "srv.yaml").write_text(PLUGIN_EXPERIMENT)
    run = run_cli(["run", "srv.yaml"], root / "home", root)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    out = root / "model"
    done = run_cli(
        ["export", "srv", "parity-synthetic/indrnn-1L-uni", "--out", str(out)], root / "home", root
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.mark.skipif(
    not _installed("rnnbench-indrnn", "rnnbench-parity"), reason="example plugins not installed"
)
def test_an_exported_plugin_model_ships_wheels_its_requirements_name(tmp_path: Path):
    out = _export_plugin_model(tmp_path)
    lines = (out / "requirements.txt").read_text().split()
    wheels = [line for line in lines if line.endswith(".whl")]
    names = {Path(w).name.split("-")[0] for w in wheels}
    assert names == {"rnnbench", "rnnbench_indrnn", "rnnbench_parity"}
    for wheel in wheels:  # relative to the model folder, and there
        assert not Path(wheel).is_absolute() and zipfile.is_zipfile(out / wheel)
    torch_pin = next(line for line in lines if line.startswith("torch=="))
    assert "+" not in torch_pin  # no local version label (+cpu): PyPI serves none
    assert not any(line.startswith("rnnbench==") for line in lines)


def _from_a_folder(name: str) -> bool:
    from rnnbench.portable import _direct_url, _distribution

    return "dir_info" in (_direct_url(_distribution(name)) or {})


@pytest.mark.skipif(not _from_a_folder("rnnbench"), reason="rnnbench is not installed from a folder")
def test_the_wheel_is_built_once_per_source_and_tagged_with_its_digest(tmp_path: Path, monkeypatch):
    from packaging.utils import parse_wheel_filename

    from rnnbench import portable

    monkeypatch.setenv(portable.CACHE_ENV, str(tmp_path / "cache"))
    portable.cache_dir.cache_clear()
    try:
        first = portable.requirements_for(wheel_dir=Path("extra_files"))
        (wheel,) = first.wheels
        _, version, build, _ = parse_wheel_filename(wheel.name)
        assert build and str(version) == importlib.metadata.version("rnnbench")
        assert f"extra_files/{wheel.name}" in first.lines and "torch==" in " ".join(first.lines)

        def no_build(*args, **kwargs):
            raise AssertionError("built again")

        monkeypatch.setattr(portable.subprocess, "run", no_build)
        assert portable.requirements_for(wheel_dir=Path("extra_files")).wheels == [wheel]
    finally:
        portable.cache_dir.cache_clear()


@pytest.mark.skipif(not _from_a_folder("rnnbench"), reason="rnnbench is not installed from a folder")
def test_a_wheel_that_cannot_be_built_stops_an_export_but_not_a_logged_model(monkeypatch):
    from rnnbench import portable

    def broken(dist, source, digest):
        raise OSError("no space left on device")

    monkeypatch.setattr(portable, "_build_wheel", broken)
    with pytest.raises(portable.PortabilityError, match="cannot ship rnnbench as a wheel.*no space"):
        portable.requirements_for(strict=True)
    lenient = portable.requirements_for(strict=False)
    assert f"rnnbench=={importlib.metadata.version('rnnbench')}" in lenient.lines and not lenient.wheels
    assert len(lenient.notes) == 1 and "no space" in lenient.notes[0]


@pytest.mark.slow
@pytest.mark.skipif(
    not _installed("rnnbench-indrnn", "rnnbench-parity"), reason="example plugins not installed"
)
def test_an_exported_plugin_model_serves_from_a_fresh_venv(tmp_path: Path):
    """Minutes: a venv with mlflow alone, then `mlflow models serve` builds the model's own venv
    (torch included) with the default virtualenv manager and answers the serving example, and
    `mlflow models predict` does the same with the uv manager."""
    if not shutil.which("pyenv"):
        pytest.skip("MLflow's virtualenv manager needs pyenv on PATH")
    out = _export_plugin_model(tmp_path)
    outside = tmp_path / "elsewhere"  # no checkout, no rnnbench on sys.path
    outside.mkdir()
    venv = outside / "venv"
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}}
    env |= {
        "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        "MLFLOW_ENV_ROOT": str(outside / "envs"),  # a model environment of its own, built here
    }
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, cwd=outside, env=env)
    mlflow_version = importlib.metadata.version("mlflow")
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", f"mlflow=={mlflow_version}"],
        check=True, cwd=outside, env=env, capture_output=True, timeout=1800,
    )  # fmt: skip
    installed = time.monotonic()
    port = _free_port()
    log = (outside / "serve.log").open("w")
    server = subprocess.Popen(
        [str(venv / "bin" / "mlflow"), "models", "serve", "-m", str(out), "--env-manager", "virtualenv",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=outside, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        body = (out / "serving_input_example.json").read_bytes()
        answer = _post_when_up(f"http://127.0.0.1:{port}", body, server, deadline=time.monotonic() + 1800)
        print(f"venv with mlflow: {installed - started:.0f} s; model env + first answer: "
              f"{time.monotonic() - installed:.0f} s")  # fmt: skip
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)
        log.close()
    assert answer is not None, (outside / "serve.log").read_text()[-3000:]
    served = np.asarray(answer["predictions"])
    import mlflow.pyfunc

    here = mlflow.pyfunc.load_model(str(out))
    expected = np.asarray(here.predict(here.input_example))
    assert served.shape == expected.shape and np.allclose(served, expected, atol=1e-5)

    # `predict` builds a new environment in a temporary folder each time, Python included: with
    # the virtualenv manager pyenv compiles it from python.org; uv finds the installed one.
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "uv"],
        check=True,
        cwd=outside,
        env=env,
        capture_output=True,
    )
    if env.get("PIP_FIND_LINKS"):  # uv reads no pip configuration
        env["UV_FIND_LINKS"] = env["PIP_FIND_LINKS"]
    predictions, started = outside / "predictions.json", time.monotonic()
    done = subprocess.run(
        [str(venv / "bin" / "mlflow"), "models", "predict", "-m", str(out), "-i",
         str(out / "serving_input_example.json"), "-t", "json", "-o", str(predictions), "--env-manager", "uv"],
        cwd=outside, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    print(f"mlflow models predict --env-manager uv: {time.monotonic() - started:.0f} s")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    predicted = np.asarray(json.loads(predictions.read_text())["predictions"])
    assert np.allclose(predicted, expected, atol=1e-5)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post_when_up(url: str, body: bytes, server: subprocess.Popen, deadline: float) -> dict | None:
    """POST ``body`` to /invocations once /ping answers; None if the server exits or time is up."""
    import urllib.error
    import urllib.request

    while time.monotonic() < deadline and server.poll() is None:
        try:
            urllib.request.urlopen(f"{url}/ping", timeout=5).close()
        except (urllib.error.URLError, OSError):
            time.sleep(3)
            continue
        request = urllib.request.Request(
            f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())
    return None
