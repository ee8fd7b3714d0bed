"""Per-benchmark ranking tables (chosen on validation, verdicts on test) and a cross-benchmark summary."""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from rnnbench.report import verdicts
from rnnbench.report.collect import TaskInfo
from rnnbench.stats import MIN_SEEDS, WHY_MIN_SEEDS, finite, mean_ci
from rnnbench.stops import CAP_REASONS, CONVERGED

TEST_NOTE = (
    "Rank and selection by the mean validation score of the final seeds (the test split chooses "
    "nothing). Test: mean and 95% confidence interval over final seeds (Student t) from "
    f"{MIN_SEEDS} seeds up; with fewer, the seeds' own values. vs selected: each architecture minus the "
    "selected one on the same test items (paired bootstrap over seeds and items; seed-level Welch "
    "where items are missing), Holm-adjusted over the benchmark's comparisons: better / worse (the "
    "difference is not zero), equivalent (it lies within the margin, two one-sided tests), "
    "inconclusive (neither); detectable: the smallest difference the design finds with 80% power."
)
MEMORY_NOTE = (
    "train memory: MiB the model needs to train (CPU: parameters, gradients, optimiser state and the "
    "activations one batch saves for backward; CUDA: peak allocated during training steps)."
)


BASELINE_ROW = "trivial baseline"  # the row a ranking table adds for the task's trivial baseline
NAMED_BASELINE_ROW = "baseline: {}"  # a row per further named baseline (Task.baselines: forecast's)


@dataclass
class TaskTable:
    task: str
    info: TaskInfo
    table: pd.DataFrame
    caption: str
    notes: list[str] = field(default_factory=list)
    experiment: str | None = None  # which experiment's runs it ranks (a report may compare several)
    comparisons: pd.DataFrame = field(default_factory=pd.DataFrame)  # the best_vs_rest family, tidy


def _fmt(x: float, digits: int = 4) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def ranking_tables(
    runs: pd.DataFrame, benchmarks: dict[str, TaskInfo], items: pd.DataFrame | None = None
) -> list[TaskTable]:
    """One ranking per experiment and benchmark (benchmarks in the order given: natural order);
    ``items``: the final seeds' per-item outcomes, for paired verdicts."""
    experiments = list(runs["experiment"].dropna().unique()) if "experiment" in runs else [None]
    out = []
    for bench, info in benchmarks.items():
        for experiment in experiments:
            mine = runs if experiment is None else runs[runs["experiment"] == experiment]
            if (mine["benchmark"] == bench).any():
                out.append(rank_task(mine, info, bench, experiment=experiment, items=items))
    return out


