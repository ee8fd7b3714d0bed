"""The ``rnnbench`` command. Heavy libraries (torch, mlflow, optuna) load inside commands only."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import textwrap
from pathlib import Path

import click

from rnnbench import __version__

_DISK_ADVICE = (
    "free some space or fix the permissions (or pass --home), then run the same command again: "
    "finished trials are kept and resumed"
)
_DISK_MESSAGES = (
    "database or disk is full",
    "disk i/o error",
    "no space left",
    "readonly database",
    "read-only file system",
)
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


class _Group(click.Group):
    """Turns user errors into one readable line (no traceback unless --debug)."""

    def invoke(self, ctx: click.Context):
        from rnnbench.errors import LedgerUnreachable, RnnbenchError

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
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except OSError as exc:
            if ctx.obj and ctx.obj.get("debug") or exc.errno not in _DISK_ERRORS:
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"error: {where}{exc.strerror}: {_DISK_ADVICE}", err=True)
            ctx.exit(1)
        except Exception as exc:  # a bug of ours or a library's: still one line, the details on request
            if ctx.obj and ctx.obj.get("debug"):
                raise
            if unreachable := _unreachable_database(exc):
                error = LedgerUnreachable(_database_name(ctx.obj.get("storage")), unreachable)
                click.echo(f"error: {error}", err=True)
                ctx.exit(error.exit_code)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            if any(text in first.lower() for text in _DISK_MESSAGES):  # sqlite says it in words
                click.echo(f"error: {first[:300]}: {_DISK_ADVICE}", err=True)
                ctx.exit(1)
            click.echo(
                f"error: unexpected {type(exc).__name__}: {first[:300]} "
                "(rerun with `rnnbench --debug ...` for the traceback, and please report it)",
                err=True,
            )
            ctx.exit(1)


def _unreachable_database(exc: BaseException) -> str | None:
    """The driver's first line when ``exc`` (or what caused it) is a database server that does not
    answer (down, restarted, network gone): a condition to name, not a bug. SQLite errors are not
    this: they are the disk's (see _DISK_MESSAGES)."""
    from rnnbench.errors import first_line

    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for error in chain:
        driver = getattr(error, "orig", None) or error  # SQLAlchemy wraps the driver's error
        kind = type(driver)
        if kind.__name__ == "OperationalError" and kind.__module__.split(".")[0] in ("psycopg", "psycopg2"):
            return first_line(driver, 200)
    return None


def _database_name(storage: str | None) -> str:
    from rnnbench.sweep import database_location, is_journal

    return (
        "a database server" if is_journal(storage) else f"the ledger database at {database_location(storage)}"
    )


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
    from rich.table import Table

    from rnnbench.console import table_console

    console = table_console()
    if "cells" in shown:
        table = Table(title=f"cells (parameters at input = hidden = {catalog.REFERENCE_SIZE}, one layer)")
        for column in ("name", "source", "parameters", "description"):
            table.add_column(column, justify="right" if column == "parameters" else "left", overflow="fold")
        for c in shown["cells"]:
            table.add_row(
                c["name"], c["source"], f"{c['parameters']:,}" if c["parameters"] else "?", c["description"]
            )
        console.print(table)
    if "tasks" in shown:
        table = Table(title="tasks")
        for column in ("name", "source", "datasets", "primary metric", "description"):
            table.add_column(column, overflow="fold")
        for t in shown["tasks"]:
            primary = t["metrics"][0] if t["metrics"] else "?"
            causal = " (causal)" if t["causal"] else ""
            table.add_row(
                t["name"], t["source"], ", ".join(t["datasets"]), primary, t["description"] + causal
            )
        console.print(table)


