"""Where the CLI's tables go: a terminal gets its own width (columns wrap, never "…"); a pipe or a
log file gets room for the widest row, so study names are never cut after a long run."""

from __future__ import annotations

import sys

LOG_WIDTH = 400


def table_console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else LOG_WIDTH)
