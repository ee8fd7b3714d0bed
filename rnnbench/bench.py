"""``rnnbench bench``: the speed and memory of every cell through the Encoder, next to bare torch.nn.

Every cell runs through :class:`rnnbench.encoder.Encoder`, as training does, and is compared with
bare ``torch.nn`` modules of the same sizes measured in the same run:

- ``nn.LSTM`` for every cell (the common yardstick);
- its *own reference*: the nn module a builtin cell is exactly equal to (``nn.RNN``, ``nn.LSTM``,
  ``nn.GRU``, read from the cell's ``fused_kernel()``), ``nn.LSTM`` for every other cell (peephole,
  plugins).

Method: ``warmup`` untimed rounds, then ``repeat`` rounds; in each round every candidate (cells and
references) runs once forward-only (``no_grad``, eval mode) and once forward+backward, in an order
rotated by one each round, so machine noise lands on all of them alike. Times are medians with their
interquartile range; a ratio is the median of the per-round ratios (paired: both numbers come from
the same round), which cancels most of the noise shared by a round.

Memory, measured once per candidate outside the timed rounds:

- CUDA: peak memory allocated during one forward+backward, above what was allocated before it;
- CPU: there is no peak-allocation counter, and RSS barely moves once the allocator has warmed up,
  so it is the memory the forward pass keeps alive for backward (saved activations, counted once
  per storage; parameters and the input excluded). It is what grows with batch x time and what
  differs between a fused kernel and a per-step loop.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from rnnbench.devices import resolve_device
from rnnbench.encoder import Encoder
from rnnbench.errors import ConfigError, UnknownNameError
from rnnbench.plugins import registry
from rnnbench.saved_memory import recording_saved

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# fused_kernel() mode -> (reference name, nn class, extra constructor arguments)
REFERENCES: dict[str, tuple[str, type[nn.Module], dict[str, Any]]] = {
    "LSTM": ("nn.LSTM", nn.LSTM, {}),
    "GRU": ("nn.GRU", nn.GRU, {}),
    "RNN_TANH": ("nn.RNN", nn.RNN, {"nonlinearity": "tanh"}),
    "RNN_RELU": ("nn.RNN(relu)", nn.RNN, {"nonlinearity": "relu"}),
}
YARDSTICK = "LSTM"
MEMORY_MEASURES = {
    "cuda": "peak CUDA memory allocated during one forward+backward, above the memory allocated before",
    "cpu": "tensors the forward pass keeps for backward (saved activations, once per storage; "
    "parameters and input excluded)",
}


@dataclass(frozen=True)
class BenchSettings:
    cells: tuple[str, ...] = ()  # empty: every registered cell
    batch: int = 64
    seq_len: int = 100
    input_size: int = 256
    hidden: int = 256
    layers: int = 1
    bidirectional: bool = False
    device: str = "auto"
    dtype: str = "float32"
    repeat: int = 10
    warmup: int = 2
    threads: int | None = None
    padded: str | None = None  # a task's dataset (or task, or task:dataset) whose lengths to follow
    batches: int = 100  # padded mode: batches drawn from that task's training epoch

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


@dataclass
class Candidate:
    """One thing timed: a cell through the Encoder, or a bare nn reference."""

    name: str
    kind: str  # "cell" or "reference"
    module: nn.Module | None
    path: str
    source: str = ""
    reference: str = ""  # cells: the name of their own reference
    parameters: int = 0
    error: str | None = None
    forward_s: list[float] = field(default_factory=list)
    train_s: list[float] = field(default_factory=list)
    memory_mb: float | None = None


def select_cells(names: Iterable[str]) -> list[str]:
    """Cell names from repeated and comma-separated options; every registered cell when none given.

    An unknown name is an UnknownNameError (one line, with the closest known name).
    """
    reg = registry()
    chosen: list[str] = []
    for name in (part.strip() for value in names for part in value.split(",")):
        if name and name not in chosen:
            reg.cell(name)  # raises UnknownNameError
            chosen.append(name)
    return chosen or list(reg.cells)


def _checked(
    settings: BenchSettings, positive: tuple[str, ...], non_negative: tuple[str, ...] = ()
) -> tuple[list[str], torch.device, torch.dtype]:
    """Both modes' settings checked (one line each): sizes at least 1, a known dtype and cells, a
    device this machine has; the thread count set. Returns (cells, device, dtype)."""
    for label in positive:
        if getattr(settings, label) < 1:
            raise ConfigError(f"{label} must be >= 1, got {getattr(settings, label)}")
    for label in non_negative:
        if getattr(settings, label) < 0:
            raise ConfigError(f"{label} must be >= 0, got {getattr(settings, label)}")
    if settings.dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {settings.dtype!r}")
    cell_names = select_cells(settings.cells)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    return cell_names, resolve_device(settings.device), DTYPES[settings.dtype]


def run(settings: BenchSettings, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure every selected cell and its references; return the JSON-ready result."""
    if settings.padded is not None:
        return run_padded(settings, progress)
    cell_names, device, dtype = _checked(
        settings, ("batch", "seq_len", "input_size", "hidden", "layers", "repeat"), ("warmup",)
    )
    say = progress or (lambda message: None)

    torch.manual_seed(0)
    cells = [_cell_candidate(name, settings, device, dtype) for name in cell_names]
    modes = [YARDSTICK] + [c.reference for c in cells if c.reference]
    references = [_reference_candidate(mode, settings, device, dtype) for mode in dict.fromkeys(modes)]
    for cell in cells:  # store the reference's display name, not the kernel mode
        cell.reference = REFERENCES[cell.reference or YARDSTICK][0]
    # Each reference is timed right before the cells compared with it: neighbours in time share
    # more of the machine's noise, which the paired ratios then cancel.
    timed_order = [m for r in references for m in [r] + [c for c in cells if c.reference == r.name]]
    candidates = [c for c in timed_order if c.error is None]

    check_fits(settings, settings.batch, settings.seq_len, device, dtype)
    out_size = settings.hidden * (2 if settings.bidirectional else 1)
    with _memory_is_config_error(settings, settings.batch, settings.seq_len):
        x = torch.randn(settings.batch, settings.seq_len, settings.input_size, device=device, dtype=dtype)
        grad = torch.randn(settings.batch, settings.seq_len, out_size, device=device, dtype=dtype)
    timer = _cuda_timer(device) if device.type == "cuda" else _cpu_timer

    say(f"warming up {len(candidates)} modules ({settings.warmup} rounds)")
    for candidate in candidates:
        try:
            for _ in range(settings.warmup):
                _forward_only(candidate.module, x)
                _train_step(candidate.module, x, grad)
            candidate.memory_mb = _memory_mb(candidate.module, x, grad, device)
        except Exception as exc:  # a dtype a kernel lacks, a plugin bug: that row fails, not the run
            candidate.error = _one_line(exc)
    _refuse_if_all_out_of_memory(candidates, settings, settings.batch, settings.seq_len)
    candidates = [c for c in candidates if c.error is None]

    say(f"timing {settings.repeat} interleaved rounds")
    for round_index in range(settings.repeat):
        shift = round_index % max(len(candidates), 1)
        for candidate in candidates[shift:] + candidates[:shift]:
            candidate.forward_s.append(timer(lambda m=candidate.module: _forward_only(m, x)))
            candidate.train_s.append(timer(lambda m=candidate.module: _train_step(m, x, grad)))

    by_name = {r.name: r for r in references}
    return {
        "machine": machine(device),
        "settings": {k: v for k, v in asdict(settings).items() if k != "cells"} | {"cells": cell_names},
        "memory_measure": MEMORY_MEASURES["cuda" if device.type == "cuda" else "cpu"],
        "references": [_row(r, by_name, settings) for r in references],
        "cells": [_row(c, by_name, settings) for c in cells],
    }