@app.command("run")
@click.argument("experiment_file", type=click.Path(dir_okay=False, path_type=str))
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--dry-run", is_flag=True, help="Validate and print the plan; run nothing, write nothing.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Worker processes.")
@click.option("--home", type=click.Path(file_okay=False), help="Run home (default $RNNBENCH_HOME or ./runs).")
@click.option("--tracking-uri", help="MLflow tracking URI (default: sqlite store in the run home).")
@click.option("--storage", help="Optuna storage: a journal file path or an RDB URL (postgresql://...).")
@click.option("--device", help="Override the experiment's device (auto, cpu, cuda, cuda:1, mps).")
@click.option(
    "--max-retries",
    type=click.IntRange(min=0, max=100),
    default=3,
    show_default=True,
    help="Times a configuration is run again after its worker died, before it counts as failed.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    help="torch CPU threads per worker (default: the cores divided among the workers).",
)
@click.option(
    "--verbose", is_flag=True, help="Also name the studies skip_invalid skipped (--dry-run always does)."
)
def run_command(
    experiment_file,
    overrides,
    dry_run,
    workers,
    home,
    tracking_uri,
    storage,
    device,
    max_retries,
    threads,
    verbose,
) -> None:
    """Tune every architecture on every task of EXPERIMENT_FILE, then score the best on test.

    KEY=VALUE overrides change the file's values before it is validated, e.g. `budget.trials=3
    cells=[lstm,gru] tasks.0.options.seq_len=32` (values read as YAML; dots walk mappings and list
    indices). The experiment as run, overrides included, is what the ledger and MLflow keep: a
    resume needs the same overrides."""
    import shlex

    from rnnbench import experiment as experiment_mod
    from rnnbench import runner

    click.get_current_context().obj["storage"] = storage  # to name the ledger if it goes away
    exp = experiment_mod.load(experiment_file, overrides)
    plan, checked = runner.plan_checked(
        exp,
        home=home,
        tracking_uri=tracking_uri,
        storage_url=storage,
        max_retries=max_retries,
        device=device,
        threads=threads,
    )
    click.echo(checked.line())
    if dry_run:
        _print_table(
            f"plan of {exp.name!r}: {len(plan.studies)} studies, the same budget for every architecture",
            # the experiment is in the title: each row names its benchmark and architecture
            [{**row, "study": row["study"].split("/", 1)[-1]} for row in runner.dry_run(plan)],
        )
        for line in runner.skipped_lines(plan.skipped):
            click.echo(line)
        return
    try:
        result = runner.start(plan, workers=workers, verbose=verbose, say=lambda line: click.echo(line))
    except KeyboardInterrupt:
        click.echo(
            "interrupted: finished trials are kept; run "
            f"`rnnbench run {shlex.join([experiment_file, *overrides])}` again to resume",
            err=True,
        )
        sys.exit(130)
    from rnnbench.console import table_console

    table_console().print(results_table(exp.name, result["studies"]))
    width = max(40, shutil.get_terminal_size().columns)
    for line in _edge_lines(plan):  # wrapped at words: names never broken at the terminal's edge
        click.echo(textwrap.fill(f"note: {line}", width, subsequent_indent="  ", break_long_words=False))
    click.echo(f"runs: {result['home']}  |  browse: rnnbench ui" + (f" --home {home}" if home else ""))


def results_table(experiment: str, studies: list[dict]):
    """The run's summary, narrow enough for 80 columns: the experiment in the title, each
    benchmark once as a group heading with its metric and the way it is better, then one row per
    architecture (names never broken)."""
    from rich import box
    from rich.table import Table

    table = Table(
        title=f"{experiment}: results",
        caption="trials: complete/pruned/failed (+retried); valid: the best search trial's validation "
        "score; test: mean [95% CI] over the n final seeds (their values below 3); † n: some final "
        "seeds hit the step cap before patience stopped them (not converged)",
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
    )
    for name in ("study", "trials", "valid", "test", "n"):
        table.add_column(name, no_wrap=name != "test", overflow="fold")
    shown = None
    for r in studies:
        benchmark, architecture = r["study"].split("/")[-2:]
        if benchmark != shown:
            arrow = "↓ lower is better" if r.get("direction") == "minimize" else "↑ higher is better"
            table.add_row(f"[bold]{benchmark}[/]", "", "", f"{r['metric']} {arrow}", "")
            shown = benchmark
        retried = r["lost"] + r["interrupted"]
        table.add_row(
            f"  {architecture}",
            f"{r['complete']}/{r['pruned']}/{r['failed']}" + (f" +{retried}" if retried else ""),
            f"{r['best_valid']:.4g}",
            _format_ci(r),
            f"{r['seeds']}†" if r.get("at_cap") else str(r["seeds"]),
        )
    return table


