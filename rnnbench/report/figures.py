"""Seaborn figures. One function per figure returns it drawn (or a sentence saying why there is
nothing to draw); the report saves them (PNG + SVG) and the notebook shows the same calls inline.
One colour per cell and one marker per variant, in every figure; with several experiments, one
column of panels per experiment (y shared along a benchmark's row)."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from rnnbench.report import budget, ranking
from rnnbench.report.collect import TaskInfo, natural_key
from rnnbench.report.tables import BASELINE_ROW, TaskTable
from rnnbench.stats import MIN_SEEDS, finite, mean_ci

# matplotlib, seaborn and IPython stay local, where drawn: on `import rnnbench.report` (which
# `rnnbench run`'s results table and load_results pay) seaborn costs +2.5 s and matplotlib +0.3 s,
# and make_all picks the Agg backend before pyplot loads.

SEEDS_NOTE = f"mean; 95% CI over ≥{MIN_SEEDS} seeds, else each seed as a dot"
EQUAL_PARAMS_SHARE = 0.05  # parameter counts this close are one budget (see metric_vs_params)
# fANOVA on 2-4 trials returns the same split shares for every study (seen: 0.66/0.34 everywhere)
MIN_TRIALS_FOR_IMPORTANCE = 5
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]
BAND_LABEL = "shaded band: 95% CI of the mean over the runs (bootstrap)"
_POINTS = (
    "Points: mean test metric of the final seeds; bars: its 95% Student-t interval in the point's "
    f"colour (from {MIN_SEEDS} seeds); below {MIN_SEEDS} seeds, each seed as a small dot instead. "
    "Points with (almost) the same x are drawn side by side so none hides another."
)
CAPTIONS = {
    "metric_vs_params": f"Test metric against trainable parameters; dashed: the task's trivial baseline "
    f"(its value written in the panel's title instead where it lies far off the scores). Where a panel's "
    f"parameter counts lie within {EQUAL_PARAMS_SHARE:.0%} of each other (a parameter budget), its "
    f"architectures stand side by side by name, in ranking order, and the title gives the common count: "
    f"spread on a count axis they would suggest a trend that is not there. {_POINTS}",
    "metric_vs_throughput": f"Test metric against training throughput; the black line joins the Pareto "
    f"front (no other architecture is both faster and better); dashed: the trivial baseline. {_POINTS}",
    "valid_curves": "Validation metric at each validation of each architecture's best search trial (one run "
    "each, no band), against the training steps done by then (the validation's number for runs that did not "
    "log their steps).",
    "budget_sensitivity": "Would a smaller training budget rank the architectures the same? First panel: "
    "Kendall's τ-b between each benchmark's ranking had training stopped at 25/50/75% of its step budget and "
    "the full-budget ranking (1 = same order, 0 = unrelated). Other panels: each architecture's rank (1 = best, "
    "at the top) at each fraction. A ranking at x% averages each final seed's best validation score reached by "
    "then (the best checkpoint is kept); a run that stopped sooner keeps its best.",
    "optimisation_history": "Every search trial's best validation score (points) and the study's running "
    "best (steps), by trial number.",
    "grad_norm": f"Global gradient L2 norm between validations, before clipping, against the training "
    f"steps done (the validation's number for runs that did not log their steps): the mean over each "
    f"architecture's final seeds and best trial; {BAND_LABEL}.",
    "importance": "fANOVA share of the validation score's variance explained by each hyperparameter, "
    f"per study with {MIN_TRIALS_FOR_IMPORTANCE} or more completed trials (seed 0).",
    "metric_vs_seq_len": "Memory task: test metric (not memory use) against the sequence length T the "
    f"task asks the model to remember across, one line per architecture; dashed: the trivial baseline. "
    f"{_POINTS}",
    "critical_difference": "Architectures over all benchmarks: mean rank of the mean test score (1 = best) on "
    "the benchmarks every shown architecture was ranked on; Friedman test, and Nemenyi's critical "
    "difference (CD, α = 0.05): architectures joined by a thick line are not told apart (Demšar 2006). "
    "Ranks only: a benchmark's margin of victory does not count.",
    "compare_experiments": "The same architectures in each experiment: mean test metric, with its 95% "
    f"interval from {MIN_SEEDS} seeds (each seed as a dot below that), one colour per experiment.",
}


@dataclass
class Style:
    """The fixed cell → colour, variant → marker and experiment → colour maps shared by all figures."""

    colours: dict[str, tuple]
    markers: dict[str, str]
    experiments: dict[str, tuple] = field(default_factory=dict)

    @classmethod
    def for_runs(cls, runs: pd.DataFrame) -> Style:
        import seaborn as sns

        cells = sorted(runs["cell"].dropna().unique())
        variants = sorted(runs["variant"].dropna().unique(), key=natural_key)
        experiments = list(runs["experiment"].dropna().unique()) if "experiment" in runs else []
        palette = sns.color_palette("colorblind", max(len(cells), 1))
        dark = sns.color_palette("dark", max(len(experiments), 1))
        return cls(
            {c: palette[i % len(palette)] for i, c in enumerate(cells)},
            {v: MARKERS[i % len(MARKERS)] for i, v in enumerate(variants)},
            {e: dark[i % len(dark)] for i, e in enumerate(experiments)},
        )

    def colour(self, cell) -> tuple | str:
        return self.colours.get(cell, "0.4")

    def kwargs(self, data: pd.DataFrame) -> dict:
        """hue/style arguments for seaborn restricted to the levels present (keeps legends honest)."""
        cells = [c for c in self.colours if c in set(data["cell"])]
        variants = [v for v in self.markers if v in set(data["variant"])]
        return {
            "hue": "cell",
            "hue_order": cells,
            "palette": {c: self.colours[c] for c in cells},
            "style": "variant",
            "style_order": variants,
            "markers": {v: self.markers[v] for v in variants},
        }


@dataclass
class Figures:
    paths: dict[str, Path] = field(default_factory=dict)  # figure name → PNG
    notes: list[str] = field(default_factory=list)


def set_theme() -> None:
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid")


def show(drawn) -> None:
    """In the notebook: the figure inline (once), or the sentence saying why there is none."""
    import matplotlib.pyplot as plt
    from IPython.display import display

    if isinstance(drawn, str):
        print(drawn)
        return
    display(drawn)
    plt.close(drawn)


def _metric_label(info: TaskInfo, split: str = "test") -> str:
    return f"{split} {info.metric} (unitless; {info.better})"


def save(fig, out: Path, name: str) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")
    fig.savefig(out / f"{name}.svg", bbox_inches="tight")
    plt.close(fig)
    return out / f"{name}.png"


def _grid(n: int, width: float = 5.2, height: float = 4.0, columns: int = 3):
    """n panels, at most ``columns`` per row so many benchmarks stay readable at 100% zoom."""
    import matplotlib.pyplot as plt

    cols = min(n, columns)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols + 1.8, height * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _layout(keys: list[tuple], width: float = 5.2, height: float = 4.0):
    """A panel per (benchmark, experiment) key. One experiment: a wrapped grid in the keys' order.
    Several: a row per benchmark, a column per experiment, y shared along a row so they compare."""
    import matplotlib.pyplot as plt

    experiments = list(dict.fromkeys(e for _, e in keys))
    if len(experiments) <= 1:
        fig, axes = _grid(len(keys), width, height)
        return fig, dict(zip(keys, axes))
    benches = list(dict.fromkeys(b for b, _ in keys))
    fig, grid = plt.subplots(
        len(benches), len(experiments), figsize=(width * len(experiments) + 1.8, height * len(benches)),
        squeeze=False, sharey="row",
    )  # fmt: skip
    axes = {}
    for i, bench in enumerate(benches):
        for j, experiment in enumerate(experiments):
            ax = grid[i][j]
            if (bench, experiment) in keys:
                axes[(bench, experiment)] = ax
            else:  # keep the columns aligned: say it, do not leave a hole
                ax.text(0.5, 0.5, f"{bench}: no runs in {experiment}", ha="center", va="center",
                        transform=ax.transAxes, color="0.4")  # fmt: skip
                ax.set_axis_off()
    return fig, axes


def _title(key: tuple, several: bool, text: str = "") -> str:
    bench, experiment = key
    where = f"{bench} · {experiment}" if several else bench
    return f"{where}: {text}" if text else where


def _several(keys) -> bool:
    return len({e for _, e in keys}) > 1


_LEGEND_SECTIONS = ("cell", "variant")  # the titles of seaborn's hue and style legend sections


def _legend(fig, axes, extra: list | None = None) -> None:
    """One legend for the figure (cell colours, variant markers, what lines and bands mean),
    outside the plotting area."""
    fig.tight_layout()
    handles, labels = {}, []
    # seaborn writes each axis's legend as sections: a "cell" title, its cells, a "variant" title,
    # its variants. Merged panel by panel in order of appearance, a cell first seen in a later
    # panel would land under "variant": the entries are gathered per section instead.
    sections: dict[str, list[str]] = {}
    for ax in axes:
        h, ls = ax.get_legend_handles_labels()
        section = None
        for handle, label in zip(h, ls):
            if label in _LEGEND_SECTIONS:
                section = label
                sections.setdefault(label, [])
            elif section is not None and label not in sections[section]:
                sections[section].append(label)
            if label not in handles:
                handles[label] = handle
                if section is None:
                    labels.append(label)
        if ax.get_legend():
            ax.get_legend().remove()
    ordered = []
    for section in (s for s in _LEGEND_SECTIONS if s in sections):
        ordered += [section, *sorted(sections[section], key=natural_key)]
    labels = ordered + [label for label in labels if label not in ordered]
    for handle in extra or []:
        handles[handle.get_label()] = handle
        labels.append(handle.get_label())
    if handles:
        fig.legend(
            [handles[k] for k in labels], labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False
        )


def _arch_points(t: TaskTable) -> pd.DataFrame:
    df = t.table
    if df.empty or "rank" not in df:
        return df.iloc[0:0]
    return df[df["seeds"].fillna(0) > 0].copy()


def _baseline_line(ax, t: TaskTable, points: pd.DataFrame) -> tuple[bool, str]:
    """The task's trivial baseline as a dashed line where it falls near the scores; when it lies
    far off them (charlm's unigram perplexity is ten times the models') the scores keep the scale
    and the baseline's value is returned as text for the panel's title, where no point or error
    bar can cross it. ``(drawn, text)``: whether the line was drawn, else the text (or "")."""
    rows = t.table[t.table["architecture"] == BASELINE_ROW] if "architecture" in t.table else t.table[:0]
    if rows.empty or pd.isna(rows["mean"].iloc[0]):
        return False, ""
    base = float(rows["mean"].iloc[0])
    ends = pd.concat([points[c] for c in ("mean", "ci95_low", "ci95_high") if c in points]).dropna()
    low, high = float(ends.min()), float(ends.max())
    span = max(high - low, abs(high) * 0.05, 1e-12)
    if low - span <= base <= high + span:
        ax.axhline(base, color="0.3", ls="--", lw=1, zorder=1)
        return True, ""
    return False, f"{BASELINE_ROW} {base:.4g}, {'below' if base < low else 'above'} this scale"


def _equal_counts(values: pd.Series) -> bool:
    """True when every count lies within EQUAL_PARAMS_SHARE of the largest (a parameter budget)."""
    values = values.astype(float)
    return (
        len(values) > 1
        and values.max() > 0
        and (values.max() - values.min()) <= EQUAL_PARAMS_SHARE * values.max()
    )


def _count(value: float) -> str:
    """A count to 3 significant digits, as the axes write it: 19.2k, 1.03k, 1.2M."""
    for size, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{prefix}"
    return f"{value:.3g}"


def _is_wide(values: pd.Series) -> bool:
    """Log scale only when the values span a decade (closer values read better on a linear axis)."""
    positive = values[values > 0]
    return bool(len(positive)) and positive.max() / positive.min() >= 10


def _log_ticks(axis, values: pd.Series, formatter) -> None:
    """Enough labelled ticks on a log axis: 1-2-5 per decade over up to 3 decades, more below one."""
    from matplotlib.ticker import LogLocator, NullFormatter

    positive = values[values > 0]
    decades = math.log10(positive.max() / positive.min()) if len(positive) else 3
    subs = (1.0,) if decades > 3 else (1.0, 2.0, 5.0) if decades > 1 else (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(formatter)
    axis.set_minor_formatter(NullFormatter())


def _count_axis(ax, values: pd.Series, label: str) -> None:
    """Counts (parameters, tokens/s) as 12k, 1.2M; log scale only across a decade or more."""
    from matplotlib.ticker import EngFormatter

    wide = _is_wide(values)
    if wide:
        ax.set_xscale("log")
        _log_ticks(ax.xaxis, values, EngFormatter(sep=""))
    else:
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_xlabel(label + (", log scale" if wide else ""))


def dodge(x: pd.Series, log: bool, share: float = 0.02, step: float = 0.03) -> pd.Series:
    """x positions with points that (almost) share an x spread side by side: lstm and peephole
    have nearly the same parameter count and would hide each other. ``share`` and ``step`` are
    fractions of the axis span (in decades on a log axis)."""
    t = np.log10(x.astype(float)) if log else x.astype(float)
    span = float(t.max() - t.min())
    span = span if span > 0 else (0.5 if log else max(abs(float(t.mean())) * 0.2, 1.0))
    order = t.sort_values()
    groups, current = [], [order.index[0]]
    for prev, idx in zip(order.index[:-1], order.index[1:]):
        if t[idx] - t[prev] < share * span:
            current.append(idx)
        else:
            groups.append(current)
            current = [idx]
    groups.append(current)
    shifted = t.copy()
    for members in groups:
        centre = t[members].mean()
        for i, idx in enumerate(members):
            shifted[idx] = centre + (i - (len(members) - 1) / 2) * step * span
    return 10**shifted if log else shifted


def _error_bars(ax, points: pd.DataFrame, x: str, colour_of) -> None:
    """95% intervals, each in its point's colour (a grey bar reads as belonging to no one)."""
    for _, row in points[points["ci95_low"].notna()].iterrows():
        ax.errorbar(
            row[x], row["mean"], yerr=[[row["mean"] - row["ci95_low"]], [row["ci95_high"] - row["mean"]]],
            fmt="none", ecolor=colour_of(row), elinewidth=1.2, capsize=3, zorder=1,
        )  # fmt: skip


