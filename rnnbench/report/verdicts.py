"""Verdicts on one benchmark: the winner chosen on validation, every comparison paired on the test
items, three verdicts, families corrected with Holm.

The rules a reviewer checks, in order:

1. **Selection on validation.** The selected architecture of a benchmark is the one with the best
   mean *validation* score over its final seeds; test scores are only reported, never used to choose.
2. **Paired evidence.** Two architectures are compared on the same test items: per-item outcomes of
   every final seed (``items.parquet``) resampled at both levels (:func:`rnnbench.stats.compare_items`).
   Runs without items fall back to seed-level Welch, which ignores the test set's own sampling
   noise; the row says so.
3. **Three verdicts.** better / worse (the difference is not zero), equivalent (it lies within the
   metric's margin of practical equivalence, TOST), inconclusive (neither). Each row states the
   smallest difference the design could have detected.
4. **Families.** Every comparison belongs to a family (``best_vs_rest`` of one benchmark, or
   ``all_pairs``); p-values are Holm-adjusted within it.
5. **Split seeds.** Where some seeds solve the task and others stay near the trivial baseline, the
   mean of the two groups describes neither: the count is reported instead, and no verdict is drawn.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from rnnbench.plugins import get_task
from rnnbench.report.collect import TaskInfo, benchmark_infos
from rnnbench.stats import (
    MIN_SEEDS,
    REPLICATES,
    Comparison,
    ItemScores,
    bootstrap_weights,
    compare_items,
    compare_seeds,
    finite,
    holm,
    verdict,
)

FAMILIES = ("best_vs_rest", "all_pairs")
# A seed solves a task when it closes 90% of the gap from the trivial baseline to the ideal score,
# and fails it when it closes less than half: seeds in both groups are a split, not a spread.
SOLVED_SHARE, FAILED_SHARE = 0.1, 0.5
ITEM_SPLIT = "test"


def final_seeds(runs: pd.DataFrame, benchmark: str) -> pd.DataFrame:
    """Complete final seeds of one benchmark."""
    mine = runs[(runs["benchmark"] == benchmark) & (runs["stage"] == "final")]
    return mine[mine["status"] == "complete"]


def validation_means(runs: pd.DataFrame, info: TaskInfo, benchmark: str) -> pd.Series:
    """Mean best validation score of each architecture's final seeds, best first; where the seeds
    logged none (older stores), the study's best search trial's validation score."""
    column = f"best_valid_{info.metric}"
    seeds = final_seeds(runs, benchmark)
    means = (
        seeds.groupby("architecture")[column].mean().dropna() if column in seeds else pd.Series(dtype=float)
    )
    studies = runs[(runs["benchmark"] == benchmark) & (runs["stage"] == "study")]
    if "best_valid" in studies:
        fallback = studies.dropna(subset=["best_valid"]).groupby("architecture")["best_valid"].first()
        fallback = fallback[fallback.index.isin(seeds["architecture"]) & ~fallback.index.isin(means.index)]
        means = pd.concat([means, fallback])
    # ties (equal validation scores are common on small validation sets) go by name, so the
    # selection never depends on the order runs were collected in
    means = means.astype(float).sort_index()
    return means.sort_values(ascending=info.direction == "minimize", kind="stable")


def tied_with_selected(means: pd.Series) -> list[str]:
    """Architectures whose validation mean equals the selected one's (selected first)."""
    return [str(a) for a, v in means.items() if v == means.iloc[0]] if len(means) else []


def selected(runs: pd.DataFrame, info: TaskInfo, benchmark: str) -> str | None:
    """The benchmark's winner, chosen on validation (None without final seeds)."""
    means = validation_means(runs, info, benchmark)
    return str(means.index[0]) if len(means) else None


def seed_split(values: list[float], baseline: float | None, info: TaskInfo) -> tuple[int, int] | None:
    """``(solved, seeds)`` when some seeds solve the task (within 10% of the distance from the
    trivial baseline to the metric's ideal bound) and others fail it (not even half way), with
    the rest in neither group; None when they do not split so, or the metric has no ideal bound
    on its better side."""
    values = finite(values)
    ideal = info.bounds[0] if info.direction == "minimize" else info.bounds[1]
    if baseline is None or not math.isfinite(ideal) or not math.isfinite(baseline) or len(values) < 2:
        return None
    gap = abs(baseline - ideal)
    if gap == 0:
        return None
    solved = sum(abs(v - ideal) < SOLVED_SHARE * gap for v in values)
    failed = sum(abs(v - ideal) > FAILED_SHARE * gap for v in values)
    return (solved, len(values)) if solved and failed else None


def split_text(split: tuple[int, int], info: TaskInfo) -> str:
    ideal = info.bounds[0] if info.direction == "minimize" else info.bounds[1]
    if info.direction == "minimize" and ideal == 0:
        rule = f"{info.metric} < {SOLVED_SHARE:g} × baseline"
    else:
        rule = f"{info.metric} within {SOLVED_SHARE:.0%} of the gap from baseline to {ideal:g}"
    return f"{split[0]} of {split[1]} seeds reach {rule}; the others stay near the baseline"


