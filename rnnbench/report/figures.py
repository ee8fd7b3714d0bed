"""Seaborn figures (PNG + SVG). One colour per cell and one marker per variant, in every figure."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from rnnbench.report.collect import TaskInfo, best_search_runs
from rnnbench.report.tables import TaskTable
from rnnbench.stats import MIN_SEEDS, finite, mean_ci

SEEDS_NOTE = f"mean; 95% CI over ≥{MIN_SEEDS} seeds, else each seed as a dot"
# fANOVA on 2-4 trials returns the same split shares for every study (seen: 0.66/0.34 everywhere)
MIN_TRIALS_FOR_IMPORTANCE = 5
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]


@dataclass
class Style:
    """The fixed cell → colour and variant → marker maps shared by all figures."""

    colours: dict[str, tuple]
    markers: dict[str, str]

    @classmethod
    def for_runs(cls, runs: pd.DataFrame) -> Style:
        import seaborn as sns

        cells = sorted(runs["cell"].dropna().unique())
        variants = sorted(runs["variant"].dropna().unique())
        palette = sns.color_palette("colorblind", max(len(cells), 1))
        return cls(
            {c: palette[i % len(palette)] for i, c in enumerate(cells)},
            {v: MARKERS[i % len(MARKERS)] for i, v in enumerate(variants)},
        )

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


def _metric_label(info: TaskInfo, split: str = "test") -> str:
    return f"{split} {info.metric} (unitless; {info.better})"


def _save(fig, out: Path, name: str, result: Figures) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")
    fig.savefig(out / f"{name}.svg", bbox_inches="tight")
    plt.close(fig)
    result.paths[name] = out / f"{name}.png"


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


def _legend(fig, axes) -> None:
    """One legend for the figure (cell colours, variant markers), outside the plotting area."""
    fig.tight_layout()
    handles, labels = {}, []
    for ax in axes:
        h, ls = ax.get_legend_handles_labels()
        for handle, label in zip(h, ls):
            if label not in handles:
                handles[label] = handle
                labels.append(label)
        if ax.get_legend():
            ax.get_legend().remove()
    if handles:
        fig.legend(
            [handles[k] for k in labels], labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False
        )


def _arch_points(t: TaskTable) -> pd.DataFrame:
    df = t.table
    if df.empty or "rank" not in df:
        return df.iloc[0:0]
    return df[df["seeds"].fillna(0) > 0].copy()


def metric_vs_params(tables: list[TaskTable], style: Style, out: Path, result: Figures) -> None:
    _scatter_per_task(tables, style, out, result, "params", "parameters (count)", "metric_vs_params")


def metric_vs_throughput(tables: list[TaskTable], style: Style, out: Path, result: Figures) -> None:
    _scatter_per_task(
        tables, style, out, result, "train_tokens_per_s", "training throughput (tokens/s)",
        "metric_vs_throughput", pareto=True,
    )  # fmt: skip


def _count_axis(ax, values: pd.Series, label: str) -> None:
    """Log scale only when the values span a decade (else log ticks are unreadable); 12k, 1.2M labels."""
    from matplotlib.ticker import EngFormatter, NullFormatter

    positive = values[values > 0]
    wide = len(positive) and positive.max() / positive.min() >= 10
    if wide:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_xlabel(label + (", log scale" if wide else ""))


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


def _seed_points(ax, points: pd.DataFrame, x: str, style: Style, y: str = "mean") -> None:
    """Below MIN_SEEDS seeds there is no interval (see stats.py): each seed's value as a small dot."""
    for _, row in points.iterrows():
        values = row.get("seed_values")
        if pd.isna(row.get("ci95_low")) and isinstance(values, list) and len(values) > 1:
            ax.scatter([row[x]] * len(values), values, s=14, color=style.colours.get(row["cell"], "0.4"),
                       alpha=0.7, zorder=2, linewidths=0)  # fmt: skip


def _scatter_per_task(tables, style, out, result, x, xlabel, name, pareto=False) -> None:
    import seaborn as sns

    shown = [(t, _arch_points(t)) for t in tables]
    shown = [(t, p.dropna(subset=[x, "mean"])) for t, p in shown]
    shown = [(t, p) for t, p in shown if len(p)]
    if not shown:
        result.notes.append(f"{name}: no architecture has final test scores yet")
        return
    fig, axes = _grid(len(shown))
    for ax, (t, p) in zip(axes, shown):
        has_ci = p["ci95_low"].notna()
        ax.errorbar(
            p.loc[has_ci, x], p.loc[has_ci, "mean"],
            yerr=[p.loc[has_ci, "mean"] - p.loc[has_ci, "ci95_low"], p.loc[has_ci, "ci95_high"] - p.loc[has_ci, "mean"]],
            fmt="none", ecolor="0.6", elinewidth=1, capsize=3, zorder=1,
        )  # fmt: skip
        _seed_points(ax, p, x, style)
        sns.scatterplot(data=p, x=x, y="mean", s=90, ax=ax, zorder=3, **style.kwargs(p))
        if pareto:
            front = pareto_front(p, x, t.info.direction).sort_values(x)
            ax.plot(front[x], front["mean"], "-", color="0.2", lw=1.2, zorder=2, label="Pareto front")
            ax.scatter(front[x], front["mean"], s=260, facecolors="none", edgecolors="0.2", zorder=2)
        for _, row in p.iterrows() if len(p) <= 4 else ():  # more labels than that only overlap
            ax.annotate(
                row["architecture"],
                (row[x], row["mean"]),
                textcoords="offset points",
                xytext=(6, 6),
                fontsize=8,
            )
        _count_axis(ax, p[x], xlabel)
        ax.set_ylabel(_metric_label(t.info))
        ax.set_title(f"{t.task} ({SEEDS_NOTE})")
        ax.grid(alpha=0.3)
    _legend(fig, axes)
    _save(fig, out, name, result)