def pareto_front(points: pd.DataFrame, x: str, direction: str) -> pd.DataFrame:
    """Points no other point beats on both throughput (higher is better) and the metric."""
    sign = 1 if direction == "minimize" else -1
    ordered = points.sort_values(x, ascending=False)
    front, best = [], math.inf
    for _, row in ordered.iterrows():
        value = sign * row["mean"]
        if value < best:
            front.append(row)
            best = value
    return pd.DataFrame(front)


def _seed_points(ax, points: pd.DataFrame, x: str, colour_of, y: str = "mean") -> None:
    """Below MIN_SEEDS seeds there is no interval (see stats.py): each seed's value as a small dot."""
    for _, row in points.iterrows():
        values = row.get("seed_values")
        if pd.isna(row.get("ci95_low")) and isinstance(values, list) and len(values) > 1:
            ax.scatter([row[x]] * len(values), values, s=14, color=colour_of(row), alpha=0.7, zorder=2,
                       linewidths=0)  # fmt: skip


def metric_vs_params(tables: list[TaskTable], style: Style):
    return _scatter_per_task(tables, style, "params", "parameters (count)", "metric_vs_params")


def metric_vs_throughput(tables: list[TaskTable], style: Style):
    return _scatter_per_task(
        tables, style, "train_tokens_per_s", "training throughput (tokens/s)", "metric_vs_throughput",
        pareto=True,
    )  # fmt: skip


