"""How well each study searched: best configurations at the edge of their range, and pruning.

Pure functions over the report's runs table (one row per run; a study's best configuration is
on its study row as ``hp_<name>``). The searched ranges travel with the table as a
``search_space`` column (JSON of the experiment's ``search:``), read from the experiment file
the run recorded in MLflow (:func:`search_spaces`), so a saved report can be flagged again
without the store. A best value in the outer tenth of its range (log scale where the range is
log) says the optimum may lie beyond it: the range should be widened before the comparison is
trusted.
"""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from rnnbench.hparams import TRAINER_HPARAM_DOMAINS
from rnnbench.report.collect import natural_key
from rnnbench.report.tables import _html_table

EDGE = 0.1  # the outer share of a range at either end that counts as its edge
SPACE_COLUMN = "search_space"
_NOTE_YAML = re.compile(r"```yaml\n(.*?)```", re.DOTALL)
_COUNTED = ("complete", "pruned", "failed")


def edge_of(value: Any, low: float, high: float, log: bool = False, share: float = EDGE) -> str | None:
    """``"low"`` or ``"high"`` when ``value`` lies in the outer ``share`` of [low, high] at that
    end (on a log scale for a log range), else None (middle, no range, or no value)."""
    try:
        value, low, high = float(value), float(low), float(high)
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(value) and low < high) or (log and min(value, low) <= 0):
        return None
    if log:
        value, low, high = math.log(value), math.log(low), math.log(high)
    position = (value - low) / (high - low)
    return "low" if position <= share else "high" if position >= 1 - share else None


