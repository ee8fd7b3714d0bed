"""One configuration, one seed: train, select the best epoch on validation, score test once.

The loop is plain on purpose (nanoGPT style). It adds no host-device sync per step: losses,
gradient norms and the NaN check accumulate on the device and are read every ``sync_every``
steps and at epoch end. Everything observable goes through :class:`Callback`, so the sweep
(pruning) and MLflow (logging) plug in without touching the loop.
"""

from __future__ import annotations

import copy
import math
import os
import random
import time
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

# plugins.get_cell is looked up per call, as the local import did: a test swaps it
from rnnbench import plugins
from rnnbench.data.batching import prefetch
from rnnbench.devices import resolve_device
from rnnbench.encoder import Encoder, parameter_counts
from rnnbench.errors import ConfigError, TrialFailed, UnknownNameError
from rnnbench.experiment import Architecture
from rnnbench.hparams import (
    LR_SCHEDULES,
    OPTIMIZERS,
    TRAINER_HPARAMS,
)
from rnnbench.items import item_frame
from rnnbench.saved_memory import recording_saved, storage_bytes
from rnnbench.stops import CONVERGED
from rnnbench.task import Task, _one_line, declares_items

if TYPE_CHECKING:
    import pandas as pd


class Budget(BaseModel):
    """How long one run may train. Whichever limit comes first ends it."""

    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(10, ge=1)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps in all")
    eval_every: int | None = Field(
        None, ge=1, description="steps between validations (default: once per epoch)"
    )
    steps_per_epoch: int | None = Field(None, ge=1, description="cap an epoch (large datasets)")
    max_minutes: float | None = Field(None, gt=0)
    patience: int | None = Field(None, ge=1, description="early stopping: validations without improvement")
    min_improvement: float = Field(0.0, ge=0.0, description="what counts as an improvement for patience")
    min_improvement_relative: bool = False  # min_improvement is a share of the best value so far

    def step_cap(self, steps_per_epoch: int | None = None) -> int | None:
        """The most optimizer steps a run may take, where the budget says (a schedule decays to it)."""
        per_epoch = self.steps_per_epoch or steps_per_epoch
        by_epochs = self.epochs * per_epoch if per_epoch else None
        return min((c for c in (self.max_steps, by_epochs) if c), default=None)

    def improves(self, value: float, reference: float | None, better) -> bool:
        """Whether ``value`` beats ``reference`` by the minimum improvement (patience's test; the
        best checkpoint takes any strict improvement)."""
        if reference is None:
            return True
        if not better(value, reference):
            return False
        delta = self.min_improvement * (abs(reference) if self.min_improvement_relative else 1.0)
        return abs(value - reference) >= delta


class RunSettings(BaseModel):
    """Where and how a run executes (not tuned)."""

    model_config = ConfigDict(extra="forbid")
    device: str = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    deterministic: bool = False
    eval_batch_size: int | None = Field(None, ge=1)
    sync_every: int = Field(20, ge=1, description="steps between NaN checks / host reads")
    threads: int | None = Field(None, ge=1)


@dataclass
class EpochRecord:
    epoch: int
    metrics: dict[str, float]


@dataclass
class FitResult:
    best_epoch: int
    best_valid: dict[str, float]
    test: dict[str, float] | None
    history: list[EpochRecord]
    parameters: dict[str, Any]
    summary: dict[str, float]
    stop_reason: str
    artifacts: dict[str, str] = field(default_factory=dict)
    model: torch.nn.Module | None = field(default=None, repr=False)  # best-on-validation weights, eval mode
    # per-item outcomes of valid and test (rnnbench.items.item_frame); None: not the final stage, or
    # the task declares no items
    items: pd.DataFrame | None = field(default=None, repr=False)