def _scatter_per_task(tables, style, x, xlabel, name, pareto=False):
    import seaborn as sns
    from matplotlib.lines import Line2D

    shown = [(t, _arch_points(t)) for t in tables]
    shown = [(t, p.dropna(subset=[x, "mean"])) for t, p in shown]
    shown = [(t, p) for t, p in shown if len(p)]
    if not shown:
        return f"{name}: no architecture has final test scores yet"
    keys = [(t.task, t.experiment) for t, _ in shown]
    fig, axes = _layout(keys)
    cell_colour = lambda row: style.colour(row["cell"])  # noqa: E731
    baseline_drawn = False
    for key, (t, p) in zip(keys, shown):
        ax = axes[key]
        # equal parameter counts (a budget) as a strip by architecture, not a spread along x
        strip = x == "params" and _equal_counts(p[x])
        if strip:
            order = list(dict.fromkeys(p["architecture"]))  # the ranking's order
            p = p.assign(x_drawn=[float(order.index(a)) for a in p["architecture"]])
        else:
            p = p.assign(x_drawn=dodge(p[x], _is_wide(p[x])))
        drawn, off_scale = _baseline_line(ax, t, p)
        baseline_drawn |= drawn
        _error_bars(ax, p, "x_drawn", cell_colour)
        _seed_points(ax, p, "x_drawn", cell_colour)
        sns.scatterplot(data=p, x="x_drawn", y="mean", s=90, ax=ax, zorder=3, **style.kwargs(p))
        if pareto:
            front = pareto_front(p, "x_drawn", t.info.direction).sort_values("x_drawn")
            ax.plot(front["x_drawn"], front["mean"], "-", color="0.2", lw=1.2, zorder=2)
            ax.scatter(front["x_drawn"], front["mean"], s=260, facecolors="none", edgecolors="0.2", zorder=2)
        # more labels than 4 only overlap; neighbours along x alternate above and below their point
        labelled = p.sort_values("x_drawn") if len(p) <= 4 and not strip else p.iloc[0:0]
        for i, (_, row) in enumerate(labelled.iterrows()):
            ax.annotate(row["architecture"], (row["x_drawn"], row["mean"]), textcoords="offset points",
                        xytext=(6, 6 if i % 2 == 0 else -14), fontsize=8)  # fmt: skip
        notes = [off_scale] if off_scale else []
        if strip:
            ax.set_xticks(range(len(order)), order, rotation=60, ha="right", fontsize=8)
            ax.set_xlim(-0.6, len(order) - 0.4)
            ax.set_xlabel(f"architecture (parameter counts equal within {EQUAL_PARAMS_SHARE:.0%})")
            low, high = float(p[x].min()), float(p[x].max())
            within = (high - low) / high
            counts = _count(high) if low == high else f"{_count(low)}–{_count(high)}"
            notes.insert(
                0,
                f"all {counts} parameters"
                + (f" (within {within:.{0 if within >= 0.01 else 1}%})" if within else ""),
            )
        else:
            _count_axis(ax, p[x], xlabel)
        ax.set_ylabel(_metric_label(t.info))
        ax.set_title(_title(key, _several(keys)) + "".join(f"\n{n}" for n in notes), fontsize=11)
        ax.grid(alpha=0.3)
    fig.suptitle(SEEDS_NOTE, y=1.0, fontsize=10)
    extra = []
    if pareto:
        extra.append(Line2D([], [], color="0.2", marker="o", mfc="none", ms=12, label="Pareto front"))
    if baseline_drawn:
        extra.append(Line2D([], [], color="0.3", ls="--", lw=1, label=BASELINE_ROW))
    _legend(fig, list(axes.values()), extra)
    return fig


