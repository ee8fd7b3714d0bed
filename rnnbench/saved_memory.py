"""The memory autograd saves for the backward pass, measured the same way by training and by
`rnnbench bench`: each storage once, the largest size it had, parameters and inputs left out."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def storage_key(t: Tensor) -> tuple[int, int]:
    """(identity, bytes) of the memory behind a tensor; views of one buffer share it."""
    try:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # opaque tensors (mkldnn) have no storage
        return id(t), t.numel() * t.element_size()


def storage_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes behind ``tensors``, each storage counted once."""
    return sum(dict(storage_key(t) for t in tensors).values())


def recording_saved(excluded: Iterable[Tensor], saved: dict[int, int]):
    """A context in which every tensor autograd saves is noted in ``saved`` (storage -> bytes),
    except the storages of ``excluded`` (parameters, inputs: they exist anyway)."""
    skip = {storage_key(t)[0] for t in excluded}

    def pack(t: Tensor) -> Tensor:
        key, nbytes = storage_key(t)
        if key not in skip:
            saved[key] = max(saved.get(key, 0), nbytes)
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
