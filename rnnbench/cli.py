"""The ``rnnbench`` command. Heavy libraries (torch, mlflow, optuna) load inside commands only."""

from __future__ import annotations

import json
import sys

import click

from rnnbench import __version__


class _Group(click.Group):
    """Turns user errors into one readable line (no traceback unless --debug)."""

    def invoke(self, ctx: click.Context):
        from rnnbench.errors import RnnbenchError

        try:
            return super().invoke(ctx)
        except RnnbenchError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rnnbench")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.pass_context
def app(ctx: click.Context, debug: bool) -> None:
    """Benchmark recurrent architectures honestly: same tuning budget for every architecture,
    validation-only model selection, test scores over seeds with confidence intervals."""
    ctx.ensure_object(dict)["debug"] = debug


@app.command("list")
@click.argument("what", type=click.Choice(["cells", "tasks", "all"]), default="all")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--refresh", is_flag=True, help="Reload every plugin instead of using the cached catalog.")
def list_command(what: str, as_json: bool, refresh: bool) -> None:
    """List registered cells and tasks (builtin and plugins)."""
    from rnnbench import catalog

    data = catalog.load(refresh=refresh)
    for warning in data["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    shown = {k: data[k] for k in ("cells", "tasks") if what in (k, "all")}
    if as_json:
        click.echo(json.dumps(shown, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if "cells" in shown:
        table = Table(title=f"cells (parameters at input = hidden = {catalog.REFERENCE_SIZE}, one layer)")
        for column in ("name", "source", "parameters", "description"):
            table.add_column(column, justify="right" if column == "parameters" else "left")
        for c in shown["cells"]:
            table.add_row(c["name"], c["source"], f"{c['parameters']:,}" if c["parameters"] else "?", c["description"])
        console.print(table)
    if "tasks" in shown:
        table = Table(title="tasks")
        for column in ("name", "source", "datasets", "primary metric", "description"):
            table.add_column(column)
        for t in shown["tasks"]:
            primary = t["metrics"][0] if t["metrics"] else "?"
            causal = " (causal)" if t["causal"] else ""
            table.add_row(t["name"], t["source"], ", ".join(t["datasets"]), primary, t["description"] + causal)
        console.print(table)


def main() -> None:
    app(prog_name="rnnbench")


if __name__ == "__main__":
    sys.exit(main())