def _curves(runs, histories, infos, metric_of, ylabel_of, name, style, *, best_only, logy=False):
    import seaborn as sns
    from matplotlib.patches import Patch
    from matplotlib.ticker import FormatStrFormatter

    if histories.empty:
        return f"{name}: no per-epoch history logged"
    cols = ["benchmark", "cell", "variant", "architecture", "stage"]
    meta = runs.set_index("run_id")[cols + (["experiment"] if "experiment" in runs else [])]
    hist = histories.drop(columns=["experiment"], errors="ignore").join(meta, on="run_id", how="inner")
    if "experiment" not in hist:
        hist["experiment"] = None
    if best_only:
        best = hist[hist["best_trial"]]
        # an experiment that searches nothing (trials: 0) has no best trial: its final seeds' curves
        hist = best if len(best) else hist[hist["stage"] == "final"]
        units = "architecture" if len(best) else "run_id"  # one line per best trial, or per seed
    # x: the optimiser steps done at each validation where the runs logged them (a validation may
    # come every 125 steps, not once per pass over the data), else the validation's number
    steps = histories[histories["metric"] == "steps"][["run_id", "step", "value"]]
    steps = steps.drop_duplicates(["run_id", "step"]).rename(columns={"value": "train_steps"})
    hist = hist.merge(steps, on=["run_id", "step"], how="left")
    panels = []
    for bench, info in infos.items():
        for experiment in dict.fromkeys(hist["experiment"]):
            sub = hist[(hist["benchmark"] == bench) & (hist["experiment"].values == experiment)]
            sub = sub[sub["metric"] == metric_of(info)]
            if len(sub):
                panels.append(((bench, experiment), sub))
    if not panels:
        return f"{name}: no per-epoch history logged"
    keys = [k for k, _ in panels]
    fig, axes = _layout(keys)
    for key, sub in panels:
        ax = axes[key]
        by_steps = bool(sub["train_steps"].notna().all())
        sns.lineplot(
            data=sub, x="train_steps" if by_steps else "step", y="value",
            units=units if best_only else None,
            estimator=None if best_only else "mean", errorbar=None if best_only else ("ci", 95),
            markersize=8, dashes=False, ax=ax, **style.kwargs(sub),
        )  # fmt: skip
        ax.set_xlabel("training steps" if by_steps else "validation")
        ax.set_ylabel(ylabel_of(infos[key[0]]))
        ax.set_title(_title(key, _several(keys)), fontsize=11)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if by_steps:
            from matplotlib.ticker import EngFormatter

            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        if logy:
            ax.set_yscale("log")
            _log_ticks(ax.yaxis, sub["value"], FormatStrFormatter("%g"))
        ax.grid(alpha=0.3)
    extra = [] if best_only else [Patch(facecolor="0.5", alpha=0.25, label=BAND_LABEL)]
    _legend(fig, list(axes.values()), extra)
    return fig


