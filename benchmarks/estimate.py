"""How long an experiment takes on this machine, from its own training steps timed here.

For every study of the experiment: the model a trial trains (its parameter budget solved, the
search space at its midpoint), on the task's real batches, on ``--device``; a few training steps
(forward, backward, clipping, Adam) and a few validation batches are timed after a warm-up. The
study's time is then (trials + final seeds) x (steps per trial x step time + validations x
validation time), with steps per trial from the budget and the task's batches per epoch. That is
an upper bound: pruned trials and early stopping end sooner. Workers are assumed to scale
linearly up to the cores or GPUs they share (say how many with --workers).

    python benchmarks/estimate.py experiments/reference-cpu.yaml --workers 2 --threads 1
    python benchmarks/estimate.py experiments/reference-gpu.yaml --device cuda --workers 3

Run it on the machine that will run the experiment; the datasets must be there ($RNNBENCH_DATA).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_study(study, task, device: torch.device, steps: int) -> dict:
    from rnnbench.plugins import get_cell
    from rnnbench.sizing import search_corners, solve_hidden_size
    from rnnbench.trainer import build_model, make_optimizer, split_hparams

    e = study.experiment
    low, high = search_corners(e)
    middle = {k: (low[k] + high[k]) / 2 if isinstance(low[k], float) else low[k] for k in low}
    hp = {**study.fixed_hparams, **middle}
    if study.parameter_budget:
        hp["hidden_size"] = solve_hidden_size(task, study, study.parameter_budget, hp)
    trainer_hp, _, _ = split_hparams(hp, get_cell(study.arch.cell), task)
    torch.manual_seed(0)
    model = build_model(task, study.arch, hp).to(device)
    optimizer = make_optimizer(model.parameters(), trainer_hp, device)
    batch_size = int(trainer_hp["batch_size"])
    generator = torch.Generator().manual_seed(0)

    def train_step(batch) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = task.training_loss(model, batch, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(trainer_hp["clip_norm"] or 1e9))
        optimizer.step()

    model.train()
    train = task.batches("train", batch_size, device=device, generator=generator)
    times = []
    for i in range(steps + 2):  # two warm-up steps
        batch = next(train)
        _sync(device)
        started = time.perf_counter()
        train_step(batch)
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - started)
    step_s = statistics.median(times)
    per_epoch = sum(
        1 for _ in task.batches("train", batch_size, device=torch.device("cpu"), generator=generator)
    )
    model.eval()
    eval_batches, eval_s = 0, 0.0
    with torch.no_grad():
        for batch in task.batches("valid", batch_size, device=device):
            eval_batches += 1
            if eval_batches <= steps:
                _sync(device)
                started = time.perf_counter()
                task.training_loss(model, batch, None)  # the forward a validation batch costs
                _sync(device)
                eval_s += time.perf_counter() - started
    valid_s = eval_s / max(min(eval_batches, steps), 1) * eval_batches
    budget = study.budget
    cap = budget.steps_per_epoch or per_epoch
    epochs = budget.epochs_limit()
    trial_steps = epochs * min(cap, per_epoch)
    if budget.max_steps:
        trial_steps = min(trial_steps, budget.max_steps)
    validations = budget.validations() or epochs
    validations = min(validations, math.ceil(trial_steps / max(min(cap, per_epoch), 1)))
    from rnnbench.sweep import trial_budget

    runs = trial_budget(e, budget) + e.final.seeds
    seconds = runs * (trial_steps * step_s + validations * valid_s)
    return {
        "study": study.name,
        "hidden": hp.get("hidden_size"),
        "step_ms": round(step_s * 1000, 2),
        "steps_per_trial": trial_steps,
        "validation_s": round(valid_s, 2),
        "runs": runs,
        "hours": seconds / 3600,
    }


def main() -> None:
    from rnnbench.experiment import expand, load

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=1, help="workers the run will use")
    parser.add_argument("--threads", type=int, help="torch CPU threads (as each worker will have)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per study")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    experiment = load(args.experiment)
    studies, _ = expand(experiment)
    tasks, rows = {}, []
    for study in studies:
        key = json.dumps(study.task_entry.model_dump(), sort_keys=True)
        if key not in tasks:
            tasks[key] = study.make_task()
            tasks[key].setup()
        rows.append(time_study(study, tasks[key], device, args.steps))
        if not args.json:
            r = rows[-1]
            print(
                f"{r['study']:<56} hidden {r['hidden']!s:>5}  {r['step_ms']:>8.1f} ms/step  "
                f"{r['steps_per_trial']:>7,} steps x {r['runs']} runs  {r['hours']:7.2f} h",
                flush=True,
            )
    total = sum(r["hours"] for r in rows)
    wall = total / args.workers
    if args.json:
        print(json.dumps({"studies": rows, "worker_hours": total, "wall_hours": wall, "device": str(device)}))
    else:
        print(
            f"{len(rows)} studies: {total:.1f} worker-hours on {device}; with {args.workers} worker(s) "
            f"about {wall:.1f} h ({wall / 24:.1f} days) at most (pruning and early stopping cut it)"
        )


if __name__ == "__main__":
    main()
