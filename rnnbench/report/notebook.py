"""The report notebook: built with nbformat, executed headless with nbclient, HTML via nbconvert."""

from __future__ import annotations

import html
import subprocess
from pathlib import Path

from rnnbench.errors import RnnbenchError

NOTEBOOK = "report.ipynb"
NOTEBOOK_HTML = "report_notebook.html"


def build(experiment: str, tracking_uri: str, tables: list[str], figures: list[str], notes: list[str]):
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    cells = [
        new_markdown_cell(
            f"# rnnbench report: `{experiment}`\n\nEvery run of the experiment is one row of "
            "`runs.parquet` (collected from MLflow by `rnnbench report`). Re-run this notebook in Jupyter "
            "to explore; set `refresh = True` to collect again from the tracking store."
        ),
        new_code_cell(
            f"experiment = {experiment!r}\ntracking_uri = {tracking_uri!r}\nrefresh = False",
            metadata={"tags": ["parameters"]},
        ),
        new_code_cell(
            "from pathlib import Path\n\nimport pandas as pd\nfrom IPython.display import HTML, Image, Markdown, display\n\n"
            "if refresh:\n"
            "    from rnnbench.report.collect import collect, open_client\n"
            "    runs = collect(open_client(tracking_uri), experiment).runs\n"
            "else:\n"
            "    runs = pd.read_parquet('runs.parquet')\n"
            "print(f'{len(runs)} runs')\n"
            "runs.groupby(['task', 'stage', 'status']).size().unstack(fill_value=0)"
        ),
    ]
    if notes:
        cells.append(
            new_markdown_cell("## What is missing or went wrong\n\n" + "\n".join(f"- {n}" for n in notes))
        )
    cells.append(new_markdown_cell("## Tables"))
    for name in tables:
        cells.append(new_code_cell(f"display(HTML(Path('tables/{name}.html').read_text()))"))
    cells.append(new_markdown_cell("## Figures"))
    for name in figures:
        cells.append(
            new_code_cell(f"display(Markdown('### {name}'))\ndisplay(Image(filename='figures/{name}.png'))")
        )
    cells.append(new_markdown_cell("## All runs (first 20 rows)"))
    cells.append(new_code_cell("runs.head(20)"))
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
    from rnnbench.report.tables import _page

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