def valid_curves(runs, histories, infos, style):
    return _curves(
        runs, histories, infos, lambda i: f"valid_{i.metric}",
        lambda i: f"validation {i.metric} (unitless; {i.better})", "valid_curves", style, best_only=True,
    )  # fmt: skip


def grad_norm(runs, histories, infos, style):
    """Mean global gradient norm per epoch (before clipping) over the final seeds and best trial."""
    return _curves(
        runs, histories, infos, lambda i: "grad_norm", lambda i: "gradient L2 norm (log scale)",
        "grad_norm", style, best_only=False, logy=True,
    )  # fmt: skip


def budget_sensitivity(runs, histories, infos, style):
    """τ against the budget fraction, one line per benchmark, then a bump chart of ranks per
    benchmark (rnnbench.report.budget computes both)."""
    result = budget.budget_sensitivity(runs, histories, infos)
    if result.ranks.empty:
        return "budget_sensitivity: no validation history of final seeds"
    keys = list(dict.fromkeys(zip(result.ranks["benchmark"], result.ranks["experiment"])))
    several = _several(keys)
    fig, axes = _grid(len(keys) + 1, width=4.6, height=3.6)
    ax = axes[0]
    taus = result.taus.groupby(["benchmark", "experiment"], dropna=False, sort=False)
    for (bench, experiment), group in taus:
        ax.plot(100 * group["fraction"], group["tau"], marker="o", label=_title((bench, experiment), several))
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_ylim(-1.05, 1.05)
    ticks = sorted(100 * result.taus["fraction"].unique())
    ax.set_xlim(0, 105)
    ax.set_xticks(ticks)
    ax.set_xlabel("training budget used (% of steps)")
    ax.set_ylabel("Kendall τ-b with the full-budget ranking")
    ax.set_title("ranking agreement against budget", fontsize=11)
    ax.legend(fontsize=7, loc="best", frameon=True)
    ax.grid(alpha=0.3)
    for panel, key in zip(axes[1:], keys):
        ranks = result.ranks
        mine = ranks[(ranks["benchmark"] == key[0]) & (ranks["experiment"].values == key[1])]
        mine = mine.assign(percent=100 * mine["fraction"])
        _rank_lines(mine, panel, style)
        panel.set_ylim(mine["rank"].max() + 0.5, 0.5)  # rank 1 (best) at the top
        panel.set_yticks(range(1, int(math.ceil(mine["rank"].max())) + 1))
        panel.set_xlim(0, 105)
        panel.set_xticks(ticks)
        panel.set_xlabel("training budget used (% of steps)")
        panel.set_ylabel("rank (1 = best)")
        panel.set_title(_title(key, several), fontsize=11)
        panel.grid(alpha=0.3)
    _legend(fig, axes[1:])
    return fig


def _rank_lines(data: pd.DataFrame, ax, style: Style) -> None:
    """One line per architecture through its ranks, in its cell's colour and variant's marker."""
    import seaborn as sns

    sns.lineplot(data=data, x="percent", y="rank", units="architecture", estimator=None, dashes=False,
                 markersize=7, ax=ax, **style.kwargs(data))  # fmt: skip