def rank_task(
    runs: pd.DataFrame,
    info: TaskInfo,
    benchmark: str | None = None,
    *,
    experiment: str | None = None,
    items: pd.DataFrame | None = None,
) -> TaskTable:
    """Architectures of one benchmark ranked by their final seeds' mean validation score, each
    compared on test with the one selected that way; unranked ones listed last."""
    col = f"test_{info.metric}"
    bench = benchmark or info.name
    task_runs = runs[runs["benchmark"] == benchmark] if benchmark else runs[runs["task"] == info.name]
    if not benchmark:
        task_runs = task_runs.assign(benchmark=bench)
    studies = task_runs[task_runs["stage"] == "study"].set_index("study")
    finals = task_runs[(task_runs["stage"] == "final") & (task_runs["status"] == "complete")]
    hp_cols = sorted(c for c in runs.columns if c.startswith("hp_"))
    baseline = baseline_of(task_runs, info)
    valid_means = verdicts.validation_means(task_runs, info, bench)
    failed_finals = task_runs[(task_runs["stage"] == "final") & (task_runs["status"] == "failed")]
    short_seeds: list[str] = []  # "gru-1L-uni: 2 of 3 final seeds completed (1 failed: nan_loss)"
    rows = []
    for study, group in task_runs.groupby("study"):
        seeds = finals[finals["study"] == study]
        failed = failed_finals[failed_finals["study"] == study]
        if len(failed):
            reasons = (
                failed["failure_reason"].fillna("unknown")
                if "failure_reason" in failed
                else pd.Series(["unknown"] * len(failed))
            )
            why = ", ".join(f"{n} failed: {r}" for r, n in reasons.value_counts().items())
            short_seeds.append(
                f"{group.iloc[0]['architecture']}: {len(seeds)} of {len(seeds) + len(failed)} "
                f"final seeds completed ({why})"
            )
        values = finite(seeds[col]) if col in seeds else []
        split = verdicts.seed_split(values, baseline, info)
        # no t-interval through seeds that split into solved and unsolved: the count says it
        min_n = MIN_SEEDS if split is None else len(values) + 1
        mean, low, high = mean_ci(values, min_n=min_n, bounds=info.bounds)
        _, raw_low, raw_high = mean_ci(values, min_n=min_n)  # where the t-interval itself ends
        cut = [v for v, kept in ((raw_low, low), (raw_high, high)) if not math.isnan(v) and v != kept]
        first = group.iloc[0]
        parent = studies.loc[study] if study in studies.index else None
        if isinstance(parent, pd.DataFrame):
            parent = parent.iloc[0]
        source = (
            seeds if len(seeds) else group[(group["stage"] == "search") & (group["status"] == "complete")]
        )
        best_hp = {}
        if parent is not None:
            best_hp = {c[3:]: parent[c] for c in hp_cols if pd.notna(parent.get(c))}
        elif len(seeds):
            best_hp = {c[3:]: seeds.iloc[0][c] for c in hp_cols if pd.notna(seeds.iloc[0].get(c))}
        search = group[group["stage"] == "search"]
        stops = seeds["stop_reason"] if "stop_reason" in seeds else pd.Series(dtype=object)
        rows.append(
            {
                "architecture": first["architecture"],
                "cell": first["cell"],
                "variant": first["variant"],
                "seeds": len(values),
                "valid_mean": valid_means.get(first["architecture"], math.nan),
                "mean": mean,
                "ci95_low": low,
                "ci95_high": high,
                "seed_values": values,
                "split": verdicts.split_text(split, info) if split else "",
                # final seeds stopped by patience, and those that reached the step/epoch cap first
                "converged": int((stops == CONVERGED).sum()),
                "at_cap": int(stops.isin(CAP_REASONS).sum()),
                "cut_from": cut[0] if cut else math.nan,  # the t-interval's end past the metric's bound
                "params": _median(source, "params_total"),
                "train_tokens_per_s": _median(source, "train_tokens_per_s_median"),
                "train_memory_mib": _max(source, "train_memory_mib_peak"),
                "trials_ok/pruned/failed": "/".join(
                    str(int((search["status"] == s).sum())) for s in ("complete", "pruned", "failed")
                ),
                "best_hparams": ", ".join(f"{k}={_short(v)}" for k, v in best_hp.items()),
            }
        )
    df = pd.DataFrame(rows)
    notes = []
    if df.empty:
        return TaskTable(bench, info, df, "no runs", ["no runs"], experiment)
    by_valid = df["valid_mean"].notna() & (df["seeds"] > 0)
    ranked = df[by_valid].sort_values("valid_mean", ascending=info.direction == "minimize")
    unranked = df[~by_valid]
    ranked = ranked.assign(rank=range(1, len(ranked) + 1))
    evidence = verdicts.Evidence.of(task_runs, items, info, bench)
    family = verdicts.family(task_runs, items, info, bench, "best_vs_rest", baseline, evidence)
    ranked = _with_verdicts(ranked, family)
    notes += [*evidence.notes, verdicts.margin_text(info)]
    tied = verdicts.tied_with_selected(valid_means)
    if len(tied) > 1:
        notes.append(
            f"tie on validation between {', '.join(tied)}: the first by name is selected; the "
            "others are compared with it like the rest"
        )
    if len(family):
        notes.append(
            f"family {bench}: best_vs_rest ({len(family)} comparisons, Holm-adjusted); "
            f"{_verdict_counts(family)}"
        )
    if {"eval_time_s", "wall_time_s"} <= set(finals.columns) and finals["eval_time_s"].notna().any():
        share = (finals["eval_time_s"] / finals["wall_time_s"]).median()
        count = finals["validations"].median() if "validations" in finals else math.nan
        notes.append(
            f"validation cost: {share:.0%} of a final seed's wall time (median"
            + (f"; {count:.0f} validations a seed)" if pd.notna(count) else ")")
        )
    capped = ranked[ranked["at_cap"] > 0]
    if len(capped):
        named = ", ".join(
            f"{a} ({c} of {n})" for a, c, n in zip(capped["architecture"], capped["at_cap"], capped["seeds"])
        )
        if (capped["at_cap"] == capped["seeds"]).all() and len(capped) == len(ranked):
            named = "every final seed of every architecture"  # e.g. no patience: nothing could converge
        notes.append(
            f"† hit the cap: final seeds that reached the step budget before patience stopped them "
            f"({named}); their scores may still improve with more steps, so a ranking among them is "
            "a ranking at this budget"
        )
    cut = ranked[ranked["cut_from"].notna()]
    if len(cut):
        named = ", ".join(f"{a} ({_fmt(v)})" for a, v in zip(cut["architecture"], cut["cut_from"]))
        notes.append(
            f"* interval cut at what {info.metric} can take; the Student-t interval reached past it "
            f"({named}): its seeds are too few or too skewed for a t-interval, so read it as a rough range"
        )
    notes += short_seeds
    few = ranked[ranked["seeds"] < MIN_SEEDS]
    if len(few):
        named = ", ".join(f"{a} ({n})" for a, n in zip(few["architecture"], few["seeds"]))
        notes.append(
            f"fewer than {MIN_SEEDS} final seeds: {named}. Their seed values are shown instead of an "
            f"interval, and no verdict is drawn where one side has them: {WHY_MIN_SEEDS}."
        )
    if len(unranked):
        unranked = unranked.assign(rank=pd.NA, vs_selected="no final seeds")
        notes.append("not ranked (no completed final seed yet): " + ", ".join(unranked["architecture"]))
    table = pd.concat([ranked, unranked], ignore_index=True) if len(unranked) else ranked
    if baseline is None:
        notes.append("trivial baseline: not logged yet (it is logged when a study finishes)")
    else:
        table = pd.concat(
            [table, pd.DataFrame([{"architecture": BASELINE_ROW, "mean": baseline, "seeds": 0}])],
            ignore_index=True,
        )
    named = named_baselines_of(task_runs, info)
    # the trivial baseline is usually one of the named ones (forecast: persistence): its row says it once
    same = [name for name, value in named.items() if baseline is not None and math.isclose(value, baseline)]
    if same:
        notes.append(f"trivial baseline: {same[0]}")
    rows = [{"architecture": NAMED_BASELINE_ROW.format(n), "mean": v, "seeds": 0} for n, v in named.items()
            if n not in same[:1]]  # fmt: skip
    if rows:
        table = pd.concat([table, pd.DataFrame(rows)], ignore_index=True)
    order = [
        "rank", "architecture", "cell", "variant", "valid_mean", "mean", "ci95_low", "ci95_high", "seeds",
        "seed_values", "split", "cut_from", "converged", "at_cap", "vs_selected", "difference", "diff_ci95_low", "diff_ci95_high", "p_holm",
        "detectable", "params", "train_tokens_per_s", "train_memory_mib", "trials_ok/pruned/failed",
        "best_hparams",
    ]  # fmt: skip
    table = table[[c for c in order if c in table.columns]]
    caption = (
        f"{bench}: architectures ranked by validation {info.metric} ({info.better}). {TEST_NOTE} "
        f"params: total trainable parameters; train tokens/s: median over epochs, rounded; {MEMORY_NOTE}"
    )
    return TaskTable(bench, info, table.reset_index(drop=True), caption, notes, experiment, family)


