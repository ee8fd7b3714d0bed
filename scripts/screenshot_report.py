"""Open a report's pages in headless Chromium, fail on console errors or broken links, screenshot index.html.

    pip install -e ".[browser]" -c constraints.txt     # playwright (the Python package only)
    apt-get install chromium                            # or set CHROMIUM=/path/to/chrome
    python scripts/screenshot_report.py reports/smoke   # writes reports/smoke/screenshot.png

Exit status 1 when a page logs a console error, raises, or fails to load an image or link target.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

PAGES = ("index.html", "report.html", "report_notebook.html", "tables/tables.html")


def chromium() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def missing(required: Path, advice: str) -> str | None:
    """Why the screenshot cannot be taken (an input or Chromium missing), or None."""
    if not required.is_file():
        return f"error: {required} not found: {advice}"
    if chromium() is None:
        return "error: Chromium not found: install it (apt-get install chromium) or set CHROMIUM"
    return None


def check(report: Path, shot: Path) -> list[str]:
    """Problems found on the report's pages (empty when clean); saves a full-page screenshot."""
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--allow-file-access-from-files"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: problems.append(f"failed to load {r.url}"))
        for name in PAGES:
            path = report / name
            if not path.is_file():
                continue
            page.goto(path.resolve().as_uri(), wait_until="load")
            broken = page.eval_on_selector_all(
                "img", "imgs => imgs.filter(i => !i.naturalWidth).map(i => i.src)"
            )
            problems += [f"{name}: broken image {src}" for src in broken]
            if name == "index.html":
                targets = page.eval_on_selector_all("a", "links => links.map(a => a.getAttribute('href'))")
                problems += [f"index.html: dead link {t}" for t in targets if not (report / t).exists()]
                page.screenshot(path=str(shot), full_page=True)
        browser.close()
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="a report folder (reports/<experiment>)")
    parser.add_argument("--out", type=Path, help="screenshot path (default REPORT/screenshot.png)")
    args = parser.parse_args()
    if problem := missing(args.report / "index.html", "run `rnnbench report` first"):
        print(problem, file=sys.stderr)
        return 2
    shot = args.out or args.report / "screenshot.png"
    problems = check(args.report, shot)
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"screenshot: {shot}  ({len(problems)} problem(s))")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