def optimisation_history(runs: pd.DataFrame, infos, style):
    """Every search trial's best validation score, and the running best, per study."""
    import seaborn as sns

    search = runs[runs["stage"] == "search"]
    experiments = list(dict.fromkeys(search["experiment"])) if "experiment" in search else [None]
    panels = []
    for bench, info in infos.items():
        col = f"best_valid_{info.metric}"
        for experiment in experiments:
            sub = search[search["benchmark"] == bench]
            if experiment is not None:
                sub = sub[sub["experiment"] == experiment]
            if col in sub and sub[col].notna().any():
                sub = sub.assign(value=sub[col]).dropna(subset=["value"]).sort_values("trial")
                panels.append(((bench, experiment), sub))
    if not panels:
        return "optimisation_history: no completed search trial yet"
    keys = [k for k, _ in panels]
    fig, axes = _layout(keys)
    for key, sub in panels:
        ax, info = axes[key], infos[key[0]]
        sub = sub.copy()
        sub["trial"] = sub["trial"].astype(float)
        best = sub.groupby("study")["value"]
        sub["running_best"] = best.cummin() if info.direction == "minimize" else best.cummax()
        sns.scatterplot(data=sub, x="trial", y="value", s=60, alpha=0.55, ax=ax, **style.kwargs(sub))
        sns.lineplot(
            data=sub, x="trial", y="running_best", units="study", estimator=None, drawstyle="steps-post",
            ax=ax, legend=False, dashes=False, **style.kwargs(sub),
        )  # fmt: skip
        ax.set_xlabel("search trial number")
        ax.set_ylabel(f"best validation {info.metric} of trial (unitless)")
        ax.set_title(_title(key, _several(keys), "trials (points), running best (lines)"), fontsize=11)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    _legend(fig, list(axes.values()))
    return fig


def open_ledger(journal: Path):
    """A journal's ledger for reading (also where the journal cannot be written)."""
    from rnnbench.sweep import open_storage  # local: optuna, as in importance_table

    return open_storage(str(journal), journal.parent)


def importance_table(runs: pd.DataFrame, ledger) -> tuple[pd.DataFrame, list[str]]:
    """fANOVA hyperparameter importance per study of the runs' experiments (seed fixed: stable
    across report runs), from the ledger (an Optuna storage, or a journal's path; None: skipped);
    one row per study and hyperparameter."""
    if isinstance(ledger, (str, Path)):
        ledger = open_ledger(Path(ledger)) if Path(ledger).is_file() else None
    if ledger is None:
        return pd.DataFrame(), [
            "hyperparameter importance: no Optuna ledger found (pass --home or --storage), skipped"
        ]
    # local: on `import rnnbench.report` optuna costs +0.11 s and optuna.importance +2.5 s, which
    # load_results and `rnnbench run`'s results table would pay; only this table needs them
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances
    from optuna.trial import TrialState

    from rnnbench.sweep import load_study, study_names

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    meta = runs[runs["stage"] == "study"].drop_duplicates("study").set_index("study")
    rows, skipped, few, notes = [], [], 0, []
    experiments = {name.split("/", 1)[0] for name in meta.index}
    names = sorted({n for e in experiments for n in study_names(ledger, e)})
    for name in names:
        if name not in meta.index:
            continue
        study = load_study(ledger, name)
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if len(complete) < MIN_TRIALS_FOR_IMPORTANCE:
            few += 1
            continue
        try:
            scores = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))
        except (RuntimeError, ValueError) as exc:  # e.g. every trial scored the same: nothing to explain
            skipped.append(f"{name.split('/', 1)[1]} ({exc})")
            continue
        m = meta.loc[name]
        for param, value in scores.items():
            rows.append({"experiment": m.get("experiment"), "study": name, "benchmark": m["benchmark"],
                         "cell": m["cell"], "variant": m["variant"], "architecture": m["architecture"],
                         "hparam": param, "importance": value})  # fmt: skip
    if few:
        notes.append(
            f"hyperparameter importance not computed for {few} studies with fewer than "
            f"{MIN_TRIALS_FOR_IMPORTANCE} completed trials (a forest fitted to so few points reflects its splits, not the data)"
        )
    if skipped:
        notes.append("hyperparameter importance skipped for " + "; ".join(skipped))
    return pd.DataFrame(rows), notes


def importance(table: pd.DataFrame, style: Style):
    """One row per hyperparameter, architectures side by side within it so no point hides another."""
    import seaborn as sns

    if table.empty:
        return "importance: no study has enough completed trials (or no Optuna journal was found)"
    hparams = sorted(table["hparam"].unique())
    experiments = list(dict.fromkeys(table["experiment"])) if "experiment" in table else [None]
    keys = [
        (b, e)
        for b in sorted(table["benchmark"].unique(), key=natural_key)
        for e in experiments
        if ((table["benchmark"] == b) & (table["experiment"].values == e)).any()
    ]
    fig, axes = _layout(keys, width=4.8, height=0.9 * len(hparams) + 2.2)
    for key in keys:
        ax = axes[key]
        sub = table[(table["benchmark"] == key[0]) & (table["experiment"].values == key[1])].copy()
        archs = sorted(sub["architecture"].unique())
        spread = 0.6 / max(len(archs), 1)
        offset = {a: (i - (len(archs) - 1) / 2) * spread for i, a in enumerate(archs)}
        sub["row"] = [hparams.index(h) + offset[a] for h, a in zip(sub["hparam"], sub["architecture"])]
        sns.scatterplot(data=sub, x="importance", y="row", s=90, ax=ax, **style.kwargs(sub))
        ax.set_yticks(range(len(hparams)), hparams)
        ax.set_ylim(len(hparams) - 0.5, -0.5)
        ax.set_xlim(-0.03, 1.03)
        ax.set_xlabel("fANOVA importance (share of variance, 0–1)")
        ax.set_ylabel("hyperparameter")
        ax.set_title(_title(key, _several(keys)), fontsize=11)
        ax.grid(alpha=0.3)
    _legend(fig, list(axes.values()))
    return fig


