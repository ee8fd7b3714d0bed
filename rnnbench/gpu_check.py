"""``rnnbench bench --check``: is the CUDA path right on this machine? One command for a GPU box.

The machines rnnbench is built on have no GPU, so its CUDA code is written to be right by
construction and checked here wherever a GPU appears. On CUDA, in order:

1. fused: every builtin cell that equals nn.RNN/LSTM/GRU runs cuDNN through the Encoder, on one flat
   weight buffer (no copy, no warning per call), and equals its own step equations (the autograd loop
   over ``forward_projected``) in float64: outputs, final states, every gradient; padded, 2 layers,
   bidirectional;
2. generic: the whole-sequence Function (hand-written backward) equals the autograd loop, and passes
   ``torch.autograd.gradcheck`` against finite differences, on the GPU;
3. a tiny sweep (Optuna + MLflow, ``rnnbench run``'s own code) in bf16 finishes with every trial complete;
4. the Trainer's own training steps (fp32, bf16, and fp16 with its gradient scaler; prefetched pinned
   batches, forward, backward, clipping, the fused optimizer) run under ``torch.cuda.set_sync_debug_mode("error")``: any host-device sync inside raises;
5. the ratio table of every cell against cuDNN (``rnnbench bench``).

Without CUDA it says so in one line and exits 0. Each check is a function of the device, so CI runs
the ones that mean something on CPU (1, 2, 3 in fp32, the step of 4 without the sync assertion).
"""

from __future__ import annotations

import itertools
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.backends.cudnn.rnn as cudnn_rnn

from rnnbench import bench
from rnnbench.data.batching import prefetch
from rnnbench.encoder import CUDNN_MODES, Encoder

FUSED_CELLS = {"rnn": {"nonlinearity": "tanh"}, "rnn-relu": {"nonlinearity": "relu"}, "lstm": {}, "gru": {}}
SEQUENCE_CELLS = ("lstm", "peephole")
TIGHT = {"rtol": 1e-7, "atol": 1e-9}  # float64: only summation order differs


def _cell_name(case: str) -> str:
    return case.split("-")[0]


def _loss(out, finals, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)).sum()
    for state in finals:
        for part in state if isinstance(state, tuple) else (state,):
            loss = (
                loss + (part * torch.randn(part.shape, generator=gen, dtype=part.dtype).to(part.device)).sum()
            )
    return loss


def _compare_paths(encoder: Encoder, device, paths: tuple[dict, dict], label: str) -> None:
    """Run ``encoder`` on the two path settings, same input; assert same outputs, states, gradients."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 9, encoder.input_size, generator=gen, dtype=torch.float64)
    x = x.to(device).requires_grad_()
    lengths = torch.tensor([9, 4, 1, 7])  # on the CPU, as every task gives them
    results = []
    for setting in paths:
        for key, value in setting.items():
            setattr(encoder, key, value)
        out, finals = encoder(x, lengths)
        grads = torch.autograd.grad(_loss(out, finals), [x, *encoder.parameters()])
        flat = [p for s in finals for p in (s if isinstance(s, tuple) else (s,))]
        results.append([out, *flat, *grads])
    names = ["output"] + [f"final state {i}" for i in range(len(results[0]) - 1)]
    for name, got, want in zip(names, *results):
        torch.testing.assert_close(got, want, **TIGHT, msg=lambda m, n=name: f"{label}: {n}: {m}")


def check_fused(device: torch.device) -> list[str]:
    """cuDNN (CPU: oneDNN/ATen) equals the cells' step equations; on CUDA, on one flat weight buffer."""
    lines = []
    if device.type == "cuda":
        for mode, value in CUDNN_MODES.items():
            assert cudnn_rnn.get_cudnn_mode(mode) == value, f"cuDNN mode of {mode}: {value} assumed"
    for case, hparams in FUSED_CELLS.items():
        torch.manual_seed(0)
        encoder = Encoder(_cell_name(case), 5, 6, 2, True, **hparams).to(device=device, dtype=torch.float64)
        assert encoder.fused_mode is not None, f"{case} does not take the fused path"
        if device.type == "cuda":
            assert encoder.weights_are_flat(), f"{case}: weights not in one buffer after .to(cuda)"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # cuDNN's "not part of single contiguous chunk" warning
            mode = encoder.fused_mode
            reference = {"fused_mode": None, "sequence_path": False}  # autograd over forward_projected
            _compare_paths(encoder, device, ({"fused_mode": mode}, reference), f"fused {case}")
        lines.append(
            f"fused {case}: {mode} equals the step equations (float64, padded, 2 layers, bidirectional)"
        )
    return lines