def _with_verdicts(ranked: pd.DataFrame, family: pd.DataFrame) -> pd.DataFrame:
    """The family's verdict, difference and adjusted p beside each architecture; the first is the
    selected one."""
    by_arch = family.set_index("architecture") if len(family) else pd.DataFrame()
    columns = {"vs_selected": [], "difference": [], "diff_ci95_low": [], "diff_ci95_high": [], "p_holm": [],
               "detectable": []}  # fmt: skip
    for i, arch in enumerate(ranked["architecture"]):
        row = by_arch.loc[arch] if arch in by_arch.index else None
        columns["vs_selected"].append(
            "selected (best validation)" if i == 0 else (row["verdict"] if row is not None else "no verdict")
        )
        for key, source in (("difference", "difference"), ("diff_ci95_low", "ci95_low"),
                            ("diff_ci95_high", "ci95_high"), ("p_holm", "p_holm"), ("detectable", "detectable")):  # fmt: skip
            columns[key].append(row[source] if row is not None else math.nan)
    return ranked.assign(**columns)


def _verdict_counts(family: pd.DataFrame) -> str:
    counts = family["verdict"].value_counts()
    return ", ".join(f"{counts[v]} {v}" for v in (*VERDICT_ORDER, "no verdict") if v in counts)


VERDICT_ORDER = ("better", "worse", "equivalent", "inconclusive")