def metric_vs_seq_len(runs: pd.DataFrame, infos, style):
    """Memory task: final test metric against sequence length T, one line per architecture (its
    y is the task's metric, MSE or accuracy: not memory use, whatever the task's name says)."""
    import seaborn as sns
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter

    info = next((i for i in infos.values() if i.name == "memory"), None)
    if info is None:
        return "metric_vs_seq_len: no memory task in these runs"
    col, length = f"test_{info.metric}", "data_seq_len"
    finals = runs[(runs["task"] == "memory") & (runs["stage"] == "final") & (runs["status"] == "complete")]
    if length not in finals or col not in finals or finals[length].nunique() < 2:
        return "memory task: metric vs sequence length needs final runs at 2+ seq_len (see grid.yaml)"
    by = ["experiment", "architecture", "cell", "variant", length]
    finals = finals.assign(experiment=finals["experiment"] if "experiment" in finals else "")
    rows = []
    for (experiment, arch, cell, variant, t), group in finals.dropna(subset=[length, col]).groupby(by):
        values = finite(group[col])
        mean, low, high = mean_ci(values, min_n=MIN_SEEDS, bounds=info.bounds)  # as the tables
        rows.append({"experiment": experiment, "architecture": arch, "cell": cell, "variant": variant,
                     "T": t, "mean": mean, "ci95_low": low, "ci95_high": high, "seed_values": values})  # fmt: skip
    data = pd.DataFrame(rows).sort_values(["architecture", "T"])
    keys = [("memory", e) for e in dict.fromkeys(data["experiment"])]
    fig, axes = _layout(keys, width=6.5, height=4.4)
    cell_colour = lambda row: style.colour(row["cell"])  # noqa: E731
    parents = runs[(runs["task"] == "memory") & (runs["stage"] == "study")]
    baseline = f"baseline_test_{info.metric}"
    extra = []
    for key in keys:
        ax, sub = axes[key], data[data["experiment"] == key[1]]
        lengths = sorted(sub["T"].unique())
        wide = lengths[-1] / lengths[0] >= 4
        sub = sub.assign(T_drawn=dodge(sub["T"], wide))  # one T, many points: side by side
        _error_bars(ax, sub, "T_drawn", cell_colour)
        _seed_points(ax, sub, "T_drawn", cell_colour)
        sns.lineplot(
            data=sub, x="T_drawn", y="mean", units="architecture", estimator=None, dashes=False, markersize=8,
            ax=ax, **style.kwargs(sub),
        )  # fmt: skip
        mine = parents[parents["experiment"] == key[1]] if key[1] else parents
        if baseline in mine and mine[baseline].notna().any():
            # the baseline depends on T (adding: the variance of the sum): one point per length
            length_of = finals.drop_duplicates("study").set_index("study")[length]
            base = mine.assign(T=mine["study"].map(length_of)).dropna(subset=["T", baseline])
            base = base.groupby("T")[baseline].mean()
            ax.plot(
                base.index, base.values, color="0.15", ls="--", lw=1.2, marker="_", ms=14, zorder=5
            )  # on top: the rnn lines lie on it
            extra = [Line2D([], [], color="0.3", ls="--", lw=1, label=BASELINE_ROW)]
        if wide:
            ax.set_xscale("log")
        ax.set_xticks(lengths, [str(int(t)) for t in lengths])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("sequence length T (steps)")
        ax.set_ylabel(_metric_label(info))
        ax.set_title(
            _title(key, _several(keys), f"test {info.metric} against sequence length T"), fontsize=11
        )
        ax.grid(alpha=0.3)
    fig.suptitle(SEEDS_NOTE, y=1.0, fontsize=10)
    _legend(fig, list(axes.values()), extra)
    return fig


# The figure's name before it said what it plots (reports and notebooks written then call it so).
memory_vs_length = metric_vs_seq_len
RENAMED = {"metric_vs_seq_len": "memory_vs_length"}  # figure → the file name it was saved under before