def _edge_lines(plan) -> list[str]:
    """Best configurations in the outer tenth of a searched range, from the ledger: the same
    lines the report's notes give (rnnbench.report.search)."""
    from rnnbench.ledger import StudyLedger
    from rnnbench.report.search import best_values_of, edge_notes
    from rnnbench.sweep import best_trial, open_storage

    e = plan.experiment
    if not e.search:
        return []
    storage = open_storage(plan.storage_url, plan.home)
    best = {}
    for study in plan.studies:
        led = StudyLedger.load(storage, study.name)
        trial = best_trial(led.search_trials, led.direction) if led else None
        if trial is not None:
            best[study.name] = trial.params
    return edge_notes(best_values_of(e.name, best, {k: p.model_dump() for k, p in e.search.items()}))


def _format_ci(row: dict) -> str:
    """Mean and 95% interval from 3 seeds up; below that the seeds' own values (an interval from
    2 seeds spans ±6.4 times their gap, see rnnbench.stats)."""
    import math

    if not row["seeds"]:
        return "-"
    low, high = row["test_ci95"]
    if math.isnan(low):
        values = ", ".join(f"{v:.3g}" for v in row.get("seed_values", []))
        return f"{row['test_mean']:.3g} (seeds: {values})"
    return f"{row['test_mean']:.3g} [{low:.3g}, {high:.3g}]"


def _print_table(title: str, rows: list[dict]) -> None:
    from rich.table import Table

    from rnnbench.console import table_console

    table = Table(title=title)
    for column in rows[0] if rows else []:
        table.add_column(str(column), overflow="fold")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    table_console().print(table)


@app.command("sync")
@click.argument("experiment")
@click.option("--home", type=click.Path(file_okay=False), help="Run home (default $RNNBENCH_HOME or ./runs).")
@click.option("--tracking-uri", help="MLflow tracking URI (default: the run home's store).")
@click.option("--storage", help="Optuna storage (default: the run home's journal).")
def sync_command(experiment, home, tracking_uri, storage) -> None:
    """Make MLflow agree with the ledger for EXPERIMENT (a name or its YAML file).

    `rnnbench run` and `rnnbench report` do this themselves; run it by hand after a fault if
    you browse MLflow without running either."""
    counts = _sync(experiment, home, tracking_uri, storage)
    click.echo(
        f"synced {experiment}: {counts['parents']} studies, {counts['projected']} run(s) rewritten, "
        f"{counts['duplicates']} duplicate(s) removed, {counts['models']} model(s) logged"
    )


def _experiment_name(experiment: str) -> str:
    from pathlib import Path

    if experiment.endswith((".yaml", ".yml")) or Path(experiment).is_file():
        from rnnbench import experiment as experiment_mod

        return experiment_mod.load(experiment).name
    return experiment


def _sync(experiment: str, home, tracking_uri, storage, *, required: bool = True) -> dict | None:
    """Project the ledger into MLflow; None when there is no ledger to read (and not required)."""
    from rnnbench.errors import ConfigError
    from rnnbench.projection import Projection
    from rnnbench.scheduler import LedgerLock
    from rnnbench.tracking import Tracker, create_sqlite_store
    from rnnbench.workers import sync

    try:
        name, path, ledger = _ledger(experiment, home, storage)
    except ConfigError:
        if required:
            raise
        return None
    if not required and not os.access(path, os.W_OK):  # archived results: report them as they are
        click.echo(f"note: run home {path} is read-only: MLflow is read as it is, not repaired", err=True)
        return None
    uri = tracking_uri or create_sqlite_store(path)  # MLflow lost? the ledger rebuilds it
    tracker = Tracker(uri, name, artifact_root=path / "artifacts")
    projection = Projection(tracker, ledger, LedgerLock(storage, path))
    return sync(projection, name, path, warn=lambda line: click.echo(line, err=True))