def _curves(runs, histories, tasks, metric_of, ylabel_of, name, out, style, result, *, best_only, logy=False):
    import seaborn as sns

    if histories.empty:
        result.notes.append(f"{name}: no per-epoch history logged")
        return
    meta = runs.set_index("run_id")[["benchmark", "cell", "variant", "architecture", "stage"]]
    hist = histories.join(meta, on="run_id")
    if best_only:
        hist = hist[hist["best_trial"]]
    panels = []
    for task in sorted(hist["benchmark"].dropna().unique()):
        sub = hist[(hist["benchmark"] == task) & (hist["metric"] == metric_of(tasks[task]))]
        if len(sub):
            panels.append((task, sub))
    if not panels:
        result.notes.append(f"{name}: no per-epoch history logged")
        return
    fig, axes = _grid(len(panels))
    for ax, (task, sub) in zip(axes, panels):
        sns.lineplot(
            data=sub, x="step", y="value", units="architecture" if best_only else None,
            estimator=None if best_only else "mean", errorbar=None if best_only else ("ci", 95),
            markersize=8, dashes=False, ax=ax, **style.kwargs(sub),
        )  # fmt: skip
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel_of(tasks[task]))
        ax.set_title(task)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    _legend(fig, axes)
    _save(fig, out, name, result)


def valid_curves(runs, histories, tasks, style, out, result) -> None:
    _curves(
        runs, histories, tasks, lambda i: f"valid_{i.metric}",
        lambda i: f"validation {i.metric} (unitless; {i.better})", "valid_curves", out, style, result,
        best_only=True,
    )  # fmt: skip


def grad_norm(runs, histories, tasks, style, out, result) -> None:
    """Mean global gradient norm per epoch (before clipping) over the final seeds and best trial."""
    _curves(
        runs, histories, tasks, lambda i: "grad_norm", lambda i: "gradient L2 norm (log scale)",
        "grad_norm", out, style, result, best_only=False, logy=True,
    )  # fmt: skip


