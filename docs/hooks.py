"""MkDocs hook: the committed reference report (reports/reference-cpu/) published with the site.

Its figures and its report.html then have one copy, the report's own, and the pages link to them
with relative links that `mkdocs build --strict` checks like any other.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

REPORT = Path(__file__).resolve().parents[1] / "reports" / "reference-cpu"
PUBLISHED = ("report.html", "figures/*.png")  # report.html draws the figures from figures/


def on_files(files, config):
    for pattern in PUBLISHED:
        for path in sorted(REPORT.glob(pattern)):
            uri = f"reference-cpu/{path.relative_to(REPORT).as_posix()}"
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


# The docstrings are written for Sphinx and for reading in the source: ``:class:`Task``` roles and
# ``::`` before a literal block. The API pages render them as Markdown, so the role names and the
# doubled colon would show; drop them from the rendered page (the code spans stay).
ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):(?=<code>)")
LITERAL_ALONE = re.compile(r"<p>::</p>\s*")
LITERAL_MARKER = re.compile(r"::(?=</p>)")


def on_page_content(html, page, config, files):
    if "doc-object" not in html:  # only pages with mkdocstrings output
        return html
    return LITERAL_MARKER.sub(":", LITERAL_ALONE.sub("", ROLE.sub("", html)))
