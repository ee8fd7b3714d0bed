"""``rnnbench report``: MLflow runs → tidy table → ranking tables → seaborn figures → notebook → HTML."""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = ("html", "notebook", "all")


@dataclass
class Report:
    out: Path
    index: Path
    files: dict[str, list[Path]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    notebook_errors: list[str] = field(default_factory=list)


def build_report(
    experiment: str,
    *,
    tracking_uri: str,
    out: Path,
    fmt: str = "all",
    journal: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Everything under ``out``: data, tables/, figures/, report.html and/or the executed notebook, index.html."""
    from rnnbench.report import collect as collect_mod
    from rnnbench.report import figures as figures_mod
    from rnnbench.report import notebook as notebook_mod
    from rnnbench.report import tables as tables_mod

    say = progress or (lambda message: None)
    client = collect_mod.open_client(tracking_uri)
    say(f"collecting runs of {experiment!r} from {tracking_uri}")
    data = collect_mod.collect(client, experiment, tracking_uri=tracking_uri, progress=say)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[Path]] = {"data": collect_mod.save(data, out)}
    say(f"{len(data.runs)} runs; writing tables")
    task_tables = [tables_mod.rank_task(data.runs, info, b) for b, info in data.benchmarks.items()]
    summary = tables_mod.summary(task_tables)
    written = tables_mod.write(task_tables, summary, out / "tables")
    files["tables"] = [out / "tables" / "tables.html"] + [p for ps in written.values() for p in ps]
    notes = list(data.notes) + [f"{t.task}: {n}" for t in task_tables for n in t.notes]
    say("drawing figures")
    figs = figures_mod.make_all(
        data.runs, data.histories, task_tables, data.benchmarks, experiment, out / "figures", journal
    )
    notes += figs.notes
    files["figures"] = list(figs.paths.values())
    report = Report(out, out / "index.html", files, notes)
    if fmt in ("html", "all"):
        files["html"] = [_static_html(experiment, out, written, figs.paths, notes)]
    if fmt in ("notebook", "all"):
        say("executing the notebook")
        tables = (["summary"] if "summary" in written else []) + [t.task for t in task_tables]
        nb = notebook_mod.build(experiment, tracking_uri, tables, list(figs.paths), notes)
        report.notebook_errors = notebook_mod.execute(nb, out)
        files["notebook"] = list(notebook_mod.write(nb, out))
    order = ["html", "notebook", "tables", "figures", "data"]
    links = {k: files[k] for k in order if k in files}
    report.index = notebook_mod.index_page(experiment, out, links, notes)
    return report


def _static_html(experiment, out: Path, written, figure_paths, notes) -> Path:
    """report.html: the tables and figures on one page, no kernel needed."""
    from rnnbench.report.tables import _page

    body = [f"<h1>rnnbench report: {html.escape(experiment)}</h1>"]
    if notes:
        body.append("<ul class='notes'>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    tables_html = (out / "tables" / "tables.html").read_text()
    body.append(tables_html.split("<body>", 1)[1].rsplit("</body>", 1)[0])
    for name, path in figure_paths.items():
        body.append(
            f"<h2>{html.escape(name)}</h2><img src='{path.relative_to(out).as_posix()}' alt='{name}'>"
        )
    path = out / "report.html"
    path.write_text(_page(f"{experiment} report", "\n".join(body)))
    return path