def _ledger(experiment: str, home, storage):
    """(experiment name, run home, ledger) of an experiment that has run here."""
    from rnnbench.errors import ConfigError
    from rnnbench.plan import run_home
    from rnnbench.sweep import is_journal, journal_path, open_storage, study_names

    click.get_current_context().obj["storage"] = storage  # to name the ledger if it goes away
    name, path = _experiment_name(experiment), run_home(home)
    if is_journal(storage) and not journal_path(storage, path).is_file():
        raise ConfigError(f"no Optuna ledger at {journal_path(storage, path)}: pass --home or --storage")
    ledger = open_storage(storage, path)
    if not study_names(ledger, name):
        raise ConfigError(f"the ledger has no study of experiment {name!r}")
    return name, path, ledger


def _study_name(ledger, experiment: str, study: str) -> str:
    """A study given in full (``smoke/charlm-synthetic/lstm-1L-uni``) or without the experiment."""
    from rnnbench.errors import UnknownNameError
    from rnnbench.sweep import study_names

    names = set(study_names(ledger, experiment))
    for candidate in (study, f"{experiment}/{study}"):
        if candidate in names:
            return candidate
    raise UnknownNameError("study", study, {n.split("/", 1)[1] for n in names})


@app.command("export")
@click.argument("experiment")
@click.argument("study")
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="New folder for the model."
)
@click.option("--home", type=click.Path(file_okay=False), help="Run home (default $RNNBENCH_HOME or ./runs).")
@click.option("--storage", help="Optuna storage (default: the run home's journal).")
@click.option(
    "--tracking-uri",
    help="MLflow tracking URI, for weights the run home lacks (default: the run home's store).",
)
def export_command(experiment, study, out, home, storage, tracking_uri) -> None:
    """Write the best final seed of STUDY (chosen on validation) as a self-contained MLflow model
    folder: weights, signature, input example, and rnnbench_model.json with the vocabulary or
    scaler, task, architecture and scores, and wheels of rnnbench and the plugins the model needs,
    named by its requirements.txt: `mlflow models serve -m OUT` installs and serves it on any
    machine with MLflow. Load it with mlflow.pytorch.load_model(OUT)."""
    from rnnbench.exports import export
    from rnnbench.tracking import Tracker, tracking_uri_for

    name, path, ledger = _ledger(experiment, home, storage)
    uri = tracking_uri or tracking_uri_for(path)
    tracker = Tracker(uri, name, create=False) if tracking_uri or (path / "mlflow.db").is_file() else None
    record = export(ledger, _study_name(ledger, name, study), path, out, tracker)
    test = ", ".join(f"{k}={v:.4g}" for k, v in (record.get("test") or {}).items())
    click.echo(f"exported {record['study']} seed {record['seed']} (test {test}) to {out}")


@app.command("register")
@click.argument("experiment")
@click.argument("studies", nargs=-1)
@click.option("--home", type=click.Path(file_okay=False), help="Run home (default $RNNBENCH_HOME or ./runs).")
@click.option("--tracking-uri", help="MLflow tracking URI (default: the run home's store).")
@click.option("--storage", help="Optuna storage (default: the run home's journal).")
def register_command(experiment, studies, home, tracking_uri, storage) -> None:
    """Register the best final seed (on validation) of each of STUDIES (default: every study) in
    the MLflow Model Registry, named after the study with '/' as '.'."""
    from rnnbench.exports import register
    from rnnbench.sweep import study_names
    from rnnbench.tracking import Tracker, tracking_uri_for

    name, path, ledger = _ledger(experiment, home, storage)
    tracker = Tracker(tracking_uri or tracking_uri_for(path), name, create=False)
    chosen = [_study_name(ledger, name, s) for s in studies] or study_names(ledger, name)
    for study in chosen:
        model, version = register(tracker, ledger, study, path)
        click.echo(f"registered {study} as {model} version {version}")


@app.command("check")
@click.argument("experiment_file", required=False, type=click.Path(dir_okay=False, path_type=str))
@click.option("--device", help="Device to run the checks on (default: the experiment's, or cpu).")
def check_command(experiment_file, device) -> None:
    """Check every installed cell and task against its contract; with EXPERIMENT_FILE, validate it
    and run its pre-flight (every dataset loaded, every model run once) instead. Writes nothing."""
    from rnnbench import preflight
    from rnnbench.errors import ContractError

    if experiment_file is not None:
        from rnnbench import experiment as experiment_mod

        exp = experiment_mod.load(experiment_file)
        studies, _ = experiment_mod.expand(exp)
        click.echo(preflight.check_experiment(exp, studies, device=device).line())
        return
    verdicts = preflight.check_installed(device=device or "cpu")
    for v in verdicts:
        if v.error is None:
            note = f" ({v.note})" if v.note else ""
            click.echo(f"ok   {v.kind} {v.name} ({v.origin}) {v.seconds:.2f} s{note}")
        else:
            click.echo(f"FAIL {v.error}")
    if failed := [v for v in verdicts if v.error]:
        raise ContractError(f"{len(failed)} of {len(verdicts)} plugins break their contract (see above)")