def baseline_of(task_runs: pd.DataFrame, info: TaskInfo) -> float | None:
    """A trivial baseline the runs logged (``baseline_test_<metric>`` or ``baseline_<metric>``), if any."""
    for col in (f"baseline_test_{info.metric}", f"baseline_{info.metric}"):
        if col in task_runs and task_runs[col].notna().any():
            return float(task_runs[col].dropna().mean())
    return None


def named_baselines_of(task_runs: pd.DataFrame, info: TaskInfo) -> dict[str, float]:
    """The named baselines the runs logged (``baseline_<name>_test_<metric>``), name -> value, in
    the order logged; none for tasks with the trivial baseline only."""
    pattern = re.compile(rf"baseline_(.+)_test_{re.escape(info.metric)}")
    found = {}
    for col in task_runs.columns:
        match = pattern.fullmatch(str(col))
        if match and task_runs[col].notna().any():
            found[match.group(1)] = float(task_runs[col].dropna().mean())
    return found


def _median(df: pd.DataFrame, col: str) -> float:
    return float(df[col].median()) if col in df and df[col].notna().any() else math.nan


def _max(df: pd.DataFrame, col: str) -> float:
    return float(df[col].max()) if col in df and df[col].notna().any() else math.nan


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def summary(tables: list[TaskTable]) -> pd.DataFrame:
    """Rank of every architecture on every benchmark, its wins, and how it fares over them.

    Architectures do not all run the same benchmarks (a bidirectional one skips the causal tasks)
    and a field differs by benchmark (8 architectures here, 12 there), so no single mean of raw
    ranks compares them all. Each row therefore shows, over the benchmarks *it* was ranked on
    (``benchmarks_ranked``): ``wins`` (first places), ``mean_rank``, and ``rivals_beaten``, the
    mean share of each field it beat (``(n - rank) / (n - 1)`` on a benchmark of n: 1 = first,
    0 = last), which does not favour small fields. Rows are sorted by ``rivals_beaten``, then
    wins, then breadth. For like-for-like means: ``mean_rank_common`` averages only the benchmarks
    every architecture was ranked on, and architectures sharing a larger set get a column each
    set, ranked among themselves on it. ``attrs["columns"]`` says what each column covers.
    """
    frames = []
    for t in tables:
        ranked = t.table[t.table["rank"].notna()] if "rank" in t.table else t.table.iloc[0:0]
        frames.append(ranked.set_index("architecture")["rank"].rename(t.task).astype(float))
    if not frames:
        return pd.DataFrame()
    ranks = pd.concat(frames, axis=1)
    ranked_on = ranks.notna()
    sizes = ranked_on.sum(axis=0)  # the field of each benchmark
    df = ranks.copy()
    df["benchmarks_ranked"] = ranked_on.sum(axis=1)
    df["wins"] = (ranks == 1).sum(axis=1)
    df["mean_rank"] = ranks.mean(axis=1)
    beaten = (sizes - ranks) / (sizes - 1).where(sizes > 1)
    df["rivals_beaten"] = beaten.mean(axis=1)
    described = {
        "benchmarks_ranked": "benchmarks the architecture was ranked on",
        "wins": "benchmarks on which it ranked first",
        "mean_rank": "mean rank over the benchmarks it was ranked on (benchmarks_ranked of them)",
        "rivals_beaten": "mean share of the field it beat over its benchmarks ((n - rank) / (n - 1) on a "
        "benchmark of n architectures; 1 = first everywhere)",
    }
    common = [b for b in ranks.columns if ranked_on[b].all()]
    if len(common) < len(ranks.columns):  # else mean_rank is already over a common set
        df["mean_rank_common"] = ranks[common].mean(axis=1) if common else math.nan
        described["mean_rank_common"] = (
            f"mean rank over the {len(common)} benchmark(s) every architecture was ranked on "
            f"({', '.join(common)})"
            if common
            else "no benchmark was ranked for every architecture, so there is no mean rank over all of them"
        )
    sets = sorted({tuple(b for b in ranks.columns if row[b]) for _, row in ranked_on.iterrows()}, key=len)
    for benchmarks in reversed(sets):
        members = ranked_on.index[ranked_on[list(benchmarks)].all(axis=1)]
        if len(benchmarks) <= max(len(common), 1) or len(members) < 2:
            continue  # the common set, a single benchmark's own ranks, or one architecture alone
        # ranks among these members only: positions on each benchmark, re-numbered 1..n
        within = ranks.loc[members, list(benchmarks)].rank(method="first")
        name = f"mean_rank_{len(benchmarks)}_benchmarks"
        while name in df:
            name += "'"
        df[name] = within.mean(axis=1)
        described[name] = (
            f"mean rank among the {len(members)} architectures ranked on all of these {len(benchmarks)} "
            f"benchmarks ({', '.join(benchmarks)}), ranked among themselves"
        )
    df = df.sort_values(
        ["rivals_beaten", "wins", "benchmarks_ranked", "mean_rank"],
        ascending=[False, False, False, True],
        na_position="last",
    )
    df = df.reset_index(names="architecture")
    df.attrs["columns"] = described
    return df