def numeric_ranges(space: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The int and float ranges of an experiment's ``search:`` (categoricals have no edge)."""
    return {
        name: p
        for name, p in (space or {}).items()
        if isinstance(p, dict) and p.get("type") in ("int", "float") and p.get("low") is not None
    }


def search_space_of_note(note: str | None) -> dict[str, Any] | None:
    """``search:`` of the experiment file rnnbench writes into its MLflow experiment's note."""
    match = _NOTE_YAML.search(note or "")
    if not match:
        return None
    try:
        document = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return None
    return document.get("search") if isinstance(document, dict) else None


def search_spaces(client, experiments: list[str]) -> dict[str, dict[str, Any]]:
    """Each experiment's searched ranges, from the file it ran (its MLflow note)."""
    spaces = {}
    for name in experiments:
        exp = client.get_experiment_by_name(name)
        space = search_space_of_note(exp.tags.get("mlflow.note.content") if exp else None)
        if space is not None:
            spaces[name] = space
    return spaces


def with_search_space(runs: pd.DataFrame, spaces: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """The runs table with each row's experiment's ranges as a JSON column (saved with it)."""
    if runs.empty or not spaces:
        return runs
    text = {e: json.dumps(s, sort_keys=True) for e, s in spaces.items()}
    return runs.assign(**{SPACE_COLUMN: runs["experiment"].map(text)})


def best_values(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per study and searched numeric parameter: the study's best value, its range and
    which edge (if any) it lies at. Empty where the table carries no ranges (older reports)."""
    columns = ["experiment", "benchmark", "architecture", "study", "parameter", "value", "low", "high",
               "log", "int", "edge"]  # fmt: skip
    if runs.empty or SPACE_COLUMN not in runs:
        return pd.DataFrame(columns=columns)
    rows = []
    studies = runs[runs["stage"] == "study"]
    for _, study in studies.iterrows():
        text = study.get(SPACE_COLUMN)
        for name, p in numeric_ranges(json.loads(text) if isinstance(text, str) else None).items():
            value = pd.to_numeric(study.get(f"hp_{name}"), errors="coerce")  # a mixed column is text
            if pd.isna(value):
                continue
            log = bool(p.get("log", False))
            rows.append(
                {
                    "experiment": study["experiment"],
                    "benchmark": study["benchmark"],
                    "architecture": study["architecture"],
                    "study": study["study"],
                    "parameter": name,
                    "value": float(value),
                    "low": float(p["low"]),
                    "high": float(p["high"]),
                    "log": log,
                    "int": p["type"] == "int",
                    "edge": edge_of(value, p["low"], p["high"], log),
                }
            )
    return pd.DataFrame(rows, columns=columns)


def best_values_of(experiment: str, best: dict[str, dict[str, Any]], space: dict[str, Any]) -> pd.DataFrame:
    """:func:`best_values` from a study name → best parameters mapping (the ledger's view, which
    the CLI reads) and the experiment's ``search:`` as dumped."""
    study_rows = [
        {"experiment": experiment, "stage": "study", "study": name, "benchmark": name.split("/")[-2],
         "architecture": name.split("/")[-1], SPACE_COLUMN: json.dumps(space),
         **{f"hp_{k}": v for k, v in params.items()}}
        for name, params in best.items()
    ]  # fmt: skip
    return best_values(pd.DataFrame(study_rows))


def _domain_ends_at(name: str, edge: str, bound: float) -> bool:
    """Whether the trainer's domain of ``name`` closes at ``bound`` (dropout at 0): no widening."""
    domain = TRAINER_HPARAM_DOMAINS.get(name)
    if domain is None:
        return False
    end, is_open = (domain.low, domain.low_open) if edge == "low" else (domain.high, domain.high_open)
    return end is not None and not is_open and float(end) == float(bound)


def _bound(x: float, integer: bool) -> str:
    return str(int(x)) if integer else f"{x:.3g}"


def edge_notes(best: pd.DataFrame) -> list[str]:
    """One line per benchmark, parameter and edge: how many studies' best lies there."""
    if best.empty:
        return []
    notes = []
    several = best["experiment"].nunique() > 1
    for (experiment, bench, name), group in best.groupby(
        ["experiment", "benchmark", "parameter"], sort=False
    ):
        for edge in ("low", "high"):
            at = group[group["edge"] == edge]
            if at.empty:
                continue
            first = at.iloc[0]
            scale = ", log" if first["log"] else ""
            where = f"{bench} ({experiment})" if several else bench
            shown = ", ".join(at["architecture"].astype(str)[:4]) + (", ..." if len(at) > 4 else "")
            bound = first[edge]
            advice = (
                f"{_bound(bound, first['int'])} is as far as {name} goes"
                if _domain_ends_at(name, edge, bound)
                else "widen the range"
            )
            notes.append(
                f"{where}: best {name} at the {edge} edge of [{_bound(first['low'], first['int'])}, "
                f"{_bound(first['high'], first['int'])}{scale}] in {len(at)} of {len(group)} studies "
                f"({shown}): {advice}"
            )
    return notes


def pruning_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per architecture (rows) and benchmark (columns): search trials pruned / trials that count
    toward the budget."""
    if runs.empty:
        return pd.DataFrame()
    search = runs[(runs["stage"] == "search") & runs["status"].isin(_COUNTED)]
    if search.empty:
        return pd.DataFrame()
    cells: dict[str, dict[str, str]] = {}
    for (arch, bench), group in search.groupby(["architecture", "benchmark"], sort=False):
        cells.setdefault(arch, {})[bench] = f"{(group['status'] == 'pruned').sum()}/{len(group)}"
    benches = sorted(search["benchmark"].dropna().unique(), key=natural_key)
    table = pd.DataFrame.from_dict(cells, orient="index").reindex(columns=benches).fillna("–")
    totals = search.groupby("architecture")["status"].agg(lambda s: f"{(s == 'pruned').sum()}/{len(s)}")
    table["all"] = totals.reindex(table.index)
    return table.sort_index(key=lambda idx: idx.map(natural_key)).reset_index(names="architecture")


PRUNING_CAPTION = (
    "Search trials pruned / trials that count toward the budget (pruned ones count: each is a "
    "configuration tried), per architecture and benchmark. By default a trial is never pruned before "
    "a third of the validations its budget allows."
)
EDGE_CAPTION = (
    f"Studies whose best configuration lies in the outer {EDGE:.0%} of a searched range (log scale "
    "where the range is log): the optimum may lie beyond the range, so widen it before trusting the ranking."
)


def search_html(runs: pd.DataFrame, heading: bool = True) -> str:
    """The report's search section: edge flags and pruning per architecture (``heading``: its
    own h2; the notebook has a markdown heading instead)."""
    best = best_values(runs)
    parts = ["<h2>search coverage</h2>"] if heading else []
    if SPACE_COLUMN not in runs:
        parts.append(
            "<p>the searched ranges are not in this report's runs table (an older rnnbench): report "
            "again from the MLflow store to check for best values at a range's edge</p>"
        )
    elif best.empty or best["edge"].isna().all():
        parts.append(f"<p>no study's best configuration lies in the outer {EDGE:.0%} of a searched range</p>")
    else:
        flagged = best.dropna(subset=["edge"])[["benchmark", "architecture", "parameter", "value", "edge"]]
        flagged = flagged.assign(value=flagged["value"].map(lambda v: f"{v:.4g}"))
        parts.append(_html_table(flagged, EDGE_CAPTION))
        parts.append(
            "<ul class='notes'>" + "".join(f"<li>{html.escape(n)}</li>" for n in edge_notes(best)) + "</ul>"
        )
    pruning = pruning_table(runs)
    if not pruning.empty:
        parts.append(_html_table(pruning, PRUNING_CAPTION))
    return "\n".join(parts)


def write(runs: pd.DataFrame, out: Path) -> list[Path]:
    """tables/search_edges.csv (every study's best value and its place in the range) and
    tables/pruning.csv."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    best = best_values(runs)
    if not best.empty:
        paths.append(out / "search_edges.csv")
        best.to_csv(paths[-1], index=False)
    pruning = pruning_table(runs)
    if not pruning.empty:
        paths.append(out / "pruning.csv")
        pruning.to_csv(paths[-1], index=False)
    return paths
