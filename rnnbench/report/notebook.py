"""The report notebook: built with nbformat, executed headless with nbclient, HTML via nbconvert."""

from __future__ import annotations

import html
import os
import subprocess
from pathlib import Path

from rnnbench.errors import RnnbenchError
from rnnbench.report.figures import CAPTIONS
from rnnbench.report.tables import _page

# nbformat (+0.11 s), nbclient (+0.3 s) and nbconvert (+0.85 s) stay local: every importer of
# rnnbench.report (load_results, `rnnbench run`'s results table) would pay them for nothing.

NOTEBOOK = "report.ipynb"
NOTEBOOK_HTML = "report_notebook.html"


# The figures, in report order, as the notebook calls them (figures.draw_all makes the same calls).
FIGURE_CALLS = {
    "compare_experiments": "figures.compare_experiments(ranked, style)",
    "critical_difference": "figures.critical_difference(ranked, style)",
    "metric_vs_params": "figures.metric_vs_params(ranked, style)",
    "metric_vs_throughput": "figures.metric_vs_throughput(ranked, style)",
    "valid_curves": "figures.valid_curves(runs, histories, infos, style)",
    "budget_sensitivity": "figures.budget_sensitivity(runs, histories, infos, style)",
    "optimisation_history": "figures.optimisation_history(runs, infos, style)",
    "grad_norm": "figures.grad_norm(runs, histories, infos, style)",
    "importance": "figures.importance(importance, style)",
    "metric_vs_seq_len": "figures.metric_vs_seq_len(runs, infos, style)",
}


def shareable(location: str | Path | None, out: Path) -> str | None:
    """A local path or sqlite URI as seen from the report folder ``out`` (where the notebook runs),
    so a committed or shared notebook names no machine's paths; other URIs as they are."""
    if location is None or str(location) == "":
        return None if location is None else ""
    text = str(location)
    prefix = "sqlite:///" if text.startswith("sqlite:///") else ""
    path = text.removeprefix(prefix)
    if prefix or "://" not in text:
        if Path(path).is_absolute():
            path = os.path.relpath(path, Path(out).resolve())
        return prefix + path
    return text