def _cell_candidate(name: str, settings: BenchSettings, device, dtype) -> Candidate:
    source = registry().cell(name).source
    try:
        encoder = Encoder(name, settings.input_size, settings.hidden, settings.layers, settings.bidirectional)
        encoder = encoder.to(device=device, dtype=dtype)
    except Exception as exc:  # a plugin cell that cannot be built must not stop the others
        return Candidate(name, "cell", None, "-", source, error=_one_line(exc))
    own = {c.fused_kernel() for c in encoder.cells}
    mode = own.pop() if len(own) == 1 and None not in own else YARDSTICK
    path = f"fused {encoder.fused_mode}" if encoder.fused_mode else "generic"
    return Candidate(name, "cell", encoder, path, source, mode, _count(encoder))


def _reference_candidate(mode: str, settings: BenchSettings, device, dtype) -> Candidate:
    name, cls, extra = REFERENCES[mode]
    module = cls(
        settings.input_size,
        settings.hidden,
        settings.layers,
        batch_first=True,
        bidirectional=settings.bidirectional,
        **extra,
    ).to(device=device, dtype=dtype)
    return Candidate(name, "reference", module, "torch.nn", "torch", parameters=_count(module))


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _forward_only(module: nn.Module, x: Tensor) -> None:
    module.eval()
    with torch.no_grad():
        module(x)