class Callback:
    """Hooks the trainer calls. Raising from ``on_epoch_end`` (e.g. optuna.TrialPruned) stops the run."""

    def on_fit_start(self, info: dict[str, Any]) -> None: ...

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None: ...

    def on_fit_end(self, result: FitResult) -> None: ...


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def split_hparams(hparams: dict[str, Any], cell_cls: type, task: Task) -> tuple[dict, dict, dict]:
    """Split hyperparameters into (trainer, cell, task) parts; unknown names are an error."""
    cell_names, task_names = set(cell_cls.hparam_names()), set(task.hparam_defaults)
    trainer = dict(TRAINER_HPARAMS)
    cell, task_hp = {}, dict(task.hparam_defaults)
    for key, value in hparams.items():
        if key in TRAINER_HPARAMS:
            trainer[key] = value
        elif key in cell_names:
            cell[key] = value
        elif key in task_names:
            task_hp[key] = value
        else:
            raise UnknownNameError("hyperparameter", key, set(TRAINER_HPARAMS) | cell_names | task_names)
    if trainer["optimizer"] not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {trainer['optimizer']!r}")
    return trainer, cell, task_hp


def build_model(task: Task, arch: Architecture, hparams: dict[str, Any]) -> torch.nn.Module:
    """The model a run with these hyperparameters trains, freshly initialised on the CPU: the
    trainer's, the parameter counter's and a saved model's rebuild are one and the same."""
    hp, cell_hp, task_hp = split_hparams(hparams, plugins.get_cell(arch.cell), task)

    def make_encoder(input_size: int) -> Encoder:
        return Encoder(
            arch.cell,
            input_size,
            int(hp["hidden_size"]),
            arch.layers,
            arch.bidirectional,
            float(hp["dropout"]),
            **cell_hp,
        )

    return task.build_model(make_encoder, {**hp, **task_hp})


def make_optimizer(params, hp: dict[str, Any], device=None) -> torch.optim.Optimizer:
    """The optimizer ``hp`` names. On CUDA, Adam, AdamW and SGD take their fused kernels: one launch
    for all parameters, and with fp16 ``GradScaler.step`` hands them its inf check as a tensor
    instead of reading it on the host (no sync per step). RMSprop has no fused kernel."""
    name, lr, wd = hp["optimizer"], float(hp["lr"]), float(hp["weight_decay"])
    fused = {"fused": True} if device is not None and torch.device(device).type == "cuda" else {}
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, **fused)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, **fused)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=float(hp["momentum"]), **fused)
    return torch.optim.RMSprop(params, lr=lr, weight_decay=wd, momentum=float(hp["momentum"]))


def make_lr_schedule(optimizer: torch.optim.Optimizer, hp: dict[str, Any], cap: int | None):
    """Linear warm-up over ``warmup_steps``, then the rate held (``constant``) or decayed to 0 at
    the step cap (``cosine``, ``linear``); None when the rate never changes. Stepped once per
    optimizer step, so the decay ends exactly at the cap whatever the validation cadence."""
    kind, warmup = hp.get("lr_schedule", "constant"), int(hp.get("warmup_steps", 0))
    if kind not in LR_SCHEDULES:
        raise ConfigError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {kind!r}")
    if kind == "constant" and warmup == 0:
        return None
    if kind != "constant" and cap is None:
        raise ConfigError(
            f"lr_schedule {kind!r} decays to the step cap: give the budget max_steps (or steps_per_epoch)"
        )
    if cap is not None and warmup >= cap:
        raise ConfigError(f"warmup_steps ({warmup}) must be below the step cap ({cap})")

    def factor(step: int) -> float:  # `step` optimizer steps done; the next one uses this factor
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, cap - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def precision_tools(precision: str, device: torch.device):
    """(autocast context, gradient scaler) for ``precision``: fp32 has neither; bf16 autocasts;
    fp16 autocasts and scales the loss (its range is too small for small gradients)."""
    if precision == "fp32":
        return nullcontext(), torch.amp.GradScaler(enabled=False)
    if device.type != "cuda":
        raise ConfigError(f"precision {precision} needs a CUDA device (running on {device})")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype), torch.amp.GradScaler("cuda", enabled=precision == "fp16")


def train_step(task: Task, model, batch, carry, optimizer, autocast, scaler, clip_norm):
    """One optimisation step, as every trial runs it: (loss, gradient norm, carried state), all
    left on the device (reading them would sync)."""
    with autocast:
        loss, carry = task.training_loss(model, batch, carry)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float(clip_norm) if clip_norm else float("inf"))
    scaler.step(optimizer)
    scaler.update()
    return loss, norm, carry


