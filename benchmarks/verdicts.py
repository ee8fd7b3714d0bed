"""How long the report's statistics take at the reference study's scale.

Builds a tidy run table and per-item outcomes shaped like the second-edition reference study
(6 benchmarks x 12 architectures x 10 final seeds, each benchmark with its real number of test
items and the item columns its task logs), then times what `rnnbench report` does with them:
every benchmark's ranking, its best_vs_rest family (paired bootstrap, 2,000 replicates, Holm) and
the cross-benchmark Friedman/Nemenyi ranking. Outcomes are random: only the time is measured.

    python benchmarks/verdicts.py            # prints seconds per benchmark and in total
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

# benchmark -> (task, metric, direction, test items, item columns)
SHAPES = {
    "adding-T100": ("memory", "mse", "minimize", 1000, ["se", "n"]),
    "adding-T200": ("memory", "mse", "minimize", 1000, ["se", "n"]),
    "charlm-tinyshakespeare": ("charlm", "perplexity", "minimize", 56, ["nll", "n"]),
    "forecast-etth1": ("forecast", "mse", "minimize", 2857,
                       ["se", "ae", "se_original", "ae_original", "n", *(f"se_h{k}" for k in range(1, 25))]),
    "ner-conll2003": ("ner", "f1", "maximize", 3453,
                      ["tp", "fp", "fn", *(f"{c}_{t}" for t in ("LOC", "MISC", "ORG", "PER") for c in ("tp", "fp", "fn"))]),
    "sentiment-sst2": ("sentiment", "accuracy", "maximize", 1821, ["c_0_0", "c_0_1", "c_1_0", "c_1_1"]),
}  # fmt: skip
CELLS = ("rnn", "lstm", "peephole", "gru")
VARIANTS = ("1L-uni", "2L-uni", "1L-bi")


def simulated(seeds: int, rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame]:
    runs, items = [], []
    for bench, (task, metric, _, n, columns) in SHAPES.items():
        for cell in CELLS:
            for variant in VARIANTS:
                arch = f"{cell}-{variant}"
                for seed in range(seeds):
                    run_id = f"{bench}/{arch}/{seed}"
                    outcomes = rng.integers(0, 3, size=(n, len(columns))).astype(np.float32)
                    if task == "sentiment":  # one confusion cell per sentence
                        outcomes = np.eye(4, dtype=np.float32)[rng.integers(0, 4, n)]
                    frame = pd.DataFrame(outcomes, columns=columns)
                    frame["n"] = 1.0 if "n" in columns else None
                    frame.insert(0, "item", np.arange(n, dtype=np.int32))
                    frame.insert(0, "split", "test")
                    frame.insert(0, "run_id", run_id)
                    items.append(frame.drop(columns=[c for c in frame if frame[c].isna().all()]))
                    value = float(rng.normal(1.0, 0.1))
                    runs.append({
                        "experiment": "reference-cpu", "study": f"reference-cpu/{bench}/{arch}",
                        "architecture": arch, "cell": cell, "variant": variant, "task": task,
                        "benchmark": bench, "dataset": "synthetic", "stage": "final", "status": "complete",
                        "seed": seed, "run_id": run_id, f"test_{metric}": value,
                        f"best_valid_{metric}": value + float(rng.normal(0, 0.05)),
                    })  # fmt: skip
    return pd.DataFrame(runs), pd.concat(items, ignore_index=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    from rnnbench.report import ranking, tables
    from rnnbench.report.collect import TaskInfo

    runs, items = simulated(args.seeds, np.random.default_rng(0))
    infos = {
        bench: TaskInfo(task, metric, direction, margin=0.01, margin_relative=True)
        for bench, (task, metric, direction, _, _) in SHAPES.items()
    }
    print(f"{len(runs)} final seeds, {len(items):,} item rows")
    start = time.perf_counter()
    ranked = []
    for bench, info in infos.items():
        t0 = time.perf_counter()
        ranked.append(tables.rank_task(runs, info, bench, items=items))
        method = set(ranked[-1].comparisons["method"])
        print(
            f"{bench:24s} {time.perf_counter() - t0:6.2f} s  {len(ranked[-1].comparisons)} comparisons {method}"
        )
    t0 = time.perf_counter()
    ranking.rank_over_benchmarks(*ranking.scores_of(ranked))
    print(f"{'friedman/nemenyi':24s} {time.perf_counter() - t0:6.2f} s")
    print(f"total {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
