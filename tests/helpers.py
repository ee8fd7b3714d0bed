"""Test helpers shared by test modules (imported as tests.helpers; pytest puts the repo root on sys.path)."""

from __future__ import annotations

from pathlib import Path

import torch


def train_briefly(
    task,
    cell: str = "lstm",
    *,
    steps: int = 200,
    hidden_size: int = 32,
    layers: int = 1,
    bidirectional: bool = False,
    lr: float = 1e-2,
    batch_size: int = 32,
    seed: int = 0,
    hparams: dict | None = None,
):
    """Train ``task`` for ``steps`` optimizer steps through the Task contract; return (model, valid scores).

    A deliberately plain loop, independent of rnnbench.trainer, so task tests check the task alone.
    """
    from rnnbench.encoder import Encoder
    from rnnbench.testing import _train_briefly as _train

    torch.manual_seed(seed)
    task.setup()
    task.check_architecture(bidirectional=bidirectional)
    hp = {"hidden_size": hidden_size, "dropout": 0.0, **(hparams or {})}
    model = task.build_model(lambda n: Encoder(cell, n, hidden_size, layers, bidirectional), hp)
    # the same loop the plugin-task contract check trains with (rnnbench.testing)
    _train(task, model, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    model.eval()
    with torch.no_grad():
        scores = task.evaluate(model, "valid", batch_size, device=torch.device("cpu"))
    return model, scores


def run_cli(args: list[str], home, cwd=None, timeout: int = 300, **env):
    """``rnnbench ARGS`` in a child process with RNNBENCH_HOME=home and one thread (the
    subprocess form every end-to-end test uses); extra keyword arguments become env variables."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "RNNBENCH_HOME": str(home), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        [sys.executable, "-m", "rnnbench.cli", *args], env=env, cwd=cwd, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


TINY_EXPERIMENT = """\
name: {name}
cells: [gru]
tasks:
  - name: memory
    options: {{problem: adding, seq_len: 8, train_size: {train_size}, valid_size: 64, test_size: 64}}
search:
{search}  lr: {{type: float, low: 1.0e-3, high: 1.0e-2, log: true}}
{fixed}budget: {{trials: {trials}, epochs: {epochs}}}
final: {{seeds: {seeds}}}
pruner: {{name: none}}
"""


def write_tiny_experiment(
    folder: Path, name: str, trials=3, epochs=1, seeds=2, train_size=128, *, hidden_size: int | None = None
) -> Path:
    """``folder/name.yaml``: one GRU on the adding problem, a run of seconds (the end-to-end tests').
    lr is searched, and hidden_size too (4 to 8) unless it is given, then fixed at that."""
    search = "" if hidden_size else "  hidden_size: {type: int, low: 4, high: 8}\n"
    fixed = f"fixed: {{hidden_size: {hidden_size}}}\n" if hidden_size else ""
    path = folder / f"{name}.yaml"
    path.write_text(
        TINY_EXPERIMENT.format(
            name=name,
            search=search,
            fixed=fixed,
            trials=trials,
            epochs=epochs,
            seeds=seeds,
            train_size=train_size,
        )
    )
    return path


def stopped_child(pid: int, timeout: float) -> int:
    """The first child process of ``pid`` found stopped (state T: a ``_sigstop`` fault point hit),
    within ``timeout`` seconds (Linux /proc)."""
    import time
    from pathlib import Path

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            try:
                state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:  # it ended in between
                continue
            if state == "T":
                return int(child)
        time.sleep(0.1)
    raise TimeoutError(f"no child of {pid} stopped within {timeout} s")