def _batch_stream(task: Task, batch_size: int, device, generator, passes: int):
    """Training batches pass after pass (at most ``passes``), each flagged with whether it
    starts a new pass."""
    for _ in range(passes):
        first = True
        for batch in task.batches("train", batch_size, device=device, generator=generator):
            yield batch, first
            first = False
        if first:
            return  # no batch at all: the round sees zero steps and fails with no_data


class TrainMemory:
    """``train_memory_mib``: the memory this model needs to train, not the worker's (RSS counts the
    interpreter, torch and every dataset: the same ~570 MB for every model).

    - CPU, which has no allocator peak counter: parameters + gradients + optimiser state, plus the
      activations the forward pass saves for backward, each storage counted once (as ``rnnbench
      bench`` does; parameters and the batch itself excluded). Activations are measured on the first
      training batch of each epoch only: a pack hook on every step would cost time.
    - CUDA: the allocator's peak during the epoch's training steps, above what was allocated when
      the run started (so it also holds workspaces and anything the run keeps on the GPU).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.start = torch.cuda.memory_allocated(device) if self.cuda else 0
        self.saved: dict[int, int] = {}

    def epoch_start(self) -> None:
        if self.cuda:  # the peak of training steps only, not of the evaluation before
            torch.cuda.reset_peak_memory_stats(self.device)

    def recording(self, model: torch.nn.Module, batch: Any):
        """Context for one training step's forward pass: records the storages autograd saves."""
        if self.cuda:
            return nullcontext()
        fields = (batch.inputs, batch.targets, batch.lengths, *batch.extra.values())
        data = [t for t in fields if isinstance(t, torch.Tensor)]
        self.saved = {}
        return recording_saved([*model.parameters(), *data], self.saved)

    def epoch_mib(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
        """Read after the epoch's training steps (the CUDA peak is a host-side counter: no sync)."""
        if self.cuda:
            return (torch.cuda.max_memory_allocated(self.device) - self.start) / 2**20
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        persistent = sum(storage_bytes(ts) for ts in (list(model.parameters()), grads, state))
        return (persistent + sum(self.saved.values())) / 2**20


class TimeLimit:
    """A trial's ``max_minutes``, over the whole trial: checked between training steps and between
    the batches evaluation reads, so a task slow only to score cannot run past it (and reaching it
    ends the trial at once, with no further validation)."""

    def __init__(self, minutes: float | None):
        self.minutes = minutes
        self.ends = time.perf_counter() + minutes * 60 if minutes else math.inf

    def check(self) -> None:
        if time.perf_counter() > self.ends:
            raise TrialFailed("time_limit", f"over its limit of {self.minutes:g} minutes per trial")

    @contextmanager
    def covering(self, task: Task):
        """Within this block ``task.batches`` checks the limit before each batch it yields (the
        scores are untouched: the same batches, in the same order)."""
        if self.minutes is None:
            yield
            return
        own = vars(task).get("batches")  # an instance attribute of the task's own, kept as it was
        batches = task.batches

        def checked(*args, **kwargs):
            for batch in batches(*args, **kwargs):
                self.check()
                yield batch

        task.batches = checked
        try:
            yield
        finally:
            if own is None:
                del task.batches
            else:
                task.batches = own


class Trainer:
    """Runs one configuration of one architecture on one task with one seed."""

    def __init__(self, budget: Budget | dict | None = None, settings: RunSettings | dict | None = None):
        try:
            self.budget = budget if isinstance(budget, Budget) else Budget(**(budget or {}))
            self.settings = settings if isinstance(settings, RunSettings) else RunSettings(**(settings or {}))
        except ValidationError as exc:
            raise ConfigError(_one_line(exc)) from None

    def fit(
        self,
        task: Task,
        arch: Architecture,
        hparams: dict[str, Any],
        *,
        seed: int = 0,
        evaluate_test: bool = False,
        callbacks: Sequence[Callback] = (),
        setup_done: bool = False,
    ) -> FitResult:
        settings, budget = self.settings, self.budget
        if settings.threads:
            torch.set_num_threads(settings.threads)
        device = resolve_device(settings.device)
        cell_cls = plugins.get_cell(arch.cell)
        hp, cell_hp, task_hp = split_hparams(hparams, cell_cls, task)
        if not setup_done:
            task.setup()
        task.check_architecture(bidirectional=arch.bidirectional)
        seed_everything(seed, settings.deterministic)
        memory = TrainMemory(device)  # before the model exists: on CUDA its baseline
        model = build_model(task, arch, hparams).to(device)
        encoders = [m for m in model.modules() if isinstance(m, Encoder)]
        params = {
            "total": sum(p.numel() for p in model.parameters()),
            "encoder": parameter_counts(encoders[0]) if encoders else None,
        }
        optimizer = make_optimizer(model.parameters(), hp, device)
        schedule = make_lr_schedule(optimizer, hp, budget.step_cap())
        batch_size, eval_bs = int(hp["batch_size"]), settings.eval_batch_size or int(hp["batch_size"])
        autocast, scaler = precision_tools(self.settings.precision, device)
        generator = torch.Generator().manual_seed(seed)

        info = {
            "parameters": params,
            "device": str(device),
            "data": task.describe(),
            "hparams": {**hp, **cell_hp, **task_hp},
        }
        for cb in callbacks:
            cb.on_fit_start(info)

        primary = task.primary_metric
        history: list[EpochRecord] = []
        best_state, best_epoch, best_valid = None, -1, None
        # patience counts validations since the last one that beat `reference` by min_improvement
        reference, bad_rounds = None, 0
        steps, start, stop_reason = 0, time.perf_counter(), "epochs"
        eval_total = 0.0  # validation time, reported beside training time (a fine cadence costs)
        deadline = TimeLimit(budget.max_minutes)
        eval_tokens: dict[str, int] = {}
        # A round ends in a validation: an epoch (capped at steps_per_epoch), or eval_every
        # steps read from one stream of training batches that runs across epochs.
        stream = None
        if budget.eval_every:
            stream = _batch_stream(task, batch_size, device, generator, passes=budget.epochs)
        for epoch in range(1, (budget.epochs if stream is None else 2**62) + 1):
            model.train()
            loss_sum = torch.zeros((), device=device)
            norm_sum = torch.zeros((), device=device)
            norm_max = torch.zeros((), device=device)
            epoch_steps, epoch_tokens = 0, 0
            if stream is None or epoch == 1:
                carry = None  # an epoch starts fresh; a stream's rounds carry state within a pass
            t0 = time.perf_counter()
            memory.epoch_start()
            if stream is None:
                batches = (
                    (b, False) for b in task.batches("train", batch_size, device=device, generator=generator)
                )
            else:
                batches = stream
            # On CUDA the next batch is copied while this one trains; never more batches than the
            # round can take (a shared stream or a task's resumable position must not lose one).
            caps = (budget.steps_per_epoch, budget.eval_every, budget.max_steps and budget.max_steps - steps)
            batches = prefetch(batches, device, limit=min((c for c in caps if c), default=None))
            for batch, new_pass in batches:
                if new_pass:
                    carry = None  # a new pass over the data: no state carried from the last one
                recording = memory.recording(model, batch) if epoch_steps == 0 else nullcontext()
                with recording:
                    loss, norm, carry = train_step(
                        task, model, batch, carry, optimizer, autocast, scaler, hp["clip_norm"]
                    )
                if schedule is not None:
                    schedule.step()
                loss_sum += loss.detach().float()
                norm_sum += norm.float()
                norm_max = torch.maximum(norm_max, norm.float())
                epoch_steps += 1
                steps += 1
                epoch_tokens += batch.tokens
                if epoch_steps % settings.sync_every == 0:
                    self._check_finite(loss_sum, epoch, steps)
                deadline.check()
                if (budget.max_steps and steps >= budget.max_steps) or (
                    budget.steps_per_epoch and epoch_steps >= budget.steps_per_epoch
                ):
                    break
                if budget.eval_every and epoch_steps >= budget.eval_every:
                    break
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_time = time.perf_counter() - t0
            if epoch_steps == 0 and stream is not None and epoch > 1:
                break  # the stream ended: `epochs` passes over the data are done
            train_memory = memory.epoch_mib(model, optimizer)
            if epoch_steps == 0:
                raise TrialFailed(
                    "no_data", f"task {task.name!r} produced no training batch at batch size {batch_size}"
                )
            self._check_finite(loss_sum, epoch, steps)

            model.eval()
            t1 = time.perf_counter()
            with torch.no_grad(), autocast, deadline.covering(task):
                valid = task.evaluate(model, "valid", eval_bs, device=device)
                eval_time = time.perf_counter() - t1
                eval_total += eval_time
                if "valid" not in eval_tokens:
                    eval_tokens["valid"] = sum(
                        b.tokens for b in task.batches("valid", eval_bs, device=device)
                    )
            value = valid.get(primary.name, float("nan"))
            if not math.isfinite(value):
                raise TrialFailed("nan_metric", f"validation {primary.name} is {value} at epoch {epoch}")
            metrics = {
                "train_loss": float(loss_sum) / epoch_steps,
                **{f"valid_{k}": float(v) for k, v in valid.items()},
                "grad_norm": float(norm_sum) / epoch_steps,
                "grad_norm_max": float(norm_max),
                "train_tokens_per_s": epoch_tokens / train_time,
                "eval_tokens_per_s": eval_tokens["valid"] / eval_time if eval_time > 0 else float("nan"),
                "epoch_time_s": train_time + eval_time,
                "train_memory_mib": train_memory,
                "steps": float(steps),
                "lr": float(optimizer.param_groups[0]["lr"]),  # where a schedule has brought it
            }
            history.append(EpochRecord(epoch, metrics))
            if best_valid is None or primary.better(value, best_valid[primary.name]):
                best_state = copy.deepcopy(model.state_dict())
                best_epoch, best_valid = epoch, dict(valid)
            if budget.improves(value, reference, primary.better):
                reference, bad_rounds = value, 0
            else:
                bad_rounds += 1
            for cb in callbacks:
                cb.on_epoch_end(epoch, metrics)
            if budget.max_steps and steps >= budget.max_steps:
                stop_reason = "max_steps"
                break
            if budget.patience and bad_rounds >= budget.patience:
                stop_reason = CONVERGED
                break

        model.load_state_dict(best_state)
        model.eval()
        test, items, items_time = None, None, None
        if evaluate_test:  # the only place the test split is read, once, with the best checkpoint
            with torch.no_grad(), autocast, deadline.covering(task):
                test = {k: float(v) for k, v in task.evaluate(model, "test", eval_bs, device=device).items()}
            if declares_items(task):  # what paired statistics resample: the same checkpoint's items
                t2 = time.perf_counter()
                with torch.no_grad(), autocast, deadline.covering(task):
                    per_split = {
                        s: task.evaluate_items(model, s, eval_bs, device=device) for s in ("valid", "test")
                    }
                if all(frame is not None for frame in per_split.values()):
                    items = item_frame(per_split)
                items_time = time.perf_counter() - t2
        with torch.no_grad():
            artifacts = task.artifacts(model, device=device)
        steady = [r.metrics["train_tokens_per_s"] for r in history[1:]] or [
            history[0].metrics["train_tokens_per_s"]
        ]
        # Named apart from the per-epoch series they summarise: in MLflow a summary sharing a series'
        # name would be one more point of it, and the run's value would be the last epoch's.
        summary = {
            "train_tokens_per_s_median": float(np.median(steady)),
            "eval_tokens_per_s_median": float(np.median([r.metrics["eval_tokens_per_s"] for r in history])),
            "train_memory_mib_peak": max(r.metrics["train_memory_mib"] for r in history),
            "wall_time_s": time.perf_counter() - start,
            "eval_time_s": eval_total,
            "validations": float(len(history)),
            "epochs": float(len(history)),
            "steps": float(steps),
        }
        if items_time is not None:
            summary["items_time_s"] = items_time
        result = FitResult(
            best_epoch, best_valid, test, history, params, summary, stop_reason, artifacts, model, items
        )
        for cb in callbacks:
            cb.on_fit_end(result)
        return result

    @staticmethod
    def _check_finite(loss_sum: torch.Tensor, epoch: int, step: int) -> None:
        if not bool(torch.isfinite(loss_sum)):
            raise TrialFailed(
                "nan_loss", f"training loss became {float(loss_sum)} by step {step} (epoch {epoch})"
            )
