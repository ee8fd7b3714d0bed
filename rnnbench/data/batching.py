"""Length-bucketed batches of variable-length sequences.

Training batches come from large shuffled chunks sorted by length, so a batch holds sequences of
similar length (little padding) while the data order still changes every epoch. Evaluation sorts
the whole split once: the order does not matter for a score, and padding is smallest.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

BUCKET_BATCHES = 50  # batches per sorted chunk: enough to group lengths, small enough to stay random
T = TypeVar("T")
_END = object()


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


def prefetch(items: Iterable[T], device: torch.device | str, limit: int | None = None) -> Iterator[T]:
    """Iterate ``items`` (batches made on ``device``) with the next one loading while this one trains.

    On CUDA the next item is produced on a side stream, so its host-to-device copies (pinned and
    asynchronous, see :func:`to_device`) overlap the current training step; the compute stream waits
    for them with an event, never the host, and each tensor is marked as used by the compute stream
    so the allocator cannot hand its memory out early. ``limit``: never take more than that many
    items, so a round that stops after ``limit`` steps leaves the rest of a shared stream of batches
    (and a task's resumable position) untouched. Anywhere else: ``iter(items)`` itself, at no cost.
    """
    if torch.device(device).type != "cuda":
        return iter(items)
    return _prefetch_cuda(
        iter(items) if limit is None else itertools.islice(items, limit), torch.device(device)
    )


def _prefetch_cuda(items: Iterator[T], device: torch.device) -> Iterator[T]:
    compute = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)

    def load() -> Any:
        side.wait_stream(compute)  # whatever the compute stream wrote before is visible to the copies
        with torch.cuda.stream(side):
            return next(items, _END)

    upcoming = load()
    while upcoming is not _END:
        compute.wait_stream(side)  # an event on the GPU: the host does not wait
        for tensor in tensors_in(upcoming):
            if tensor.is_cuda:  # CPU lengths and indices stay on the host
                tensor.record_stream(compute)
        current, upcoming = upcoming, load()  # the next copies are queued before this step's kernels
        yield current


def tensors_in(item: Any) -> Iterator[Tensor]:
    """Every tensor in a batch (dataclass fields, dicts, tuples, lists), recursively."""
    if isinstance(item, Tensor):
        yield item
    elif isinstance(item, dict):
        for value in item.values():
            yield from tensors_in(value)
    elif isinstance(item, (tuple, list)):
        for value in item:
            yield from tensors_in(value)
    elif hasattr(item, "__dataclass_fields__"):
        for name in item.__dataclass_fields__:
            yield from tensors_in(getattr(item, name))
