"""The Python API: run an experiment and read its results as pandas frames, from a script or a
notebook, with the very code ``rnnbench run`` and ``rnnbench report`` use.

>>> import rnnbench
>>> results = rnnbench.run("experiments/smoke.yaml", home="runs", overrides=["budget.trials=2"])
>>> results.summary            # one row per architecture: ranks per benchmark, wins, mean rank
>>> results.tables["memory-synthetic"]   # the ranking of one benchmark, raw numbers
>>> results.runs               # one tidy row per MLflow run (search trials and final seeds)

Heavy libraries (torch, optuna, mlflow) load when a function is called, not on ``import rnnbench``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from rnnbench.errors import ConfigError

# rnnbench.experiment (pydantic, +0.12 s) is imported in the functions that read one: `rnnbench.run`
# and `rnnbench.Results` resolve without loading pydantic (tests/test_api.py holds to it).
if TYPE_CHECKING:
    import pandas as pd

    from rnnbench.experiment import Experiment

__all__ = ["Results", "load_experiment", "load_results", "run"]


@dataclass
class Results:
    """An experiment's results as tidy pandas frames (what ``rnnbench report`` tabulates).

    - ``runs``: one row per MLflow run: ids (study, architecture, cell, layers, bidirectional,
      task, benchmark, stage ``search``/``final``, trial, seed, status), hyperparameters, metrics
      (``valid_*``, ``test_*``), parameter counts, speed, memory, environment.
    - ``histories``: per-validation curves of the best search trial and the final seeds, long:
      ``run_id, metric, step, value, best_trial`` (``metric == "steps"``: optimiser steps done).
    - ``tables``: benchmark name → its ranking (one row per architecture: rank, test mean and 95%
      CI over the final seeds, verdict against the selected architecture, parameters, speed).
    - ``ranking``: every ranking in one long frame (a ``benchmark`` column).
    - ``summary``: one row per architecture across benchmarks (see the report's summary caption).
    - ``studies``: after :func:`run`, what the CLI prints per study (trials by state, best
      validation score, test mean and CI); empty from :func:`load_results`.
    """

    experiment: str
    runs: pd.DataFrame
    histories: pd.DataFrame
    tables: dict[str, pd.DataFrame]
    ranking: pd.DataFrame
    summary: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    studies: pd.DataFrame | None = None
    home: Path | None = None

    def __repr__(self) -> str:
        return (
            f"Results({self.experiment!r}: {len(self.runs)} runs, benchmarks "
            f"{', '.join(self.tables) or 'none'})"
        )


def load_experiment(experiment: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()) -> Experiment:
    """An :class:`~rnnbench.experiment.Experiment` from a file path, a YAML string or a mapping,
    with ``overrides`` (``"budget.trials=3"``, as on the command line) applied, validated."""
    from rnnbench import experiment as experiment_mod

    overrides = _overrides(overrides)
    if isinstance(experiment, Mapping):
        return experiment_mod.parse_mapping(dict(experiment), "<mapping>", overrides)
    if isinstance(experiment, Path) or _looks_like_a_path(experiment):
        return experiment_mod.load(experiment, overrides)
    return experiment_mod.parse(experiment, "<string>", overrides)


def run(
    experiment: str | Path | Mapping[str, Any],
    *,
    home: str | Path | None = None,
    workers: int = 1,
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
    storage: str | None = None,
    device: str | None = None,
    max_retries: int = 3,
    threads: int | None = None,
) -> Results:
    """Run ``experiment`` (a file path, a YAML string or a mapping) as ``rnnbench run`` does:
    validation, the pre-flight, the search, the final seeds; a second call resumes (finished
    trials are kept; a changed experiment is refused). Returns :func:`load_results`'s frames,
    with ``studies`` filled in. ``overrides``: ``["budget.trials=3"]`` or ``{"budget.trials": 3}``.
    Errors a person can act on raise :class:`rnnbench.errors.RnnbenchError` subclasses."""
    # local: on `import rnnbench.api` rnnbench.runner (torch, optuna) costs +4.1 s and pandas
    # +0.76 s; load_experiment needs neither
    import pandas as pd

    from rnnbench import runner

    exp = load_experiment(experiment, _overrides(overrides))
    plan, _ = runner.plan_checked(
        exp,
        home=home,
        tracking_uri=tracking_uri,
        storage_url=storage,
        max_retries=max_retries,
        device=device,
        threads=threads,
    )
    done = runner.start(plan, workers=workers)
    results = load_results(exp.name, home=plan.home, tracking_uri=plan.tracking_uri)
    results.studies = pd.DataFrame(done["studies"])
    results.home = plan.home
    return results


def load_results(
    experiment: str | Path | Mapping[str, Any],
    *,
    home: str | Path | None = None,
    tracking_uri: str | None = None,
) -> Results:
    """The results of ``experiment`` (its name, its file, a YAML string or a mapping: only its
    name is read; or a saved report's folder, one holding ``runs.parquet``) from the run home's
    MLflow store, collected and ranked as ``rnnbench report`` does. Nothing is written."""
    # local: rnnbench.report (pandas) costs +1.0 s on `import rnnbench.api`; load_experiment needs none of it
    from rnnbench.report import collect as collect_mod
    from rnnbench.report import tables as tables_mod

    saved = Path(experiment) if isinstance(experiment, (str, Path)) and "\n" not in str(experiment) else None
    if saved is not None and (saved / collect_mod.RUNS_FILE).is_file():
        data = collect_mod.load_saved(saved)
    else:
        name = _name_of(experiment)
        uri = collect_mod.resolve_tracking_uri(home, tracking_uri)
        client = collect_mod.open_client(uri)
        data = collect_mod.collect_many(client, [name], tracking_uri=uri)
    ranked = tables_mod.ranking_tables(data.runs, data.benchmarks, data.items)
    summaries = tables_mod.summaries(ranked)
    return Results(
        experiment=data.experiment,
        runs=data.runs,
        histories=data.histories,
        tables={t.task: t.table for t in ranked},
        ranking=tables_mod.tidy(ranked),
        summary=next(iter(summaries.values())) if len(summaries) == 1 else _joined(summaries),
        notes=list(data.notes) + [f"{t.task}: {n}" for t in ranked for n in t.notes],
        home=Path(home) if home is not None else None,
    )


def _joined(summaries: dict) -> pd.DataFrame:
    import pandas as pd  # local: +0.76 s on `import rnnbench.api`; load_experiment needs none of it

    frames = [df.assign(experiment=e) for e, df in summaries.items() if not df.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _name_of(experiment: str | Path | Mapping[str, Any]) -> str:
    """An experiment's name without validating it (its results may outlive its plugins)."""
    if isinstance(experiment, Mapping):
        name = experiment.get("name")
    elif isinstance(experiment, Path) or _looks_like_a_path(experiment):
        from rnnbench.experiment import load

        return load(experiment).name
    elif "\n" in experiment or ":" in experiment:
        data = yaml.safe_load(experiment)
        name = data.get("name") if isinstance(data, dict) else None
    else:
        return experiment
    if not isinstance(name, str):
        raise ConfigError("the experiment has no name: give its name, its file, or a mapping with `name:`")
    return name


def _looks_like_a_path(text: str | Path) -> bool:
    text = str(text)
    if "\n" in text:
        return False
    return text.endswith((".yaml", ".yml")) or Path(text).is_file()


def _overrides(overrides: Sequence[str] | Mapping[str, Any] | None) -> list[str]:
    """``key=value`` strings; a mapping's values written as YAML flow (``{"cells": ["lstm"]}`` →
    ``cells=[lstm]``)."""
    if not overrides:
        return []
    if isinstance(overrides, str):
        return [overrides]
    if isinstance(overrides, Mapping):
        return [
            f"{key}={yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix('...').strip()}"
            for key, value in overrides.items()
        ]
    return list(overrides)