def check_generic(device: torch.device) -> list[str]:
    """The sequence Function equals autograd's loop and passes gradcheck, on ``device``."""
    lines = []
    for name in SEQUENCE_CELLS:
        torch.manual_seed(0)
        encoder = Encoder(name, 5, 6, 2, True, fused=False).to(device=device, dtype=torch.float64)
        assert encoder.sequence_path, f"{name} does not take the sequence path"
        _compare_paths(
            encoder, device, ({"sequence_path": True}, {"sequence_path": False}), f"sequence {name}"
        )
        small = Encoder(name, 2, 3, fused=False).to(device=device, dtype=torch.float64)
        x = torch.randn(2, 4, 2, dtype=torch.float64, device=device, requires_grad=True)
        names = [n for n, _ in small.named_parameters()]

        def function(x, *weights, small=small, names=names):
            out, ((_, c),) = torch.func.functional_call(
                small, dict(zip(names, weights)), (x, torch.tensor([4, 2]))
            )
            return out, c

        weights = [p.detach().clone().requires_grad_() for p in small.parameters()]
        assert torch.autograd.gradcheck(function, (x, *weights)), f"gradcheck of sequence {name}"
        lines.append(f"sequence {name}: hand-written backward equals autograd and passes gradcheck")
    return lines


def tiny_sweep(device: torch.device, precision: str) -> list[str]:
    """`rnnbench run` on a two-cell sentiment experiment (synthetic data) at ``precision``."""
    # local: runner, experiment, trainer and the sentiment task cost +2.1 s together on
    # `import rnnbench.gpu_check`, which `rnnbench bench --check` without CUDA pays for one line
    from rnnbench import experiment as experiment_mod
    from rnnbench import runner

    text = f"""
name: gpu-check-{precision}
cells: [lstm, peephole]
tasks: [{{name: sentiment, dataset: synthetic}}]
search: {{lr: {{type: float, low: 1.0e-3, high: 1.0e-2, log: true}}}}
fixed: {{batch_size: 16, hidden_size: 16}}
budget: {{trials: 1, epochs: 1, steps_per_epoch: 3}}
final: {{seeds: 0}}
device: {device.type}
precision: {precision}
"""
    with tempfile.TemporaryDirectory() as home:
        plan = runner.prepare(experiment_mod.parse(text), home=Path(home))
        summary = runner.start(plan)
    lines = []
    for row in summary["studies"]:
        assert row["complete"] == 1 and not row["failed"], f"{row['study']}: {row}"
        lines.append(f"sweep {row['study']} ({precision}): 1 trial complete, valid {row['best_valid']:.3f}")
    return lines


def training_steps(device: torch.device, precision: str, *, forbid_sync: bool) -> list[str]:
    """A few of the Trainer's own steps (``trainer.train_step``: autocast, gradient scaler, clipping,
    the fused optimizer on CUDA) per path (fused lstm, sequence peephole, autograd gru) on padded
    sentiment batches; with ``forbid_sync`` (CUDA) any host-device sync inside a step raises."""
    from rnnbench.tasks.sentiment import SentimentTask  # local: see tiny_sweep
    from rnnbench.trainer import make_optimizer, precision_tools, train_step

    task = SentimentTask("synthetic")
    task.setup()
    lines = []
    for cell, options in (("lstm", {}), ("peephole", {}), ("gru", {"fused": False})):
        torch.manual_seed(0)

        def make(n: int, cell=cell, options=options) -> Encoder:
            return Encoder(cell, n, 32, 2, True, **options)

        model = task.build_model(make, {"hidden_size": 32, "dropout": 0.1}).to(device)
        hp = {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0}
        optimizer = make_optimizer(model.parameters(), hp, device)
        autocast, scaler = precision_tools(precision, device)
        train = itertools.islice(task.batches("train", 16, device=device, generator=torch.Generator()), 4)
        batches = iter(prefetch(train, device))

        def step(batch, model=model, optimizer=optimizer, autocast=autocast, scaler=scaler):
            loss, _, _ = train_step(task, model, batch, None, optimizer, autocast, scaler, 1.0)
            return loss.detach()

        loss = step(next(batches))  # warm-up: allocations, cuDNN plans
        # The guard also covers fetching the next batch (padding, pinning, the asynchronous copy).
        with _sync_forbidden() if forbid_sync else _nothing():
            for batch in batches:
                loss = step(batch)
        finite = bool(torch.isfinite(loss))
        assert finite, f"{cell}: loss {float(loss)}"
        where = "no host-device sync inside" if forbid_sync else "sync not checked off CUDA"
        lines.append(f"train steps {cell} ({precision}, padded, prefetched): {where}")
    return lines


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _sync_forbidden:
    def __enter__(self):
        torch.cuda.set_sync_debug_mode("error")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(0)
        return False


def run_check(echo: Callable[[str], None] = print) -> int:
    """The whole check; returns the exit code (0 also when there is no CUDA to check)."""
    if not torch.cuda.is_available():
        why = "this torch has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        echo(f"rnnbench bench --check: nothing to check, {why} (torch {torch.__version__}); exit 0")
        return 0
    device = torch.device("cuda")
    echo(
        f"checking {torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    )
    for step in (
        lambda: check_fused(device),
        lambda: check_generic(device),
        lambda: training_steps(device, "bf16", forbid_sync=True),
        lambda: training_steps(device, "fp16", forbid_sync=True),
        lambda: training_steps(device, "fp32", forbid_sync=True),
        lambda: tiny_sweep(device, "bf16"),
    ):
        for line in step():
            echo(f"  ok  {line}")
    result = bench.run(bench.BenchSettings(device="cuda", repeat=10), progress=echo)
    bench.print_table(result)
    echo("all CUDA checks passed")
    return 0
