"""Shared test fixtures. Tests never touch the network and use one torch thread (CI has 2 cores)."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import train_briefly

os.environ.setdefault("RNNBENCH_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture
def briefly():
    return train_briefly


@pytest.fixture
def shared_data():
    """Path of the real datasets (RNNBENCH_DATA, as CI sets it); skip when absent."""
    from pathlib import Path

    root = os.environ.get("RNNBENCH_DATA")
    if not root or not Path(root).is_dir():
        pytest.skip("RNNBENCH_DATA is not set to the shared datasets")
    return Path(root)