def display_frame(t: TaskTable) -> pd.DataFrame:
    """The table as shown: the metric as ``mean [low, high]``, the verdict's difference likewise,
    numbers rounded."""
    df = t.table.copy()
    if df.empty:
        return df
    metric = f"{t.info.metric} {'↓' if t.info.direction == 'minimize' else '↑'}"  # which way is better
    df.insert(
        df.columns.get_loc("mean"),
        f"test {metric} [95% CI]",  # below MIN_SEEDS seeds, their values (the caption says so)
        [_shown_metric(row) for _, row in df.iterrows()],
    )
    if "difference" in df:
        df.insert(
            df.columns.get_loc("difference"),
            "Δ vs selected [95% CI]",
            [_shown_difference(row) for _, row in df.iterrows()],
        )
    if "valid_mean" in df:
        df["valid_mean"] = df["valid_mean"].map(lambda v: _fmt(float(v)) if pd.notna(v) else "–")
        df = df.rename(columns={"valid_mean": f"valid {metric} (mean)"})
    # cell and variant are in the architecture's name (the CSV keeps them as columns)
    dropped = ("mean", "ci95_low", "ci95_high", "seed_values", "split", "cut_from", "difference", "diff_ci95_low",
               "diff_ci95_high", "cell", "variant")  # fmt: skip
    df = df.drop(columns=[c for c in dropped if c in df])
    for c in ("p_holm", "detectable", "train_memory_mib"):
        if c in df:
            df[c] = df[c].map(lambda v: _fmt(float(v), 3) if pd.notna(v) else "–")
    for c in ("params", "train_tokens_per_s"):  # counts: whole numbers, thousands separated
        if c in df:
            df[c] = df[c].map(lambda v: f"{round(float(v)):,}" if pd.notna(v) else "–")
    if "rank" in df:
        df["rank"] = df["rank"].map(lambda v: str(int(v)) if pd.notna(v) else "–")
    if "at_cap" in df:
        df.insert(df.columns.get_loc("converged"), "stopped", [_shown_stops(row) for _, row in df.iterrows()])
        df = df.drop(columns=["converged", "at_cap"])
    return df.rename(columns=SHOWN_NAMES).fillna("–")