def compare_experiments(tables: list[TaskTable], style: Style):
    """Per benchmark, each architecture's test metric in every experiment, one colour each."""
    from matplotlib.lines import Line2D

    experiments = list(dict.fromkeys(t.experiment for t in tables))
    if len(experiments) < 2:
        return "compare_experiments: only one experiment"
    benches = [b for b in dict.fromkeys(t.task for t in tables)]
    shown = []
    for bench in benches:
        points = [
            _arch_points(t).dropna(subset=["mean"]).assign(experiment=t.experiment)
            for t in tables
            if t.task == bench
        ]
        points = pd.concat(points, ignore_index=True) if points else pd.DataFrame()
        if len(points) and points["experiment"].nunique() > 1:
            shown.append((bench, points, next(t.info for t in tables if t.task == bench)))
    if not shown:
        return "compare_experiments: no benchmark has final test scores in two experiments"
    archs_max = max(p["architecture"].nunique() for _, p, _ in shown)
    fig, axes = _grid(len(shown), width=5.6, height=0.45 * archs_max + 1.8)
    exp_colour = lambda row: style.experiments.get(row["experiment"], "0.3")  # noqa: E731
    for ax, (bench, points, info) in zip(axes, shown):
        archs = list(dict.fromkeys(points["architecture"]))  # the first experiment's ranking order
        offset = {
            e: (i - (len(experiments) - 1) / 2) * 0.5 / len(experiments) for i, e in enumerate(experiments)
        }
        points["row"] = [
            archs.index(a) + offset[e] for a, e in zip(points["architecture"], points["experiment"])
        ]
        for _, row in points.iterrows():
            err = None
            if pd.notna(row["ci95_low"]):
                err = [[row["mean"] - row["ci95_low"]], [row["ci95_high"] - row["mean"]]]
            ax.errorbar(row["mean"], row["row"], xerr=err, fmt="o", color=exp_colour(row), ms=7, capsize=3)
            values = row.get("seed_values")
            if err is None and isinstance(values, list) and len(values) > 1:
                ax.scatter(
                    values, [row["row"]] * len(values), s=14, color=exp_colour(row), alpha=0.7, linewidths=0
                )
        ax.set_yticks(range(len(archs)), archs)
        ax.set_ylim(len(archs) - 0.5, -0.5)
        ax.set_xlabel(_metric_label(info))
        ax.set_title(bench, fontsize=11)
        ax.grid(alpha=0.3)
    fig.suptitle(SEEDS_NOTE, y=1.0, fontsize=10)
    handles = [
        Line2D([], [], color=style.experiments.get(e, "0.3"), marker="o", ls="none", label=e)
        for e in experiments
    ]
    _legend(fig, axes, handles)
    return fig


def critical_difference(tables: list[TaskTable], style: Style):
    """Friedman/Nemenyi over benchmarks (rnnbench.report.ranking), for one experiment."""
    experiments = list(dict.fromkeys(t.experiment for t in tables))
    if len(experiments) > 1:
        return "critical_difference: one experiment at a time (run the report on each)"
    result = ranking.rank_over_benchmarks(*ranking.scores_of(tables))
    if result is None:
        return "critical_difference: needs 2 benchmarks and 3 architectures ranked on all of them"
    fig = ranking.critical_difference_diagram(result, style)
    if result.left_out:
        text = "; ".join(f"{name}: {why}" for name, why in result.left_out.items())
        fig.text(0.01, 0.0, "left out: " + text, fontsize=7, color="0.35", wrap=True, va="top")
    return fig


def draw_all(runs, histories, tables, infos, importance_df, style) -> dict[str, object]:
    """Every figure, by name, in report order: a matplotlib Figure or why there is none."""
    drawn = {
        "compare_experiments": compare_experiments(tables, style),
        "critical_difference": critical_difference(tables, style),
        "metric_vs_params": metric_vs_params(tables, style),
        "metric_vs_throughput": metric_vs_throughput(tables, style),
        "valid_curves": valid_curves(runs, histories, infos, style),
        "budget_sensitivity": budget_sensitivity(runs, histories, infos, style),
        "optimisation_history": optimisation_history(runs, infos, style),
        "grad_norm": grad_norm(runs, histories, infos, style),
        "importance": importance(importance_df, style),
        "metric_vs_seq_len": metric_vs_seq_len(runs, infos, style),
    }
    if drawn["compare_experiments"] == "compare_experiments: only one experiment":
        del drawn["compare_experiments"]  # nothing missing: a single experiment has nothing to compare
    if "memory" not in {i.name for i in infos.values()}:
        del drawn["metric_vs_seq_len"]
    return drawn


def make_all(runs, histories, tables, infos, importance_df, out: Path) -> Figures:
    """The report's figures as PNG and SVG in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    set_theme()
    out.mkdir(parents=True, exist_ok=True)
    result = Figures()
    for name, drawn in draw_all(runs, histories, tables, infos, importance_df, Style.for_runs(runs)).items():
        if isinstance(drawn, str):
            if name == "importance" and importance_df.empty:
                continue  # importance_table's own notes say why, in the same list: once is enough
            result.notes.append(drawn)
        else:
            result.paths[name] = save(drawn, out, name)
            if name in RENAMED:  # links made to the old file name keep working (not listed again)
                for suffix in (".png", ".svg"):
                    shutil.copyfile(out / f"{name}{suffix}", out / f"{RENAMED[name]}{suffix}")
    return result


__all__ = [
    "CAPTIONS",
    "Figures",
    "Style",
    "draw_all",
    "dodge",
    "make_all",
    "metric_vs_seq_len",
    "pareto_front",
    "show",
]