class _Port(click.ParamType):
    """A TCP port; a bad one is one error line and exit 2 (ConfigError), not click's usage block."""

    name = "port"

    def convert(self, value, param, ctx):
        from rnnbench.errors import ConfigError, shorten

        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            text = str(value).strip()
            number = int(text) if text.isdigit() else 0
        if not 1 <= number <= 65535:
            raise ConfigError(f"--port {shorten(str(value))[1:-1]}: a port is a number from 1 to 65535")
        return number


@app.command("ui")
@click.option("--home", type=click.Path(file_okay=False), help="Run home (default $RNNBENCH_HOME or ./runs).")
@click.option("--tracking-uri", help="MLflow tracking URI (default: the run home's store).")
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Bind address; 0.0.0.0 exposes it to the network."
)
@click.option("--port", default=5000, show_default=True, type=_Port())
def ui_command(home, tracking_uri, host, port) -> None:
    """Open the MLflow UI on the run home's store (bound to localhost by default). The server stops
    with this command: Ctrl-C, a closed terminal (SIGHUP) or SIGTERM."""
    from rnnbench.errors import ConfigError
    from rnnbench.plan import run_home
    from rnnbench.tracking import MLFLOW_APP, mlflow_app_registered, tracking_uri_for

    path = run_home(home)
    if tracking_uri is None:
        if not (path / "mlflow.db").is_file():
            raise ConfigError(f"no runs in {path} yet: run `rnnbench run experiments/smoke.yaml` first")
        tracking_uri = tracking_uri_for(path)
    _check_port_free(host, port)  # else the printed address would lead to whatever holds the port
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        tracking_uri,
        "--host",
        host,
        "--port",
        str(port),
    ]
    # MLflow 3's UI opens every experiment in its GenAI view (traces, judges, "Agent versions") unless
    # the browser remembers the other one: rnnbench's app makes "Model training" the one remembered
    if mlflow_app_registered():
        command += ["--app-name", MLFLOW_APP]
    else:
        click.echo(
            "warning: MLflow will open experiments in its GenAI view: reinstall rnnbench "
            "(pip install -e .) to register its MLflow app",
            err=True,
        )
    host_in_url = f"[{host}]" if ":" in host else host
    click.echo(f"MLflow UI for {tracking_uri} at http://{host_in_url}:{port}/#/experiments  (Ctrl-C to stop)")
    sys.exit(_serve_until_stopped(command))


def _check_port_free(host: str, port: int) -> None:
    """One line and exit 2 when ``host:port`` cannot be served (taken, or not this machine's)."""
    import socket

    from rnnbench.errors import ConfigError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: TIME_WAIT is fine
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"cannot serve on {host}:{port}: {exc.strerror or exc}; pass another --port"
            ) from None


def _serve_until_stopped(command: list[str]) -> int:
    """Run a server in its own process group and end the whole group when this process is told
    to stop (Ctrl-C, SIGTERM, or SIGHUP from a closed terminal): mlflow's server forks workers
    that would otherwise outlive us with parent pid 1."""
    import signal
    import subprocess

    server = subprocess.Popen(command, start_new_session=True)

    def stop(signum, frame):
        raise KeyboardInterrupt

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    try:
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if server.poll() is None:
            try:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@app.command("dashboard")