# the shown tables' column names: for a reader, not for code (the CSV keeps the raw ones)
SHOWN_NAMES = {
    "vs_selected": "verdict vs selected",
    "p_holm": "p (Holm)",
    "detectable": "smallest detectable Δ",
    "params": "parameters",
    "train_tokens_per_s": "train tokens/s",
    "train_memory_mib": "train memory (MiB)",
    "trials_ok/pruned/failed": "trials ok/pruned/failed",
    "stopped": "final seeds stopped",
    "best_hparams": "best hyperparameters",
}


def _shown_metric(row: pd.Series) -> str:
    """``mean [low, high]`` with an interval; the count where seeds split into solved and not;
    ``mean (seeds: a, b)`` below MIN_SEEDS seeds."""
    if isinstance(row.get("split"), str) and row["split"]:
        return f"{_fmt(row['mean'])} ({row['split']})"
    if pd.notna(row.get("ci95_low")):
        low, high = _fmt(row["ci95_low"]), _fmt(row["ci95_high"])
        if pd.notna(row.get("cut_from")):  # marked: the bound, not the interval, ends it there
            low, high = (f"{low}*", high) if row["cut_from"] < row["ci95_low"] else (low, f"{high}*")
        return f"{_fmt(row['mean'])} [{low}, {high}]"
    values = row.get("seed_values")
    if isinstance(values, list) and len(values) > 1:
        return f"{_fmt(row['mean'])} (seeds: {', '.join(_fmt(v) for v in values)})"
    if isinstance(values, list) and len(values) == 1:
        return f"{_fmt(row['mean'])} (1 seed)"
    return _fmt(row.get("mean"))


def _shown_stops(row: pd.Series) -> str:
    """How the final seeds ended: ``3 converged``, ``† 2 at cap, 1 converged`` (marked: cap-limited)."""
    converged, capped = row.get("converged"), row.get("at_cap")
    if pd.isna(capped) or (not converged and not capped):
        return "–"
    parts = [f"{int(capped)} at cap"] * bool(capped) + [f"{int(converged)} converged"] * bool(converged)
    return ("† " if capped else "") + ", ".join(parts)


def _shown_difference(row: pd.Series) -> str:
    if pd.isna(row.get("difference")):
        return "–"
    return f"{row['difference']:+.3g} [{row['diff_ci95_low']:+.3g}, {row['diff_ci95_high']:+.3g}]"


def summaries(tables: list[TaskTable]) -> dict[str | None, pd.DataFrame]:
    """The cross-benchmark summary of each experiment (ranks never mix experiments)."""
    experiments = list(dict.fromkeys(t.experiment for t in tables))
    return {e: summary([t for t in tables if t.experiment == e]) for e in experiments}


def tidy(tables: list[TaskTable]) -> pd.DataFrame:
    """Every ranking as one long table: experiment and benchmark columns, raw numbers."""
    frames = [
        t.table.assign(experiment=t.experiment, benchmark=t.task)[
            ["experiment", "benchmark", *t.table.columns]
        ]
        for t in tables
        if not t.table.empty
    ]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def benchmarks_of(tables: list[TaskTable]) -> list[str]:
    return list(dict.fromkeys(t.task for t in tables))