def build(experiments: list[str], tracking_uri: str, journal: Path | None = None, out: Path | None = None):
    """The analysis as cells a user edits and re-runs: load the tidy tables, filter, rank, draw."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    md, code = new_markdown_cell, new_code_cell
    if out is not None:  # paths relative to the notebook's folder: nothing of this machine's
        tracking_uri, journal = shareable(tracking_uri, out), shareable(journal, out)
    several = len(experiments) > 1
    title = " vs ".join(f"`{e}`" for e in experiments)
    cells = [
        md(
            f"# rnnbench report: {title}\n\n"
            "Every MLflow run is one row of `runs.parquet` (per-epoch curves: `histories.parquet`; fANOVA "
            "importances: `importance.parquet`), with an `experiment` column. The cells below rank and draw "
            "from these tables with the functions `rnnbench report` uses for its HTML: edit a cell (the "
            "filters below, a figure's data) and run it again. `refresh = True` collects again from MLflow."
        ),
        code(
            f"experiments = {experiments!r}\n"
            f"tracking_uri = {tracking_uri!r}\n"
            f"journal = {str(journal) if journal else None!r}  # the Optuna ledger, for importances on refresh\n"
            "refresh = False  # True: collect the runs again from tracking_uri\n"
            "cells = None  # e.g. ['lstm', 'gru']: keep only these cells\n"
            "benchmarks = None  # e.g. ['memory-T12']: keep only these benchmarks\n"
            "family = 'best_vs_rest'  # or 'all_pairs': which comparisons are Holm-adjusted together",
            metadata={"tags": ["parameters"]},
        ),
        code(
            "from pathlib import Path\n\n"
            "import pandas as pd\n"
            "from IPython.display import HTML, Markdown, display\n\n"
            "from rnnbench.report import collect, figures, tables, verdicts\n\n"
            "if refresh:\n"
            "    data = collect.collect_many(collect.open_client(tracking_uri), experiments)\n"
            "    runs, histories = data.runs, data.histories\n"
            "    importance, _ = figures.importance_table(runs, Path(journal) if journal else None)\n"
            "else:\n"
            "    runs = pd.read_parquet(collect.RUNS_FILE)\n"
            "    histories = pd.read_parquet(collect.HISTORIES_FILE)\n"
            "    has_importance = Path(collect.IMPORTANCE_FILE).is_file()\n"
            "    importance = pd.read_parquet(collect.IMPORTANCE_FILE) if has_importance else pd.DataFrame()\n"
            "# per-item outcomes of the final seeds (paired verdicts); None for stores from before them\n"
            "items = data.items if refresh else (\n"
            "    pd.read_parquet(collect.ITEMS_FILE) if Path(collect.ITEMS_FILE).is_file() else None\n"
            ")"
        ),
        md("## Select the runs\n\nAny pandas filter works here; everything below follows it."),
        code(
            "if cells:\n"
            "    runs = runs[runs['cell'].isin(cells)]\n"
            "if benchmarks:\n"
            "    runs = runs[runs['benchmark'].isin(benchmarks)]\n"
            "histories = histories[histories['run_id'].isin(runs['run_id'])]\n"
            "if not importance.empty:\n"
            "    importance = importance[importance['study'].isin(runs['study'])]\n"
            "print(f'{len(runs)} runs')\n"
            "runs.groupby(['experiment', 'benchmark', 'stage', 'status']).size().unstack(fill_value=0)"
        ),
        md(
            "## Rankings\n\n`ranked` holds one ranking per experiment and benchmark "
            "(`tables.tidy(ranked)`: all of them as one DataFrame, raw numbers)."
            + (
                " Each experiment is ranked on its own runs; the tables put them side by side."
                if several
                else ""
            )
        ),
        code(
            "infos, notes = collect.benchmark_infos(runs)  # benchmark → primary metric and direction\n"
            "ranked = tables.ranking_tables(runs, infos, items)\n"
            "summaries = tables.summaries(ranked)\n"
            "notes += [n for e in runs['experiment'].unique() for n in collect.status_notes(runs[runs['experiment'] == e])]\n"
            "if notes:\n"
            "    display(Markdown('\\n'.join(f'- {n}' for n in notes)))\n"
            "display(HTML(tables.summary_html(summaries)))"
        ),
        code("for benchmark in infos:\n    display(HTML(tables.benchmark_html(ranked, benchmark)))"),
        md(
            "## Verdicts\n\n"
            "Winners are chosen on validation; every comparison is paired on the same test items "
            "(bootstrap over seeds and items) and says **better**, **worse**, **equivalent** (within "
            "the metric's margin) or **inconclusive**. `family` (parameters cell) decides which "
            "comparisons are Holm-adjusted together. One pair alone: "
            "`verdicts.compare(runs, 'lstm-1L-uni', 'gru-1L-uni', benchmark='sentiment-sst2', items=items)`."
        ),
        code(
            "verdict_table = pd.concat(\n"
            "    [\n"
            "        verdicts.family(runs[runs['experiment'] == e], items, infos[b], b, family)\n"
            "        .assign(experiment=e)\n"
            "        for e in runs['experiment'].unique()\n"
            "        for b in infos\n"
            "        if (runs[runs['experiment'] == e]['benchmark'] == b).any()\n"
            "    ],\n"
            "    ignore_index=True,\n"
            ")\n"
            "verdict_table[['family', 'architecture', 'versus', 'verdict', 'difference', 'ci95_low', "
            "'ci95_high', 'p_holm', 'margin', 'detectable', 'method']]"
        ),
        md(
            "## Budget sensitivity\n\n"
            "Each benchmark's ranking had training stopped at 25/50/75% of its steps, against the full-budget "
            "one (Kendall's τ-b). `budget_sensitivity(runs, histories, infos, fractions=(1/3, 2/3, 1))` "
            "gives other fractions; `.taus` and `.ranks` hold the raw numbers, "
            "`.rank_paths(benchmark)` one benchmark's ranks at each fraction."
        ),
        code(
            "from rnnbench.report.budget import budget_sensitivity, html_table\n\n"
            "sensitivity = budget_sensitivity(runs, histories, infos)\n"
            "display(HTML(html_table(sensitivity)))"
        ),
        md(
            "## Search coverage\n\n"
            "Studies whose best configuration lies in the outer 10% of a searched range (widen it), and "
            "search trials pruned per architecture. `search.best_values(runs)`: every study's best value "
            "and its place in the range."
        ),
        code("from rnnbench.report import search\n\ndisplay(HTML(search.search_html(runs, heading=False)))"),
        md("## Figures"),
        code(
            "%matplotlib inline\n"
            "figures.set_theme()\n"
            "style = figures.Style.for_runs(runs)  # one colour per cell, one marker per variant"
        ),
    ]
    for name, call in FIGURE_CALLS.items():
        if name == "compare_experiments" and not several:
            continue
        cells.append(md(f"### {name}\n\n{CAPTIONS[name]}"))
        cells.append(code(f"figures.show({call})"))
    cells.append(md("## All runs (first 20 rows)"))
    cells.append(code("runs.head(20)"))
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.validate(nb)
    return nb


def execute(nb, out: Path, timeout: int = 120) -> list[str]:
    """Run every cell in ``out`` (paths in the notebook are relative to it); returns error outputs."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(out)}}
    )
    try:
        client.execute(
            stderr=subprocess.DEVNULL
        )  # the kernel's start-up chatter; cell errors stay in outputs
    except CellExecutionError as exc:
        first = str(exc).strip().splitlines()
        raise RnnbenchError(f"the report notebook failed to execute: {first[-1] if first else exc}") from None
    except Exception as exc:  # no kernel installed, kernel died...
        raise RnnbenchError(f"could not execute the report notebook: {type(exc).__name__}: {exc}") from None
    return [
        o.get("ename", "")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.output_type == "error"
    ]