def absolute_margin(info: TaskInfo, reference: float) -> float | None:
    """The margin in the metric's units; a relative one is a share of the reference's value."""
    if info.margin is None:
        return None
    return info.margin * abs(reference) if info.margin_relative else info.margin


def margin_text(info: TaskInfo) -> str:
    if info.margin is None:
        return "no margin declared: better/worse/inconclusive only"
    size = f"{info.margin:.0%}" if info.margin_relative else f"{info.margin:g}"
    of = " of the compared value" if info.margin_relative else ""
    return f"margin of practical equivalence ±{size}{of} ({info.margin_source})"


# -- item evidence --------------------------------------------------------------------------------


def sums_metric(task: str, dataset: str | None, metric: str, columns: list[str]) -> Callable | None:
    """The task's metric from item-column sums (``[..., columns]`` -> ``[...]``), or None when the
    task is not installed here or declares no items."""
    try:
        cls = get_task(task)
    except Exception:
        return None
    if not _declares_items(cls):
        return None
    try:
        instance = cls(dataset=dataset) if dataset else cls()
    except Exception:
        instance = cls()

    def metric_of(sums: np.ndarray) -> np.ndarray:
        named = {c: sums[..., k] for k, c in enumerate(columns)}
        return np.asarray(instance.metrics_from_sums(named)[metric], dtype=float)

    return metric_of


def _declares_items(cls) -> bool:
    # local: rnnbench.task imports torch (+3.8 s on `import rnnbench.report`)
    from rnnbench.task import Task

    return getattr(cls, "evaluate_items", None) is not getattr(Task, "evaluate_items", None)


@dataclass
class Evidence:
    """What one benchmark's comparisons rest on: per architecture its final seeds' test values and,
    where every seed kept its items, their resampled scores (shared draws: paired)."""

    info: TaskInfo
    benchmark: str
    values: dict[str, list[float]]
    scores: dict[str, ItemScores]
    notes: list[str]

    @classmethod
    def of(
        cls, runs: pd.DataFrame, items: pd.DataFrame | None, info: TaskInfo, benchmark: str,
        replicates: int = REPLICATES,
    ) -> Evidence:  # fmt: skip
        seeds = final_seeds(runs, benchmark)
        column = f"test_{info.metric}"
        values = {
            arch: finite(group[column]) if column in group else []
            for arch, group in seeds.groupby("architecture")
        }
        notes: list[str] = []
        scores = _item_scores(seeds, items, info, benchmark, replicates, notes) if len(seeds) else {}
        return cls(info, benchmark, values, scores, notes)

    def compare(self, a: str, b: str) -> Comparison:
        """``a`` minus ``b``; the margin (when relative) is a share of ``b``'s mean."""
        margin = absolute_margin(self.info, float(np.mean(self.values[b]))) if self.values.get(b) else None
        if a in self.scores and b in self.scores:
            return compare_items(self.scores[a], self.scores[b], margin)
        return compare_seeds(self.values[a], self.values[b], margin)


def _item_scores(seeds, items, info, benchmark, replicates, notes) -> dict[str, ItemScores]:
    if items is None or items.empty:
        notes.append("no per-item outcomes (runs from before they were kept): seed-level Welch only")
        return {}
    mine = items[items["run_id"].isin(seeds["run_id"]) & (items["split"] == ITEM_SPLIT)]
    if mine.empty:
        notes.append("no per-item outcomes for these runs: seed-level Welch only")
        return {}
    columns = [c for c in mine.columns if c not in ("run_id", "split", "item") and mine[c].notna().all()]
    task, dataset = seeds["task"].iloc[0], seeds["dataset"].iloc[0]
    metric = sums_metric(task, dataset, info.metric, columns)
    if metric is None:
        notes.append(f"task {task!r} declares no per-item metric here: seed-level Welch only")
        return {}
    by_run = {rid: g.sort_values("item")[columns].to_numpy(np.float64) for rid, g in mine.groupby("run_id")}
    lengths = {len(v) for v in by_run.values()}
    if len(lengths) != 1:
        notes.append(f"seeds scored different numbers of test items {sorted(lengths)}: seed-level Welch only")
        return {}
    n_items = lengths.pop()
    digest = hashlib.sha256(benchmark.encode()).digest()
    weights = bootstrap_weights(n_items, replicates, seed=int.from_bytes(digest[:4], "little"))
    scores, partial = {}, []
    for arch, group in seeds.groupby("architecture"):
        kept = [by_run[r] for r in group["run_id"] if r in by_run]
        if len(kept) < len(group):  # a seed without items: the arch is compared on seed values
            partial.append(arch)
            continue
        scores[arch] = ItemScores.of(np.stack(kept), weights, metric)
    if partial:
        notes.append("seeds without per-item outcomes (seed-level Welch for them): " + ", ".join(partial))
    return scores


