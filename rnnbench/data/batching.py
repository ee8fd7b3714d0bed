"""Length-bucketed batches of variable-length sequences.

Training batches come from large shuffled chunks sorted by length, so a batch holds sequences of
similar length (little padding) while the data order still changes every epoch. Evaluation sorts
the whole split once: the order does not matter for a score, and padding is smallest.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

BUCKET_BATCHES = 50  # batches per sorted chunk: enough to group lengths, small enough to stay random


def bucketed_index_batches(
    lengths: Tensor, batch_size: int, *, generator: torch.Generator | None = None
) -> list[Tensor]:
    """Example indices of each batch. Shuffled with ``generator``; a fixed length order without."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if generator is None:
        return list(torch.argsort(lengths, stable=True).split(batch_size))
    batches: list[Tensor] = []
    for chunk in torch.randperm(len(lengths), generator=generator).split(batch_size * BUCKET_BATCHES):
        batches.extend(chunk[torch.argsort(lengths[chunk], stable=True)].split(batch_size))
    # Shuffle the batches too, or every epoch would walk each chunk from short to long.
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def pad_batch(sequences: Sequence[Tensor], index: Tensor, pad_value: int = 0) -> tuple[Tensor, Tensor]:
    """``sequences[index]`` padded to ``[B, T_max]`` with ``pad_value``, and their lengths ``[B]``."""
    chosen = [sequences[i] for i in index.tolist()]
    lengths = torch.tensor([len(s) for s in chosen], dtype=torch.long)
    return pad_sequence(chosen, batch_first=True, padding_value=pad_value), lengths


def padded_batches(
    sequences: Sequence[Tensor],
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    pad_value: int = 0,
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Yield ``(index, padded [B, T], lengths [B])`` over ``sequences`` in bucketed batches.

    ``index`` lets a caller pad parallel sequences (tags, features) of the same examples alike.
    """
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    for index in bucketed_index_batches(lengths, batch_size, generator=generator):
        padded, batch_lengths = pad_batch(sequences, index, pad_value)
        yield index, padded, batch_lengths


def to_device(tensor: Tensor, device: torch.device | str) -> Tensor:
    """``tensor`` on ``device`` without making the host wait.

    CPU -> CUDA: copied through pinned (page-locked) memory with ``non_blocking=True``, which is the
    only case where the copy is asynchronous (from pageable memory it blocks, or is staged through
    a driver buffer); the pinned buffer comes from PyTorch's caching host allocator, which keeps it
    until the copy has finished, so it may be dropped right away. Anything else: ``tensor.to(device)``
    (no copy at all when the tensor is already there, as on CPU).
    """
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
