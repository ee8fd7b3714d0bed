"""Test helpers shared by the task tests (imported as tests.helpers; pytest puts the repo root on sys.path)."""

from __future__ import annotations

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