# -- families -------------------------------------------------------------------------------------


def family(
    runs: pd.DataFrame,
    items: pd.DataFrame | None,
    info: TaskInfo,
    benchmark: str,
    kind: str = "best_vs_rest",
    baseline: float | None = None,
    evidence: Evidence | None = None,
) -> pd.DataFrame:
    """One family of comparisons on ``benchmark``, Holm-adjusted within it: every architecture
    against the one selected on validation (``best_vs_rest``), or every pair (``all_pairs``, in
    validation order). One tidy row per comparison, ``architecture`` minus ``versus``."""
    if kind not in FAMILIES:
        raise ValueError(f"unknown family {kind!r}; expected one of {FAMILIES}")
    evidence = evidence or Evidence.of(runs, items, info, benchmark)
    order = [a for a in validation_means(runs, info, benchmark).index if a in evidence.values]
    if kind == "best_vs_rest":
        pairs = [(a, order[0]) for a in order[1:]]
    else:
        pairs = [(a, b) for i, b in enumerate(order) for a in order[i + 1 :]]
    rows = [_row(evidence, a, b, baseline) for a, b in pairs]
    df = pd.DataFrame(rows, columns=_COLUMNS)
    df["p_holm"] = holm(df["p_value"].tolist())
    df["p_equivalence_holm"] = holm(df["p_equivalence"].tolist())
    df["verdict"] = [_verdict(row, info.direction) for row in df.itertuples(index=False)]
    df.insert(0, "family", f"{benchmark}: {kind}")
    df.insert(0, "benchmark", benchmark)
    return df


_COLUMNS = [
    "architecture", "versus", "difference", "ci95_low", "ci95_high", "p_value", "p_equivalence", "margin",
    "detectable", "seeds_a", "seeds_b", "items", "method", "note",
]  # fmt: skip


def _row(evidence: Evidence, a: str, b: str, baseline: float | None) -> dict:
    values_a, values_b = evidence.values[a], evidence.values[b]
    note = ""
    splits = [(arch, seed_split(v, baseline, evidence.info)) for arch, v in ((a, values_a), (b, values_b))]
    split = [f"{arch}: {split_text(s, evidence.info)}" for arch, s in splits if s]
    if len(values_a) < MIN_SEEDS or len(values_b) < MIN_SEEDS:
        note = f"fewer than {MIN_SEEDS} seeds on a side: no verdict"
    elif split:
        note = "seeds split, no verdict (" + "; ".join(split) + ")"
    if len(values_a) < 2 or len(values_b) < 2:
        nan = math.nan
        return dict(
            zip(
                _COLUMNS, [a, b, nan, nan, nan, nan, nan, nan, nan, len(values_a), len(values_b), 0, "", note]
            )
        )
    c = evidence.compare(a, b)
    return {
        "architecture": a, "versus": b, "difference": c.difference, "ci95_low": c.ci_low, "ci95_high": c.ci_high,
        "p_value": math.nan if note else c.p_value, "p_equivalence": math.nan if note else c.p_equivalence,
        "margin": c.margin if c.margin is not None else math.nan, "detectable": c.detectable,
        "seeds_a": c.seeds_a, "seeds_b": c.seeds_b, "items": c.items, "method": c.method, "note": note,
    }  # fmt: skip


def _verdict(row, direction: str) -> str:
    if row.note:
        return "no verdict"
    return verdict(row.difference, direction, row.p_holm, row.p_equivalence_holm)


def compare(
    runs: pd.DataFrame,
    a: str,
    b: str,
    *,
    benchmark: str,
    items: pd.DataFrame | None = None,
    infos: dict[str, TaskInfo] | None = None,
) -> pd.DataFrame:
    """``a`` against ``b`` on ``benchmark`` as a family of one (no adjustment): one tidy row with
    the difference (a − b), its 95% interval, p-values, margin, smallest detectable difference and
    the verdict. For a family of several, see :func:`family`."""
    info = (infos or benchmark_infos(runs)[0])[benchmark]
    evidence = Evidence.of(runs, items, info, benchmark)
    missing = [x for x in (a, b) if x not in evidence.values]
    if missing:
        raise ValueError(
            f"no final seeds of {', '.join(missing)} on {benchmark}; have {sorted(evidence.values)}"
        )
    df = pd.DataFrame([_row(evidence, a, b, None)], columns=_COLUMNS)
    df["p_holm"], df["p_equivalence_holm"] = df["p_value"], df["p_equivalence"]
    df["verdict"] = [_verdict(r, info.direction) for r in df.itertuples(index=False)]
    df.insert(0, "family", f"{benchmark}: {a} vs {b}")
    df.insert(0, "benchmark", benchmark)
    return df