# What a side-by-side comparison keeps of each experiment's ranking (the rest is in its own CSV).
_COMPARED = ("rank", "seeds", "verdict vs selected", "parameters", "train tokens/s")


def benchmark_frame(tables: list[TaskTable], benchmark: str) -> pd.DataFrame:
    """The ranking of ``benchmark`` as shown; with several experiments, side by side (one column
    group each, rows in the first experiment's order, then what only the others ranked)."""
    mine = [t for t in tables if t.task == benchmark and not t.table.empty]
    if len(mine) <= 1:
        return display_frame(mine[0]) if mine else pd.DataFrame()
    parts = {}
    for t in mine:
        shown = display_frame(t).set_index("architecture")
        metric = next(c for c in shown.columns if c.startswith("test "))
        parts[t.experiment] = shown[[c for c in ("rank", metric, *_COMPARED[1:]) if c in shown]]
    order = list(dict.fromkeys(a for part in parts.values() for a in part.index))
    return _side_by_side(pd.concat(parts, axis=1).reindex(order))


def _caption(tables: list[TaskTable], benchmark: str) -> str:
    mine = [t for t in tables if t.task == benchmark]
    caption = mine[0].caption if mine else ""
    if len(mine) > 1:
        caption += " Each experiment is ranked on its own runs, side by side; its own table is in the CSV."
    return caption


def _notes(tables: list[TaskTable], benchmark: str) -> list[str]:
    mine = [t for t in tables if t.task == benchmark]
    several = len(mine) > 1
    return [f"{t.experiment}: {n}" if several else n for t in mine for n in t.notes]


def benchmark_html(tables: list[TaskTable], benchmark: str) -> str:
    """One benchmark's section: heading, table with its caption, notes (report, notebook, tables/)."""
    shown = benchmark_frame(tables, benchmark)
    if shown.empty:
        return f"<h2>{html.escape(benchmark)}</h2><p>no runs</p>"
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in _notes(tables, benchmark))
    return (
        f"<h2>{html.escape(benchmark)}</h2>\n"
        + _html_table(shown, _caption(tables, benchmark))
        + (f"<ul class='notes'>{notes}</ul>" if notes else "")
    )


def _html_table(df: pd.DataFrame, caption: str) -> str:
    text = df.to_html(index=False, classes="rank", border=0)
    # the opening tag as written: pandas 3 leaves out border="0", and the caption went missing
    opening = text[: text.index(">") + 1]
    return text.replace(
        opening, f'<table class="dataframe rank"><caption>{html.escape(caption)}</caption>', 1
    )


def summary_frame(sums: dict[str | None, pd.DataFrame]) -> pd.DataFrame:
    """Summaries as shown: ranks as integers, mean ranks to 2 decimals; several side by side."""
    shown = {}
    for experiment, df in sums.items():
        if df.empty:
            continue
        df = df.copy()
        for c in df.columns[1:]:
            df[c] = df[c].map(lambda v, c=c: _shown_summary_value(c, v))
        shown[experiment] = df
    if len(shown) <= 1:
        return next(iter(shown.values()), pd.DataFrame())
    return _side_by_side(pd.concat({e: df.set_index("architecture") for e, df in shown.items()}, axis=1))


def _shown_summary_value(column: str, value) -> str:
    if pd.isna(value):
        return "–"
    if column == "rivals_beaten":
        return f"{value:.0%}"
    return f"{value:.2f}" if column.startswith("mean_rank") else f"{int(value)}"


def _side_by_side(joined: pd.DataFrame) -> pd.DataFrame:
    """One header row, ``experiment · column`` (a two-level header renders badly without an index)."""
    joined.columns = [f"{experiment} · {column}" for experiment, column in joined.columns]
    return joined.fillna("–").reset_index(names="architecture")