def optimisation_history(runs: pd.DataFrame, tasks, style, out, result) -> None:
    """Every search trial's best validation score, and the running best, per study."""
    import seaborn as sns

    search = runs[runs["stage"] == "search"].copy()
    panels = []
    for task in sorted(search["benchmark"].dropna().unique()):
        col = f"best_valid_{tasks[task].metric}"
        sub = search[search["benchmark"] == task]
        if col in sub and sub[col].notna().any():
            sub = sub.assign(value=sub[col]).dropna(subset=["value"]).sort_values("trial")
            panels.append((task, sub))
    if not panels:
        result.notes.append("optimisation_history: no completed search trial yet")
        return
    fig, axes = _grid(len(panels))
    for ax, (task, sub) in zip(axes, panels):
        info = tasks[task]
        sub = sub.copy()
        sub["trial"] = sub["trial"].astype(float)
        running = (
            sub.groupby("study")["value"].cummin()
            if info.direction == "minimize"
            else sub.groupby("study")["value"].cummax()
        )
        sub["running_best"] = running
        sns.scatterplot(data=sub, x="trial", y="value", s=60, alpha=0.55, ax=ax, **style.kwargs(sub))
        sns.lineplot(
            data=sub, x="trial", y="running_best", units="study", estimator=None, drawstyle="steps-post",
            ax=ax, legend=False, dashes=False, **style.kwargs(sub),
        )  # fmt: skip
        ax.set_xlabel("search trial number")
        ax.set_ylabel(f"best validation {info.metric} of trial (unitless)")
        ax.set_title(f"{task}: trials (points), running best (lines)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    _legend(fig, axes)
    _save(fig, out, "optimisation_history", result)


def importances(
    runs: pd.DataFrame, experiment: str, journal: Path | None, style, out, result
) -> pd.DataFrame:
    """fANOVA hyperparameter importance per study (seed fixed: stable across report runs)."""
    if journal is None or not journal.is_file():
        result.notes.append("hyperparameter importance: no Optuna journal found (pass --home), skipped")
        return pd.DataFrame()
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
    meta = runs[runs["stage"] == "study"].drop_duplicates("study").set_index("study")
    rows, skipped, few = [], [], 0
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        name = summary.study_name
        if not name.startswith(experiment + "/") or "::" in name or name not in meta.index:
            continue
        study = optuna.load_study(study_name=name, storage=storage)
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
            rows.append({"study": name, "task": m["benchmark"], "cell": m["cell"], "variant": m["variant"],
                         "architecture": m["architecture"], "hparam": param, "importance": value})  # fmt: skip
    if few:
        result.notes.append(
            f"hyperparameter importance not computed for {few} studies with fewer than "
            f"{MIN_TRIALS_FOR_IMPORTANCE} completed trials (a forest fitted to so few points reflects its splits, not the data)"
        )
    if skipped:
        result.notes.append("hyperparameter importance skipped for " + "; ".join(skipped))
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    import seaborn as sns

    tasks = sorted(df["task"].unique())
    hparams = sorted(df["hparam"].unique())
    fig, axes = _grid(len(tasks), width=4.8, height=0.9 * len(hparams) + 2.2)
    for ax, task in zip(axes, tasks):
        sub = df[df["task"] == task].copy()
        # one row per hyperparameter, architectures side by side within it so no point hides another
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
        ax.set_title(task)
        ax.grid(alpha=0.3)
    _legend(fig, axes)
    _save(fig, out, "importance", result)
    return df


def memory_vs_length(runs: pd.DataFrame, tasks, style, out, result) -> None:
    """Memory task: final test metric against sequence length T, one line per architecture."""
    import seaborn as sns
    from matplotlib.ticker import NullFormatter

    info = next((i for i in tasks.values() if i.name == "memory"), None)
    if info is None:
        return
    col, length = f"test_{info.metric}", "data_seq_len"
    finals = runs[(runs["task"] == "memory") & (runs["stage"] == "final") & (runs["status"] == "complete")]
    if length not in finals or col not in finals or finals[length].nunique() < 2:
        result.notes.append(
            "memory task: metric vs sequence length needs final runs at 2+ seq_len (see grid.yaml)"
        )
        return
    rows = []
    for (arch, cell, variant, t), group in finals.dropna(subset=[length, col]).groupby(
        ["architecture", "cell", "variant", length]
    ):
        values = finite(group[col])
        mean, low, high = mean_ci(values, min_n=MIN_SEEDS)  # the tables' t-interval and rule
        rows.append(
            {
                "architecture": arch,
                "cell": cell,
                "variant": variant,
                "T": t,
                "mean": mean,
                "ci95_low": low,
                "ci95_high": high,
                "seed_values": values,
            }
        )
    data = pd.DataFrame(rows).sort_values(["architecture", "T"])
    baseline = f"baseline_test_{info.metric}"
    fig, axes = _grid(1, width=6.5, height=4.4)
    ax = axes[0]
    has_ci = data["ci95_low"].notna()
    ax.errorbar(
        data.loc[has_ci, "T"], data.loc[has_ci, "mean"],
        yerr=[data.loc[has_ci, "mean"] - data.loc[has_ci, "ci95_low"], data.loc[has_ci, "ci95_high"] - data.loc[has_ci, "mean"]],
        fmt="none", ecolor="0.6", elinewidth=1, capsize=3, zorder=1,
    )  # fmt: skip
    _seed_points(ax, data, "T", style)
    sns.lineplot(
        data=data, x="T", y="mean", units="architecture", estimator=None, dashes=False, markersize=8,
        ax=ax, **style.kwargs(data),
    )  # fmt: skip
    parents = runs[(runs["task"] == "memory") & (runs["stage"] == "study")]
    if baseline in parents and parents[baseline].notna().any():
        ax.axhline(parents[baseline].dropna().mean(), color="0.3", ls="--", lw=1, label="trivial baseline")
    lengths = sorted(data["T"].unique())
    if lengths[-1] / lengths[0] >= 4:
        ax.set_xscale("log")
    ax.set_xticks(lengths, [str(int(t)) for t in lengths])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("sequence length T (steps)")
    ax.set_ylabel(_metric_label(info))
    ax.set_title(f"memory: where each architecture stops learning ({SEEDS_NOTE})")
    ax.grid(alpha=0.3)
    _legend(fig, axes)
    _save(fig, out, "memory_vs_length", result)


def make_all(runs, histories, tables, tasks, experiment, out: Path, journal: Path | None) -> Figures:
    import matplotlib

    matplotlib.use("Agg")
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid")
    out.mkdir(parents=True, exist_ok=True)
    style = Style.for_runs(runs)
    result = Figures()
    metric_vs_params(tables, style, out, result)
    metric_vs_throughput(tables, style, out, result)
    valid_curves(runs, histories, tasks, style, out, result)
    optimisation_history(runs, tasks, style, out, result)
    grad_norm(runs, histories, tasks, style, out, result)
    imp = importances(runs, experiment, journal, style, out, result)
    if not imp.empty:
        imp.to_csv(out / "importance.csv", index=False)
    memory_vs_length(runs, tasks, style, out, result)
    return result


__all__ = ["Figures", "Style", "best_search_runs", "make_all", "pareto_front"]
