"""Peephole forward+backward against ``nn.LSTM``, side by side in one process (issue 27).

Both modules are built as ``rnnbench bench`` builds them (the peephole cell through the
``Encoder``, ``nn.LSTM`` bare, batch-first) and timed as it times them (one forward, one backward
of a fixed gradient, parameter gradients dropped). Within a round the two alternate, in an order
flipped each round; a run's ratio is the median of its per-round ratios (paired: both times come
from the same round, so noise the round shares cancels). Every run prints its ratio beside the
load average at its end, so a figure measured on a loaded machine says so.

``--busy-core`` starts a separate process that spins on one core for the whole measurement (the
"another job on the second core" case); it is stopped at the end.

    python benchmarks/peephole_speed.py --threads 2                 # 5 runs x 20 rounds
    python benchmarks/peephole_speed.py --threads 1
    python benchmarks/peephole_speed.py --threads 2 --busy-core
    python benchmarks/peephole_speed.py --threads 2 --json          # one JSON document as well
    python benchmarks/peephole_speed.py --threads 2 --one-chain     # and the batch split turned off

Targets (issue 27): at most 1.1 x nn.LSTM at 1 and at 2 threads in every run on an idle machine;
at most 1.3 x with a busy core.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from rnnbench.cells import sequence
from rnnbench.encoder import Encoder

SPIN = "while True:\n    pass\n"


def _train_step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    start = time.perf_counter()
    out = module(x)[0]
    out.backward(grad)
    for p in module.parameters():
        p.grad = None
    return time.perf_counter() - start


class _OneChain(nn.Module):
    """The same encoder with the sequence Function's batch split turned off (one loop, the kernels
    spread over the threads): what the cell ran before the chains."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x):
        chain_count = sequence.chain_count
        sequence.chain_count = lambda cell, xp: 1
        try:
            return self.encoder(x)
        finally:
            sequence.chain_count = chain_count


def _build(cell: str, args) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    modules = {
        "nn.LSTM": nn.LSTM(args.input_size, args.hidden, 1, batch_first=True),
        cell: Encoder(cell, args.input_size, args.hidden, 1, False),
    }
    if args.one_chain:
        modules[f"{cell} 1 chain"] = _OneChain(modules[cell])
    for module in modules.values():
        module.train()
    return modules


def measure(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    modules = _build(args.cell, args)
    names = list(modules)
    x = torch.randn(args.batch, args.seq_len, args.input_size)
    grad = torch.randn(args.batch, args.seq_len, args.hidden)
    for _ in range(args.warmup):
        for module in modules.values():
            _train_step(module, x, grad)
    runs = []
    for run in range(args.runs):
        times: dict[str, list[float]] = {name: [] for name in names}
        for round_index in range(args.rounds):
            order = names if round_index % 2 == 0 else names[::-1]
            for name in order:
                times[name].append(_train_step(modules[name], x, grad))
        ratios = [a / b for a, b in zip(times[args.cell], times["nn.LSTM"])]
        one = f"{args.cell} 1 chain"
        row = {
            "run": run + 1,
            "threads": args.threads,
            "busy_core": args.busy_core,
            "nn_lstm_ms": statistics.median(times["nn.LSTM"]) * 1e3,
            "cell_ms": statistics.median(times[args.cell]) * 1e3,
            "ratio": statistics.median(ratios),
            "ratio_q1": _quantile(ratios, 0.25),
            "ratio_q3": _quantile(ratios, 0.75),
            "loadavg": os.getloadavg(),
        }
        if one in times:
            row["one_chain_ratio"] = statistics.median(a / b for a, b in zip(times[one], times["nn.LSTM"]))
        runs.append(row)
        _print_row(row, args.cell, first=run == 0)
    return runs


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _print_row(row: dict, cell: str, first: bool) -> None:
    extra = "one_chain_ratio" in row
    if first:
        print(
            f"| run | threads | busy core | nn.LSTM ms | {cell} ms | {cell} x nn.LSTM (IQR) |"
            + (" 1 chain x nn.LSTM |" if extra else "")
            + " load average 1/5/15 |",
            flush=True,
        )
        print("|---:|---:|---|---:|---:|---:|" + ("---:|" if extra else "") + "---|", flush=True)
    load = "/".join(f"{v:.2f}" for v in row["loadavg"])
    print(
        f"| {row['run']} | {row['threads']} | {'yes' if row['busy_core'] else 'no'} | {row['nn_lstm_ms']:.1f} | "
        f"{row['cell_ms']:.1f} | {row['ratio']:.3f} ({row['ratio_q1']:.2f}-{row['ratio_q3']:.2f}) |"
        + (f" {row['one_chain_ratio']:.3f} |" if extra else "")
        + f" {load} |",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=20, help="paired rounds per run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=100)
    parser.add_argument("--input-size", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--cell", default="peephole")
    parser.add_argument(
        "--busy-core", action="store_true", help="spin a separate process on one core meanwhile"
    )
    parser.add_argument(
        "--one-chain",
        action="store_true",
        help="also time the cell with the batch split off (one loop, kernels over the threads)",
    )
    parser.add_argument("--json", action="store_true", help="also print the runs as one JSON document")
    args = parser.parse_args(argv)

    spinner = None
    if args.busy_core:
        spinner = subprocess.Popen([sys.executable, "-c", SPIN])
        time.sleep(0.5)
    try:
        runs = measure(args)
    finally:
        if spinner is not None:
            spinner.terminate()
            spinner.wait()
    ratios = [r["ratio"] for r in runs]
    print(
        f"\n{args.cell} x nn.LSTM, {args.threads} thread(s){', busy core' if args.busy_core else ''}: "
        f"median of runs {statistics.median(ratios):.3f}, worst {max(ratios):.3f}, best {min(ratios):.3f} "
        f"(torch {torch.__version__})"
    )
    if args.json:
        print(json.dumps({"runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