@click.option("--home", type=click.Path(file_okay=False), help="Run home (default $RNNBENCH_HOME or ./runs).")
@click.option(
    "--storage", help="Optuna storage: a journal file path or an RDB URL (default: the run home's journal)."
)
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Bind address; 0.0.0.0 exposes it to the network."
)
@click.option("--port", default=8080, show_default=True, type=_Port())
def dashboard_command(home, storage, host, port) -> None:
    """Browse the Optuna studies (the ledger) in optuna-dashboard, bound to localhost by default.

    Each architecture has two studies: its search, and `<study>::final`, whose trials are the
    final seeds of the best configuration (trial user attr `seed`), scored on test."""
    from rnnbench.errors import ConfigError
    from rnnbench.plan import run_home
    from rnnbench.sweep import is_journal, journal_path, open_storage

    try:
        import optuna_dashboard
    except ImportError:
        raise ConfigError(
            "optuna-dashboard is not installed: pip install 'rnnbench[dashboard]' -c constraints.txt"
        ) from None
    path = run_home(home)
    if is_journal(storage) and not journal_path(storage, path).is_file():
        raise ConfigError(
            f"no Optuna ledger at {journal_path(storage, path)}: run `rnnbench run EXPERIMENT.yaml` first, "
            "or pass --home or --storage"
        )
    _check_port_free(host, port)  # before the address is printed: it would lead to whatever holds it
    ledger = open_storage(storage, path)
    where = journal_path(storage, path) if is_journal(storage) else storage.split("@")[-1]
    click.echo(f"optuna-dashboard for {where} at http://{host}:{port}  (Ctrl-C to stop)")
    try:
        optuna_dashboard.run_server(ledger, host=host, port=port)
    except OSError as exc:  # taken between the check and the bind (a race), or the host is not ours
        raise ConfigError(
            f"cannot serve on {host}:{port}: {exc.strerror or exc}; pass another --port"
        ) from None
    except KeyboardInterrupt:
        pass


@app.command("report")
@click.argument("experiments", nargs=-1, required=True, metavar="EXPERIMENT [EXPERIMENT...]")
@click.option(
    "--out", type=click.Path(file_okay=False), help="Output folder (default reports/<experiment>, or A-vs-B)."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["html", "notebook", "all"]),
    default="all",
    show_default=True,
    help="html: tables, figures, report.html; notebook: executed notebook and its HTML; all: both.",
)
@click.option("--home", type=click.Path(file_okay=False), help="Run home (default $RNNBENCH_HOME or ./runs).")
@click.option("--tracking-uri", help="MLflow tracking URI (default: the run home's store).")
@click.option(
    "--storage",
    help="Optuna storage, to repair MLflow from before reporting (default: the run home's journal).",
)
def report_command(experiments, out, fmt, home, tracking_uri, storage) -> None:
    """Tables, seaborn figures, an executed notebook and HTML for EXPERIMENT (a name or its YAML file).

    Two or more experiments: one report that compares them (rankings side by side, one column of
    figure panels per experiment). A saved report's folder (one holding runs.parquet): rendered
    again from its own tables with this rnnbench's statistics, no MLflow store needed."""
    import time
    from pathlib import Path

    from rnnbench.errors import ConfigError
    from rnnbench.plan import run_home
    from rnnbench.report import build_report, rebuild_report
    from rnnbench.report.collect import RUNS_FILE, resolve_tracking_uri
    from rnnbench.sweep import is_journal, journal_path, open_storage

    started = time.perf_counter()
    if len(experiments) == 1 and (Path(experiments[0]) / RUNS_FILE).is_file():
        report = rebuild_report(
            _copied_report(Path(experiments[0]), out), fmt=fmt, progress=lambda m: click.echo(m, err=True)
        )
        _print_report(report, started)
        return
    names = [_experiment_name(e) for e in experiments]
    if len(set(names)) < len(names):
        raise ConfigError(f"an experiment is named twice: {' '.join(names)}; compare different experiments")
    uri = resolve_tracking_uri(home, tracking_uri)
    for name in names:
        repaired = _sync(name, home, tracking_uri, storage, required=False)
        if repaired and (repaired["projected"] or repaired["duplicates"]):
            click.echo(
                f"repaired MLflow from the ledger ({name}): {repaired['projected']} run(s) rewritten",
                err=True,
            )
    journal = journal_path(storage, run_home(home)) if is_journal(storage) else None
    report = build_report(
        names,
        tracking_uri=uri,
        out=Path(out or Path("reports") / "-vs-".join(names)),
        fmt=fmt,
        journal=journal if journal and journal.is_file() else None,
        ledger=None if is_journal(storage) else open_storage(storage, run_home(home)),
        progress=lambda message: click.echo(message, err=True),
    )
    _print_report(report, started)


