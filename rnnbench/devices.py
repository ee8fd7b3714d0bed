"""The one device resolver: a device name (auto, cpu, cuda, cuda:N, mps) to the torch device this
machine runs it on, or one line saying why it cannot."""

from __future__ import annotations

import torch

from rnnbench.errors import ConfigError
from rnnbench.experiment import check_device


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA where there is one, else the CPU; any other name must exist here."""
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} asked for, but MPS is not available here")
    return device