def _train_step(module: nn.Module, x: Tensor, grad: Tensor) -> None:
    module.train()
    out = module(x)[0]
    out.backward(grad)
    for p in module.parameters():
        p.grad = None


def _cpu_timer(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _cuda_timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    """Kernels run asynchronously: time between events on the stream, after a full sync."""

    def timer(fn: Callable[[], None]) -> float:
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0

    return timer


def _memory_mb(module: nn.Module, x: Tensor, grad: Tensor, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        _train_step(module, x, grad)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    saved: dict[int, int] = {}
    module.train()
    with recording_saved([x, *module.parameters()], saved):
        out = module(x)[0]
    out.backward(grad)
    for p in module.parameters():
        p.grad = None
    return sum(saved.values()) / 2**20


def _stats(values: list[float], scale: float = 1.0) -> dict[str, float]:
    q1, median, q3 = np.percentile(np.asarray(values) * scale, [25, 50, 75])
    return {"median": float(median), "q1": float(q1), "q3": float(q3)}


def _row(c: Candidate, references: dict[str, Candidate], settings: BenchSettings) -> dict[str, Any]:
    row: dict[str, Any] = {
        "name": c.name,
        "kind": c.kind,
        "source": c.source,
        "path": c.path,
        "parameters": c.parameters,
    }
    if c.kind == "cell":
        row["reference"] = c.reference
    if c.error is not None:
        return row | {"error": c.error}
    forward, train = _stats(c.forward_s, 1e3), _stats(c.train_s, 1e3)
    ratios = {}
    for name, ref in references.items():
        if ref.error is None and ref.train_s:
            ratios[name] = {
                "forward": _stats([a / b for a, b in zip(c.forward_s, ref.forward_s)]),
                "train": _stats([a / b for a, b in zip(c.train_s, ref.train_s)]),
            }
    return row | {
        "forward_ms": forward,
        "train_ms": train,
        "forward_tokens_per_s": settings.tokens / (forward["median"] / 1e3),
        "train_tokens_per_s": settings.tokens / (train["median"] / 1e3),
        "memory_mb": c.memory_mb,
        "ratios": ratios,
        # raw per-round times, in round order, so anyone can recompute or pair them differently
        "samples_ms": {"forward": [t * 1e3 for t in c.forward_s], "train": [t * 1e3 for t in c.train_s]},
    }


def machine(device: torch.device) -> dict[str, Any]:
    from rnnbench import __version__
    from rnnbench.tracking import _cpu_model

    info = {
        "cpu": _cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "rnnbench": __version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# -- memory --------------------------------------------------------------------------------------
def _needed_bytes(settings: BenchSettings, batch: int, steps: int, dtype) -> int:
    """An estimate of one forward+backward's memory: input, outputs and their gradients,
    and eight hidden-sized activations per step, layer and direction (an LSTM keeps about 7)."""
    directions = 2 if settings.bidirectional else 1
    per_position = 2 * settings.input_size + 2 * settings.hidden * directions
    per_position += 8 * settings.hidden * directions * settings.layers
    return batch * steps * per_position * torch.empty((), dtype=dtype).element_size()


def _available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _does_not_fit(settings: BenchSettings, batch: int, steps: int, detail: str) -> ConfigError:
    return ConfigError(
        f"batch {batch} x {steps} steps (input {settings.input_size}, hidden {settings.hidden}, "
        f"{settings.layers} layer(s)) does not fit in memory ({detail}): give a smaller --batch, "
        "--seq-len or --hidden"
    )


def check_fits(settings: BenchSettings, batch: int, steps: int, device: torch.device, dtype) -> None:
    """Refuse, before allocating, a size whose training step would not fit: on Linux a CPU
    allocation can succeed and the process be killed later, with no message."""
    needed, available = _needed_bytes(settings, batch, steps, dtype), _available_bytes(device)
    if available is not None and needed > available:
        raise _does_not_fit(
            settings,
            batch,
            steps,
            f"about {needed / 2**30:,.1f} GiB needed, {available / 2**30:,.1f} GiB available",
        )


def _is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate memory" in text


class _memory_is_config_error:
    """An allocation failure inside the block is the size's fault: one line and exit 2."""

    def __init__(self, settings: BenchSettings, batch: int, steps: int):
        self.settings, self.batch, self.steps = settings, batch, steps

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, traceback):
        if exc is not None and _is_out_of_memory(exc):
            raise _does_not_fit(self.settings, self.batch, self.steps, _one_line(exc)[:200]) from None
        return False


def _refuse_if_all_out_of_memory(candidates, settings: BenchSettings, batch: int, steps: int) -> None:
    errors = [c.error for c in candidates if c.error is not None]
    if candidates and len(errors) == len(candidates) and all(_is_out_of_memory(Exception(e)) for e in errors):
        raise _does_not_fit(settings, batch, steps, errors[0][:200])


# -- padded batches ---------------------------------------------------------------------------------
def padded_task(name: str, *, seed: int = 0):
    """The task and dataset ``--padded`` names, set up: a dataset (``sst2``), a task (its synthetic
    data) or ``task:dataset``. A task whose batches are full-length is refused (ConfigError)."""
    from rnnbench.plugins import registry

    tasks = registry().tasks
    task_name, _, dataset = name.partition(":")
    if not dataset:
        if name in tasks:
            task_name, dataset = name, "synthetic"
        else:
            owners = [t for t, entry in tasks.items() if name in entry.cls.datasets and name != "synthetic"]
            if not owners:
                known = {d for entry in tasks.values() for d in entry.cls.datasets} | set(tasks)
                raise UnknownNameError("task or dataset for --padded", name, known)
            task_name, dataset = owners[0], name
    task = registry().task(task_name).cls(dataset, seed=seed)
    task.setup()
    probe = next(
        iter(task.batches("train", 4, device=torch.device("cpu"), generator=torch.Generator())), None
    )
    if probe is None or probe.lengths is None:
        raise ConfigError(
            f"--padded {name}: task {task_name!r} gives full-length batches (no lengths); the padded "
            "mode needs a task whose texts vary in length, e.g. --padded sst2 or --padded conll2003"
        )
    return task


def padded_lengths(task, batch: int, count: int, seed: int = 0) -> tuple[list[Tensor], float]:
    """The lengths of the first ``count`` training batches of ``task`` as an epoch gives them to
    training (length-bucketed, shuffled with a generator seeded with ``seed``), and the padding
    share of the whole epoch, to compare with the sample's."""
    generator = torch.Generator().manual_seed(seed)
    chosen, real, positions = [], 0, 0
    for b in task.batches("train", batch, device=torch.device("cpu"), generator=generator):
        if len(chosen) < count:
            chosen.append(b.lengths.clone())
        real, positions = real + int(b.lengths.sum()), positions + b.inputs.shape[0] * b.inputs.shape[1]
    return chosen, 1 - real / max(positions, 1)


@dataclass
class PaddedCandidate:
    name: str
    module: nn.Module | None
    path: str
    source: str = ""
    error: str | None = None
    samples: dict[str, list[float]] = field(default_factory=dict)  # kind -> per-round seconds


def run_padded(settings: BenchSettings, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Training steps on padded batches whose lengths follow a task's, against full-length batches
    of the same rows and (rounded) real tokens, per cell; on the fused cells also the packed path.

    Each round times, for every cell in a rotated order, every padded batch, its full-length twin
    (alternating which goes first) and, for fused cells, the same padded batch packed: the three
    see the same moments of the machine. tokens/s counts real tokens only; a ratio is the median
    of the per-round ratios."""
    cell_names, device, dtype = _checked(
        settings, ("batch", "input_size", "hidden", "layers", "repeat", "batches")
    )
    say = progress or (lambda message: None)
    task = padded_task(settings.padded)
    lengths, epoch_padding = padded_lengths(task, settings.batch, settings.batches)
    longest = max(int(lens.max()) for lens in lengths)
    check_fits(settings, settings.batch, longest, device, dtype)

    torch.manual_seed(0)
    out_size = settings.hidden * (2 if settings.bidirectional else 1)
    with _memory_is_config_error(settings, settings.batch, longest):
        padded, full = [], []
        for lens in lengths:
            rows, steps = len(lens), int(lens.max())
            padded.append(
                (
                    torch.randn(rows, steps, settings.input_size, device=device, dtype=dtype),
                    lens,
                    torch.randn(rows, steps, out_size, device=device, dtype=dtype),
                )
            )
            even = max(1, round(int(lens.sum()) / rows))  # the same rows and (rounded) tokens, no padding
            full.append(
                (
                    torch.randn(rows, even, settings.input_size, device=device, dtype=dtype),
                    None,
                    torch.randn(rows, even, out_size, device=device, dtype=dtype),
                )
            )
    tokens = {
        "padded": sum(int(lens.sum()) for lens in lengths),
        "full": sum(x.shape[0] * x.shape[1] for x, _, _ in full),
    }
    tokens["packed"] = tokens["padded"]
    padded_positions = sum(x.shape[0] * x.shape[1] for x, _, _ in padded)
    timer = _cuda_timer(device) if device.type == "cuda" else _cpu_timer

    candidates = []
    for name in cell_names:
        source = registry().cell(name).source
        try:
            encoder = Encoder(
                name, settings.input_size, settings.hidden, settings.layers, settings.bidirectional
            )
            encoder = encoder.to(device=device, dtype=dtype)
        except Exception as exc:
            candidates.append(PaddedCandidate(name, None, "-", source, _one_line(exc)))
            continue
        path = (
            f"fused {encoder.fused_mode}, {encoder.padded_path(padded[0][0])}"
            if encoder.fused_mode
            else "generic"
        )
        candidates.append(PaddedCandidate(name, encoder, path, source))

    def kinds(c: PaddedCandidate) -> list[str]:
        return ["padded", "full", "packed"] if c.module.fused_mode else ["padded", "full"]

    def step(c: PaddedCandidate, kind: str, batch) -> float:
        c.module.padded = "packed" if kind == "packed" else "auto"
        x, lens, grad = batch
        return timer(lambda: _train_step_lengths(c.module, x, lens, grad))

    def one_round(c: PaddedCandidate, record: bool) -> None:
        spent = dict.fromkeys(kinds(c), 0.0)
        for i, (p, f) in enumerate(zip(padded, full)):
            order = kinds(c) if i % 2 == 0 else kinds(c)[::-1]
            for kind in order:
                spent[kind] += step(c, kind, f if kind == "full" else p)
        if record:
            for kind, seconds in spent.items():
                c.samples.setdefault(kind, []).append(seconds)

    say(
        f"{settings.padded}: {len(lengths)} batches of {settings.batch}, {tokens['padded']:,} real tokens, "
        f"{1 - tokens['padded'] / padded_positions:.1%} padding; warming up ({settings.warmup} rounds)"
    )
    for c in candidates:
        if c.error is None:
            try:
                for _ in range(settings.warmup):
                    one_round(c, False)
            except Exception as exc:
                c.error = _one_line(exc)
    _refuse_if_all_out_of_memory(candidates, settings, settings.batch, longest)
    timed = [c for c in candidates if c.error is None]
    say(f"timing {settings.repeat} interleaved rounds")
    for round_index in range(settings.repeat):
        shift = round_index % max(len(timed), 1)
        for c in timed[shift:] + timed[:shift]:
            one_round(c, True)
    for c in timed:
        c.module.padded = "auto"

    rows = []
    for c in candidates:
        row: dict[str, Any] = {"name": c.name, "source": c.source, "path": c.path}
        if c.error is not None:
            rows.append(row | {"error": c.error})
            continue
        per_round = {k: np.array([tokens[k] / t for t in v]) for k, v in c.samples.items()}
        row["tokens_per_s"] = {k: _stats(list(v)) for k, v in per_round.items()}
        row["ratio_to_full"] = {
            k: _stats(list(per_round[k] / per_round["full"])) for k in per_round if k != "full"
        }
        row["samples_s"] = c.samples
        rows.append(row)
    return {
        "mode": "padded",
        "machine": machine(device),
        "load_average": list(_load_average()),
        "settings": {k: v for k, v in asdict(settings).items() if k != "cells"} | {"cells": cell_names},
        "lengths": {
            "task": task.name,
            "dataset": task.dataset,
            "batches": len(lengths),
            "tokens": tokens,
            "padding": 1 - tokens["padded"] / padded_positions,
            "epoch_padding": epoch_padding,
            "mean_length": tokens["padded"] / sum(len(lens) for lens in lengths),
            "longest": longest,
        },
        "cells": rows,
    }


def _train_step_lengths(module: nn.Module, x: Tensor, lengths: Tensor | None, grad: Tensor) -> None:
    module.train()
    module(x, lengths)[0].backward(grad)
    for p in module.parameters():
        p.grad = None


def _load_average() -> tuple[float, float, float]:
    import os

    try:
        return tuple(round(v, 2) for v in os.getloadavg())
    except OSError:
        return (float("nan"),) * 3


def print_padded_table(result: dict[str, Any], console=None) -> None:
    from rich.table import Table

    from rnnbench.console import table_console

    s, m, lengths = result["settings"], result["machine"], result["lengths"]
    where = m.get("device_name") or f"{m['cpu']}, {m['threads']} thread{'s' if m['threads'] != 1 else ''}"
    direction = "bidirectional" if s["bidirectional"] else "unidirectional"
    load = ", ".join(f"{v:.2f}" for v in result["load_average"])
    table = Table(
        title=(
            f"{lengths['dataset']} lengths ({lengths['task']}): {lengths['batches']} training batches of "
            f"{s['batch']}, mean length {lengths['mean_length']:.1f}, longest {lengths['longest']}, "
            f"padding {lengths['padding']:.1%} (whole epoch {lengths['epoch_padding']:.1%}); "
            f"input {s['input_size']}, hidden {s['hidden']}, "
            f"{s['layers']} layer(s) {direction}, {s['dtype']} on {m['device']} ({where}), torch {m['torch']}"
        ),
        caption=(
            f"training (forward+backward) tokens/s, real tokens only, median of {s['repeat']} interleaved "
            "rounds; full: the same rows at their batch's mean length, no padding; a ratio is the median "
            f"of the per-round ratios; packed: the fused kernel on packed sequences. Load average {load}"
        ),
    )
    for column in [
        "cell",
        "path",
        "padded tok/s",
        "full tok/s",
        "padded / full",
        "packed tok/s",
        "packed / full",
    ]:
        table.add_column(column, justify="left" if column in ("cell", "path") else "right", overflow="fold")
    for row in result["cells"]:
        if "error" in row:
            table.add_row(row["name"], row["path"], f"[red]failed: {row['error']}[/red]")
            continue
        tps, ratio = row["tokens_per_s"], row["ratio_to_full"]
        packed = "packed" in tps
        table.add_row(
            row["name"],
            row["path"],
            f"{tps['padded']['median']:,.0f}",
            f"{tps['full']['median']:,.0f}",
            f"{ratio['padded']['median']:.2f}",
            f"{tps['packed']['median']:,.0f}" if packed else "-",
            f"{ratio['packed']['median']:.2f}" if packed else "-",
        )
    (console or table_console()).print(table)


# -- output ------------------------------------------------------------------------------------------
def _ratio(row: dict[str, Any], reference: str, key: str) -> str:
    ratio = row.get("ratios", {}).get(reference)
    return f"{ratio[key]['median']:.2f}" if ratio else "-"


def _megabytes(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value >= 1 else f"{value:.3f}"


def print_table(result: dict[str, Any], console=None) -> None:
    """The result as a rich table: references first, then the cells."""
    from rich.table import Table

    if result.get("mode") == "padded":
        return print_padded_table(result, console)
    from rnnbench.console import table_console

    s, m = result["settings"], result["machine"]
    yardstick = REFERENCES[YARDSTICK][0]
    direction = "bidirectional" if s["bidirectional"] else "unidirectional"
    where = m.get("device_name") or f"{m['cpu']}, {m['threads']} thread{'s' if m['threads'] != 1 else ''}"
    table = Table(
        title=(
            f"batch {s['batch']} x {s['seq_len']} steps, input {s['input_size']}, hidden {s['hidden']}, "
            f"{s['layers']} layer(s) {direction}, {s['dtype']} on {m['device']} ({where}), torch {m['torch']}"
        ),
        caption=(
            f"median of {s['repeat']} interleaved rounds (IQR: interquartile range of fwd+bwd); a ratio is the "
            f"median of the per-round ratios, fwd+bwd unless marked fwd. MiB: {result['memory_measure']}"
        ),
    )
    columns = ["cell", "path", "fwd ms", "fwd+bwd ms", "IQR", "train tok/s", "MiB", f"x {yardstick}"]
    for column in columns + ["own ref", "x ref fwd", "x ref"]:
        justify = "left" if column in ("cell", "path", "own ref") else "right"
        table.add_column(column, justify=justify, overflow="fold")
    for row in result["references"] + result["cells"]:
        if "error" in row:
            table.add_row(row["name"], row["path"], f"[red]failed: {row['error']}[/red]")
            continue
        fwd, train = row["forward_ms"], row["train_ms"]
        own = row.get("reference", "")
        table.add_row(
            row["name"],
            row["path"],
            f"{fwd['median']:.2f}",
            f"{train['median']:.2f}",
            f"{train['q1']:.2f}-{train['q3']:.2f}",
            f"{row['train_tokens_per_s']:,.0f}",
            _megabytes(row["memory_mb"]),
            _ratio(row, yardstick, "train"),
            own,
            _ratio(row, own, "forward") if own else "",
            _ratio(row, own, "train") if own else "",
        )
    (console or table_console()).print(table)


def log_to_mlflow(result: dict[str, Any], tracking_uri: str, artifact_root=None) -> str:
    """One MLflow run (experiment ``rnnbench-bench``): settings as params, per-cell numbers as metrics."""
    import re

    from rnnbench.tracking import Tracker

    tracker = Tracker(tracking_uri, "rnnbench-bench", artifact_root=artifact_root)
    s = result["settings"]
    steps = f"padded-{s['padded']}" if result.get("mode") == "padded" else f"t{s['seq_len']}"
    name = f"bench-b{s['batch']}-{steps}-h{s['hidden']}-{s['dtype']}"
    run_id = tracker.start_run(name, {"stage": "bench", "device": result["machine"]["device"]})
    machine_params = {f"machine.{k}": v for k, v in result["machine"].items()}
    tracker.log_params(run_id, {**s, "cells": ",".join(s["cells"]), **machine_params})
    metrics: dict[str, float] = {}
    if result.get("mode") == "padded":
        for row in result["cells"]:
            if "error" in row:
                continue
            key = re.sub(r"[^A-Za-z0-9_.\-/ ]", "_", row["name"])
            for kind, stats in row["tokens_per_s"].items():
                metrics[f"{key}.{kind}_train_tokens_per_s"] = stats["median"]
            for kind, stats in row["ratio_to_full"].items():
                metrics[f"{key}.{kind}_to_full"] = stats["median"]
    for row in result.get("references", []) + ([] if result.get("mode") == "padded" else result["cells"]):
        if "error" in row:
            continue
        key = re.sub(r"[^A-Za-z0-9_.\-/ ]", "_", row["name"])
        metrics[f"{key}.forward_ms"] = row["forward_ms"]["median"]
        metrics[f"{key}.train_ms"] = row["train_ms"]["median"]
        metrics[f"{key}.train_tokens_per_s"] = row["train_tokens_per_s"]
        if row["memory_mb"] is not None:
            metrics[f"{key}.memory_mb"] = row["memory_mb"]
        for ref, ratio in row["ratios"].items():
            ref_key = re.sub(r"[^A-Za-z0-9_]", "_", ref)
            metrics[f"{key}.train_ratio_{ref_key}"] = ratio["train"]["median"]
            metrics[f"{key}.forward_ratio_{ref_key}"] = ratio["forward"]["median"]
    tracker.log_metrics(run_id, metrics)
    tracker.log_text(run_id, json.dumps(result, indent=2), "bench.json")
    tracker.end_run(run_id)
    return run_id