def write(nb, out: Path) -> tuple[Path, Path]:
    import nbformat

    path = out / NOTEBOOK
    nbformat.write(nb, str(path))
    body, _ = _offline_exporter().from_notebook_node(nb)
    html_path = out / NOTEBOOK_HTML
    html_path.write_text(body)
    return path, html_path


# nbconvert's lab template pulls require.js, MathJax and Mermaid from a CDN: dead requests and
# console errors offline, and the report has no math or widgets to render.
_OFFLINE_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


def _offline_exporter():
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    return HTMLExporter(
        extra_loaders=[DictLoader({"rnnbench_offline.html.j2": _OFFLINE_TEMPLATE})],
        template_file="rnnbench_offline.html.j2",
    )


def index_page(experiment: str, out: Path, links: dict[str, list[Path]], notes: list[str]) -> Path:
    """index.html: one link per produced file, grouped; figures shown as thumbnails."""
    parts = [f"<h1>rnnbench report: {html.escape(experiment)}</h1>"]
    if notes:
        parts.append(
            "<h2>Notes</h2><ul class='notes'>"
            + "".join(f"<li>{html.escape(n)}</li>" for n in notes)
            + "</ul>"
        )
    for group, paths in links.items():
        if not paths:
            continue
        parts.append(f"<h2>{html.escape(group)}</h2><ul>")
        for p in paths:
            rel = p.relative_to(out).as_posix()
            if p.suffix == ".png":
                svg = p.with_suffix(".svg").relative_to(out).as_posix()
                parts.append(
                    f"<li><a href='{rel}'>{html.escape(p.stem)}</a> (<a href='{svg}'>SVG</a>)<br>"
                    f"<a href='{rel}'><img src='{rel}' alt='{html.escape(p.stem)}' style='max-width:700px'></a></li>"
                )
            else:
                parts.append(f"<li><a href='{rel}'>{html.escape(rel)}</a></li>")
        parts.append("</ul>")
    path = out / "index.html"
    path.write_text(_page(f"{experiment} report", "\n".join(parts)))
    return path
