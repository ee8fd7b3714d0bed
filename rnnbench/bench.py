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

from rnnbench.encoder import Encoder
from rnnbench.errors import ConfigError
from rnnbench.plugins import registry

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


def run(settings: BenchSettings, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure every selected cell and its references; return the JSON-ready result."""
    from rnnbench.trainer import resolve_device

    for label in ("batch", "seq_len", "input_size", "hidden", "layers", "repeat"):
        if getattr(settings, label) < 1:
            raise ConfigError(f"{label} must be >= 1, got {getattr(settings, label)}")
    if settings.warmup < 0:
        raise ConfigError(f"warmup must be >= 0, got {settings.warmup}")
    if settings.dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {settings.dtype!r}")
    cell_names = select_cells(settings.cells)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = resolve_device(settings.device)
    dtype = DTYPES[settings.dtype]
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

    x = torch.randn(settings.batch, settings.seq_len, settings.input_size, device=device, dtype=dtype)
    out_size = settings.hidden * (2 if settings.bidirectional else 1)
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
    excluded = {_storage_key(t)[0] for t in [x, *module.parameters()]}
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        key, nbytes = _storage_key(t)
        if key not in excluded:
            saved[key] = max(saved.get(key, 0), nbytes)
        return t

    module.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)[0]
    out.backward(grad)
    for p in module.parameters():
        p.grad = None
    return sum(saved.values()) / 2**20


def _storage_key(t: Tensor) -> tuple[int, int]:
    """(identity, bytes) of the memory behind a tensor; views of one buffer share it."""
    try:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # opaque tensors (mkldnn) have no storage
        return id(t), t.numel() * t.element_size()


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
    name = f"bench-b{s['batch']}-t{s['seq_len']}-h{s['hidden']}-{s['dtype']}"
    run_id = tracker.start_run(name, {"stage": "bench", "device": result["machine"]["device"]})
    machine_params = {f"machine.{k}": v for k, v in result["machine"].items()}
    tracker.log_params(run_id, {**s, "cells": ",".join(s["cells"]), **machine_params})
    metrics: dict[str, float] = {}
    for row in result["references"] + result["cells"]:
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
