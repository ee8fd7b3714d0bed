"""Per-task ranking tables (test metric over final seeds, mean ± Student-t 95% CI) and a cross-task summary."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from rnnbench.report.collect import TaskInfo
from rnnbench.stats import mean_ci, welch_p_value

ALPHA = 0.05
TEST_NOTE = (
    "Mean and 95% confidence interval over final seeds (Student t, n−1 degrees of freedom). "
    f"“≈ best”: a two-sided Welch t-test over seeds does not reject equality with the best architecture "
    f"at α = {ALPHA} (p shown); it needs at least 2 seeds on both sides."
)


@dataclass
class TaskTable:
    task: str
    info: TaskInfo
    table: pd.DataFrame
    caption: str
    notes: list[str] = field(default_factory=list)


def _fmt(x: float, digits: int = 4) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def rank_task(runs: pd.DataFrame, info: TaskInfo, benchmark: str | None = None) -> TaskTable:
    """Architectures of one benchmark (task entry; default: the whole task) ranked by the mean final
    test metric; unranked ones listed last."""
    col = f"test_{info.metric}"
    task_runs = runs[runs["benchmark"] == benchmark] if benchmark else runs[runs["task"] == info.name]
    studies = task_runs[task_runs["stage"] == "study"].set_index("study")
    finals = task_runs[(task_runs["stage"] == "final") & (task_runs["status"] == "complete")]
    hp_cols = sorted(c for c in runs.columns if c.startswith("hp_"))
    rows = []
    for study, group in task_runs.groupby("study"):
        seeds = finals[finals["study"] == study]
        values = [float(v) for v in seeds[col].dropna()] if col in seeds else []
        mean, low, high = mean_ci(values)
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
        rows.append(
            {
                "architecture": first["architecture"],
                "cell": first["cell"],
                "variant": first["variant"],
                "seeds": len(values),
                "mean": mean,
                "ci95_low": low,
                "ci95_high": high,
                "_values": values,
                "best_valid": parent.get("best_valid") if parent is not None else math.nan,
                "params": _median(source, "params_total"),
                "train_tokens_per_s": _median(source, "train_tokens_per_s"),
                "peak_memory_mb": _max(source, "peak_memory_mb"),
                "trials_ok/pruned/failed": "/".join(
                    str(int((search["status"] == s).sum())) for s in ("complete", "pruned", "failed")
                ),
                "best_hparams": ", ".join(f"{k}={_short(v)}" for k, v in best_hp.items()),
            }
        )
    df = pd.DataFrame(rows)
    notes = []
    if df.empty:
        return TaskTable(benchmark or info.name, info, df, "no runs", ["no runs"])
    ranked = df[df["seeds"] > 0].sort_values("mean", ascending=info.direction == "minimize")
    unranked = df[df["seeds"] == 0]
    ranked = ranked.assign(rank=range(1, len(ranked) + 1))
    best_values = ranked["_values"].iloc[0] if len(ranked) else []
    p_values, marks = [], []
    for i, values in enumerate(ranked["_values"]):
        if i == 0:
            p_values.append(math.nan)
            marks.append("best")
            continue
        p = welch_p_value(best_values, values)
        p_values.append(p)
        marks.append("n/a (<2 seeds)" if math.isnan(p) else ("≈ best" if p >= ALPHA else "worse"))
    ranked = ranked.assign(p_vs_best=p_values, vs_best=marks)
    if len(unranked):
        unranked = unranked.assign(rank=pd.NA, p_vs_best=math.nan, vs_best="no final seeds")
        notes.append("not ranked (no completed final seed yet): " + ", ".join(unranked["architecture"]))
    table = pd.concat([ranked, unranked], ignore_index=True) if len(unranked) else ranked
    baseline = _baseline(task_runs, info)
    if baseline is None:
        notes.append("trivial baseline: not logged yet (it is logged when a study finishes)")
    else:
        table = pd.concat(
            [table, pd.DataFrame([{"architecture": "trivial baseline", "mean": baseline, "seeds": 0}])],
            ignore_index=True,
        )
    table = table.drop(columns="_values")
    order = [
        "rank", "architecture", "cell", "variant", "mean", "ci95_low", "ci95_high", "seeds", "vs_best",
        "p_vs_best", "best_valid", "params", "train_tokens_per_s", "peak_memory_mb",
        "trials_ok/pruned/failed", "best_hparams",
    ]  # fmt: skip
    table = table[[c for c in order if c in table.columns]]
    caption = (
        f"{benchmark or info.name}: architectures ranked by test {info.metric} ({info.better}). {TEST_NOTE} "
        "params: total trainable parameters; train tokens/s: median over epochs; peak memory in MB."
    )
    return TaskTable(benchmark or info.name, info, table.reset_index(drop=True), caption, notes)


def _baseline(task_runs: pd.DataFrame, info: TaskInfo) -> float | None:
    """A trivial baseline the runs logged (``baseline_test_<metric>`` or ``baseline_<metric>``), if any."""
    for col in (f"baseline_test_{info.metric}", f"baseline_{info.metric}"):
        if col in task_runs and task_runs[col].notna().any():
            return float(task_runs[col].dropna().mean())
    return None


def _median(df: pd.DataFrame, col: str) -> float:
    return float(df[col].median()) if col in df and df[col].notna().any() else math.nan


def _max(df: pd.DataFrame, col: str) -> float:
    return float(df[col].max()) if col in df and df[col].notna().any() else math.nan


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def summary(tables: list[TaskTable]) -> pd.DataFrame:
    """Rank of every architecture on every task, and its mean rank over the tasks it was ranked on."""
    frames = []
    for t in tables:
        ranked = t.table[t.table["rank"].notna()] if "rank" in t.table else t.table.iloc[0:0]
        frames.append(ranked.set_index("architecture")["rank"].rename(t.task).astype(float))
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, axis=1)
    df["mean_rank"] = df.mean(axis=1, skipna=True)
    df["tasks_ranked"] = df.drop(columns="mean_rank").notna().sum(axis=1)
    # mean ranks over different sets of benchmarks do not compare: most benchmarks first
    return df.sort_values(["tasks_ranked", "mean_rank"], ascending=[False, True]).reset_index(
        names="architecture"
    )


def display_frame(t: TaskTable) -> pd.DataFrame:
    """The table as shown: the metric as ``mean [low, high]``, numbers rounded."""
    df = t.table.copy()
    if df.empty:
        return df
    df.insert(
        df.columns.get_loc("mean"),
        f"test {t.info.metric} (95% CI)",
        [
            f"{_fmt(m)} [{_fmt(lo)}, {_fmt(hi)}]" if pd.notna(lo) else _fmt(m)
            for m, lo, hi in zip(df["mean"], df.get("ci95_low", math.nan), df.get("ci95_high", math.nan))
        ],
    )
    df = df.drop(columns=[c for c in ("mean", "ci95_low", "ci95_high") if c in df])
    for c in ("p_vs_best", "best_valid", "train_tokens_per_s", "peak_memory_mb"):
        if c in df:
            df[c] = df[c].map(lambda v: _fmt(float(v), 3) if pd.notna(v) else "–")
    if "params" in df:
        df["params"] = df["params"].map(lambda v: f"{int(v):,}" if pd.notna(v) else "–")
    if "rank" in df:
        df["rank"] = df["rank"].map(lambda v: str(int(v)) if pd.notna(v) else "–")
    return df.fillna("–")


def to_markdown(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines) + "\n"


def write(tables: list[TaskTable], summary_df: pd.DataFrame, out: Path) -> dict[str, list[Path]]:
    """CSV (raw numbers), Markdown and HTML (formatted) per task, plus the summary; one tables.html."""
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {}
    sections = []
    for t in tables:
        files = {s: out / f"{t.task}{s}" for s in (".csv", ".md", ".html")}  # not with_suffix: mem.T10
        t.table.to_csv(files[".csv"], index=False)
        shown = display_frame(t)
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in t.notes)
        files[".md"].write_text(
            f"## {t.task}\n\n{t.caption}\n\n{to_markdown(shown)}\n" + "".join(f"- {n}\n" for n in t.notes)
        )
        section = (
            f"<h2>{html.escape(t.task)}</h2>\n"
            + shown.to_html(index=False, classes="rank", border=0).replace(
                '<table border="0" class="dataframe rank">',
                f'<table class="dataframe rank"><caption>{html.escape(t.caption)}</caption>',
            )
            + (f"<ul class='notes'>{notes}</ul>" if notes else "")
        )
        files[".html"].write_text(_page(f"{t.task}", section))
        sections.append(section)
        written[t.task] = list(files.values())
    if not summary_df.empty:
        summary_df.to_csv(out / "summary.csv", index=False)
        shown = summary_df.copy()
        for c in shown.columns[1:]:
            shown[c] = shown[c].map(
                lambda v, c=c: "–" if pd.isna(v) else (f"{v:.2f}" if c == "mean_rank" else f"{int(v)}")
            )
        cap = (
            "Cross-task summary: rank of each architecture per benchmark (1 = best test metric) and its mean "
            "rank over the benchmarks it was ranked on (bidirectional ones skip causal tasks); sorted by "
            "benchmarks ranked, then mean rank."
        )
        (out / "summary.md").write_text(f"## summary\n\n{cap}\n\n{to_markdown(shown)}")
        section = "<h2>summary</h2>\n" + shown.to_html(index=False, border=0).replace(
            '<table border="0" class="dataframe">', f'<table class="dataframe"><caption>{cap}</caption>'
        )
        (out / "summary.html").write_text(_page("summary", section))
        sections.insert(0, section)
        written["summary"] = [out / "summary.csv", out / "summary.md", out / "summary.html"]
    (out / "tables.html").write_text(_page("tables", "\n".join(sections)))
    return written


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{padding:4px 8px;border-bottom:1px solid #ddd;text-align:right}
td:nth-child(2),th:nth-child(2){text-align:left}caption{caption-side:top;text-align:left;max-width:1000px;color:#333;padding-bottom:.5em}
img{max-width:100%}.notes{color:#8a4b00}"""


def _page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body>{body}</body></html>"
    )
