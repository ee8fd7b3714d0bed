"""``rnnbench report``: MLflow runs → tidy table → ranking tables → seaborn figures → notebook → HTML."""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from rnnbench.report import budget as budget_mod
from rnnbench.report import collect as collect_mod
from rnnbench.report import figures as figures_mod
from rnnbench.report import notebook as notebook_mod
from rnnbench.report import search as search_mod
from rnnbench.report import tables as tables_mod
from rnnbench.report.figures import CAPTIONS
from rnnbench.report.tables import _page, benchmark_html, benchmarks_of, summary_html

FORMATS = ("html", "notebook", "all")


@dataclass
class Report:
    out: Path
    index: Path
    files: dict[str, list[Path]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    notebook_errors: list[str] = field(default_factory=list)


def build_report(
    experiments: str | list[str],
    *,
    tracking_uri: str,
    out: Path,
    fmt: str = "all",
    journal: Path | None = None,
    ledger=None,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Everything under ``out``: data, tables/, figures/, report.html and/or the executed notebook,
    index.html. Several experiments: one report comparing them (tidy tables with an ``experiment``
    column, rankings side by side, one column of figure panels each). Importances come from
    ``ledger`` (an Optuna storage) or else the ``journal`` file; the notebook re-reads a journal."""
    experiments = [experiments] if isinstance(experiments, str) else list(experiments)
    title = " vs ".join(experiments)
    say = progress or (lambda message: None)
    client = collect_mod.open_client(tracking_uri)
    say(f"collecting runs of {title!r} from {tracking_uri}")
    data = collect_mod.collect_many(client, experiments, tracking_uri=tracking_uri, progress=say)
    # the searched ranges, saved with the runs: a rebuilt report flags range edges without MLflow
    data.runs = search_mod.with_search_space(data.runs, search_mod.search_spaces(client, experiments))
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[Path]] = {"data": collect_mod.save(data, out)}
    importance, notes = figures_mod.importance_table(data.runs, ledger if ledger is not None else journal)
    if not importance.empty:
        importance.to_parquet(out / collect_mod.IMPORTANCE_FILE, index=False)
        files["data"].append(out / collect_mod.IMPORTANCE_FILE)
    return _render(data, experiments, importance, notes, files, out, fmt, journal, say)


def rebuild_report(out: Path, *, fmt: str = "all", progress: Callable[[str], None] | None = None) -> Report:
    """Render a saved report again from its own tidy tables (runs, histories, importances,
    items), with this rnnbench's tables, verdicts and figures; no MLflow store needed."""
    data = collect_mod.load_saved(out)
    collect_mod.save(data, out)  # again, as reports are saved now (no machine paths, for one)
    experiments = list(data.runs["experiment"].dropna().unique())
    saved = out / collect_mod.IMPORTANCE_FILE
    importance = pd.read_parquet(saved) if saved.is_file() else pd.DataFrame()
    files = {"data": [p for p in (out / collect_mod.RUNS_FILE, out / "runs.csv", out / collect_mod.HISTORIES_FILE,
                                  saved, out / collect_mod.ITEMS_FILE) if p.is_file()]}  # fmt: skip
    return _render(data, experiments, importance, [], files, out, fmt, None, progress or (lambda m: None))


def _render(data, experiments, importance, notes, files, out: Path, fmt: str, journal, say) -> Report:
    """Tables, figures, report.html, the executed notebook and index.html from collected data."""
    title = " vs ".join(experiments)
    tracking_uri = data.tracking_uri
    say(f"{len(data.runs)} runs; writing tables")
    task_tables = tables_mod.ranking_tables(data.runs, data.benchmarks, data.items)
    sums = tables_mod.summaries(task_tables)
    written = tables_mod.write(task_tables, sums, out / "tables")
    files["tables"] = [out / "tables" / "tables.html"] + [p for ps in written.values() for p in ps]
    sensitivity = budget_mod.budget_sensitivity(data.runs, data.histories, data.benchmarks)
    files["tables"] += budget_mod.write(sensitivity, out / "tables")
    files["tables"] += search_mod.write(data.runs, out / "tables")
    several = len(experiments) > 1
    notes = list(data.notes) + notes + search_mod.edge_notes(search_mod.best_values(data.runs))
    notes += [f"{t.task}{f' ({t.experiment})' if several else ''}: {n}" for t in task_tables for n in t.notes]
    say("drawing figures")
    figs = figures_mod.make_all(
        data.runs, data.histories, task_tables, data.benchmarks, importance, out / "figures"
    )
    notes += figs.notes
    files["figures"] = list(figs.paths.values())
    report = Report(out, out / "index.html", files, notes)
    if fmt in ("html", "all"):
        extra = [budget_mod.html_section(sensitivity), search_mod.search_html(data.runs)]
        files["html"] = [_static_html(title, out, task_tables, sums, figs.paths, notes, extra)]
    if fmt in ("notebook", "all"):
        say("executing the notebook")
        nb = notebook_mod.build(experiments, tracking_uri, journal, out)
        report.notebook_errors = notebook_mod.execute(nb, out)
        files["notebook"] = list(notebook_mod.write(nb, out))
    order = ["html", "notebook", "tables", "figures", "data"]
    links = {k: files[k] for k in order if k in files}
    report.index = notebook_mod.index_page(title, out, links, notes)
    return report


def _static_html(title: str, out: Path, task_tables, sums, figure_paths, notes, extra=()) -> Path:
    """report.html: the tables and figures on one page, no kernel needed; the same functions
    render them in the notebook."""
    body = [f"<h1>rnnbench report: {html.escape(title)}</h1>"]
    if notes:
        body.append("<ul class='notes'>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    body.append(summary_html(sums))
    body += [benchmark_html(task_tables, b) for b in benchmarks_of(task_tables)]
    body += list(extra)  # sections computed beside the rankings (budget sensitivity, search coverage)
    for name, path in figure_paths.items():
        body.append(
            f"<h2>{html.escape(name)}</h2><figure><img src='{path.relative_to(out).as_posix()}' alt='{name}'>"
            f"<figcaption>{html.escape(CAPTIONS.get(name, ''))}</figcaption></figure>"
        )
    path = out / "report.html"
    path.write_text(_page(f"{title} report", "\n".join(body)))
    return path