def summary_caption(sums: dict[str | None, pd.DataFrame]) -> str:
    parts = []
    for experiment, df in sums.items():
        described = df.attrs.get("columns", {})
        text = "; ".join(f"{name}: {text}" for name, text in described.items())
        parts.append(f"{experiment}: {text}" if len(sums) > 1 else text)
    return (
        "Cross-task summary: rank of each architecture per benchmark (1 = best test metric). Architectures "
        "do not all run the same benchmarks (bidirectional ones skip causal tasks) and fields differ in "
        "size, so each row is scored over its own benchmarks, with their count, its wins, and the share "
        "of each field it beat; rows are sorted by that share (rivals_beaten), then wins, then the number "
        "of benchmarks. Like-for-like comparisons are in the mean_rank_common column and its kin, which "
        "average equal sets of benchmarks only. "
        + " | ".join(parts)
        + ("." if len(sums) == 1 else ". Each experiment ranked on its own runs.")
    )


def summary_html(sums: dict[str | None, pd.DataFrame]) -> str:
    shown = summary_frame(sums)
    if shown.empty:
        return ""
    return "<h2>summary</h2>\n" + _html_table(shown, summary_caption(sums))


def to_markdown(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines) + "\n"


def _raw(df: pd.DataFrame) -> pd.DataFrame:
    raw = df.copy()
    if "seed_values" in raw:  # one cell per run's value, ';'-separated, in full precision
        raw["seed_values"] = raw["seed_values"].map(
            lambda v: ";".join(map(repr, v)) if isinstance(v, list) else ""
        )
    if "experiment" in raw and raw["experiment"].isna().all():
        raw = raw.drop(columns="experiment")
    return raw


def write(
    tables: list[TaskTable], sums: pd.DataFrame | dict[str | None, pd.DataFrame], out: Path
) -> dict[str, list[Path]]:
    """CSV (raw numbers, one row per experiment and architecture), Markdown and HTML (formatted)
    per benchmark, plus the summary; one tables.html."""
    if isinstance(sums, pd.DataFrame):
        sums = {tables[0].experiment if tables else None: sums}
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {}
    sections = []
    for bench in benchmarks_of(tables):
        files = {s: out / f"{bench}{s}" for s in (".csv", ".md", ".html")}  # not with_suffix: mem.T10
        mine = [t for t in tables if t.task == bench]
        _raw(tidy(mine).drop(columns="benchmark", errors="ignore")).to_csv(files[".csv"], index=False)
        notes = _notes(tables, bench)
        files[".md"].write_text(
            f"## {bench}\n\n{_caption(tables, bench)}\n\n{to_markdown(benchmark_frame(tables, bench))}\n"
            + "".join(f"- {n}\n" for n in notes)
        )
        section = benchmark_html(tables, bench)
        files[".html"].write_text(_page(bench, section))
        sections.append(section)
        written[bench] = list(files.values())
    if any(not df.empty for df in sums.values()):
        long = pd.concat(
            [df.assign(experiment=e)[["experiment", *df.columns]] for e, df in sums.items() if not df.empty],
            ignore_index=True,
        )
        _raw(long).to_csv(out / "summary.csv", index=False)
        (out / "summary.md").write_text(
            f"## summary\n\n{summary_caption(sums)}\n\n{to_markdown(summary_frame(sums))}"
        )
        section = summary_html(sums)
        (out / "summary.html").write_text(_page("summary", section))
        sections.insert(0, section)
        written["summary"] = [out / "summary.csv", out / "summary.md", out / "summary.html"]
    (out / "tables.html").write_text(_page("tables", "\n".join(sections)))
    return written


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}
table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{padding:4px 6px;border-bottom:1px solid #ddd;text-align:right}
td:nth-child(2),th:nth-child(2){text-align:left}caption{caption-side:top;text-align:left;max-width:1000px;color:#333;padding-bottom:.5em}
th{vertical-align:bottom;max-width:8em;white-space:normal}td{white-space:normal}
td:nth-child(2){white-space:nowrap}
td:last-child{min-width:10em;max-width:16em;text-align:left}
img{max-width:100%}.notes{color:#8a4b00}"""


def _page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body>{body}</body></html>"
    )
