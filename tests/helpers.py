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

    torch.manual_seed(seed)
    task.setup()
    task.check_architecture(bidirectional=bidirectional)
    hp = {"hidden_size": hidden_size, "dropout": 0.0, **(hparams or {})}
    model = task.build_model(lambda n: Encoder(cell, n, hidden_size, layers, bidirectional), hp)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    device, generator, done = torch.device("cpu"), torch.Generator().manual_seed(seed), 0
    model.train()
    while done < steps:
        carry = None
        for batch in task.batches("train", batch_size, device=device, generator=generator):
            loss, carry = task.training_loss(model, batch, carry)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            done += 1
            if done >= steps:
                break
    model.eval()
    with torch.no_grad():
        scores = task.evaluate(model, "valid", batch_size, device=device)
    return model, scores