def _print_report(report, started: float) -> None:
    import time

    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    if report.notebook_errors:
        click.echo(f"warning: notebook cells raised {', '.join(report.notebook_errors)}", err=True)
    click.echo(f"report: {report.index}  ({time.perf_counter() - started:.1f} s)")


def _copied_report(saved, out):
    """The folder to render a saved report into: itself, or ``out`` with its data files copied."""
    import shutil
    from pathlib import Path

    from rnnbench.report.collect import HISTORIES_FILE, IMPORTANCE_FILE, ITEMS_FILE, RUNS_FILE

    if out is None or Path(out).resolve() == saved.resolve():
        return saved
    Path(out).mkdir(parents=True, exist_ok=True)
    for name in (RUNS_FILE, HISTORIES_FILE, IMPORTANCE_FILE, ITEMS_FILE):
        if (saved / name).is_file():
            shutil.copy2(saved / name, Path(out) / name)
    return Path(out)


@app.command("bench")
@click.option(
    "--cells",
    multiple=True,
    help="Cells to time, repeatable or comma-separated (default: every registered cell).",
)
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--seq-len", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--input-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--hidden", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--layers", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--bidirectional", is_flag=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option(
    "--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True
)
@click.option("--repeat", type=click.IntRange(min=1), default=10, show_default=True, help="Timed rounds.")
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True, help="Untimed rounds.")
@click.option("--threads", type=click.IntRange(min=1), help="torch CPU threads (default: torch's choice).")
@click.option(
    "--padded",
    metavar="DATASET",
    help="Padded-batch mode: training batches whose lengths are a task's (sst2, conll2003, imdb, "
    "wnut17, or TASK:DATASET) against full-length batches of the same tokens, per cell; "
    "--seq-len is unused.",
)
@click.option(
    "--batches",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="--padded: training batches timed, the first of a training epoch (a random sample).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.option("--mlflow", "to_mlflow", is_flag=True, help="Also log the results as an MLflow run.")
@click.option("--home", type=click.Path(file_okay=False), help="Run home for --mlflow (as rnnbench run).")
@click.option("--tracking-uri", help="MLflow tracking URI for --mlflow (default: the run home's store).")
@click.option(
    "--check",
    is_flag=True,
    help="On a CUDA machine: check the GPU paths (cuDNN vs the step equations, gradients, a bf16 sweep, "
    "no host sync in a training step), then print the ratio table. Without CUDA: says so, exits 0.",
)
def bench_command(as_json: bool, to_mlflow: bool, home, tracking_uri, cells, check: bool, **sizes) -> None:
    """Time forward and forward+backward of every cell through the encoder, against bare torch.nn."""
    from rnnbench import bench

    if check and sizes["padded"]:
        from rnnbench.errors import ConfigError

        raise ConfigError("--check and --padded are two different runs: give one of them")
    if check:
        from rnnbench.gpu_check import run_check

        sys.exit(run_check(click.echo))

    settings = bench.BenchSettings(cells=tuple(cells), **sizes)
    result = bench.run(settings, progress=None if as_json else lambda message: click.echo(message, err=True))
    if to_mlflow:
        from rnnbench.plan import run_home
        from rnnbench.tracking import tracking_uri_for

        path = run_home(home)
        path.mkdir(parents=True, exist_ok=True)
        uri = tracking_uri or tracking_uri_for(path)
        run_id = bench.log_to_mlflow(result, uri, artifact_root=path / "artifacts")
        click.echo(f"mlflow: run {run_id} in {uri}", err=True)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        bench.print_table(result)


def main() -> None:
    import signal

    from rnnbench.interrupts import stop_on_sigterm

    if hasattr(signal, "SIGXFSZ"):  # a file-size limit: an OSError to report, not a silent death
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    stop_on_sigterm()  # kill, timeout, a scheduler's time limit: stop as Ctrl-C does
    app(prog_name="rnnbench")


if __name__ == "__main__":
    sys.exit(main())
