"""Budget sensitivity: would a smaller training budget have ranked the architectures the same?

For each benchmark, the architectures are ranked as if training had stopped at 25/50/75/100% of
the step budget, and each ranking is compared with the full-budget one by Kendall's τ-b.

What "stopped at x%" means here: the runs keep their best checkpoint (the trainer restores it and
the report ranks by ``best_valid_<metric>``), so a run stopped at x% would be scored by the best
validation it had reached by then, not by its last one. Each final seed therefore contributes its
*best validation so far* at the last validation at or before x% of the budget; an architecture's
score is the mean over its final seeds, as in the report's ranking (at 100% the two agree). The
validation at the point itself would score a checkpoint nobody keeps; on reports/reference-cpu
only the best so far reproduces the reviewer's τ (issue 22).

The budget is the most steps any final seed of the benchmark trained: one axis of optimiser steps
shared by every architecture. A run that ended sooner (early stopping, or fewer steps per epoch)
holds its best value from its last validation on. An architecture with a seed not yet validated
at a point is left out of that point's ranking (a mean over some seeds would not compare).
"""

from __future__ import annotations

import html
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from rnnbench.report.collect import TaskInfo
from rnnbench.report.tables import _html_table, _page, to_markdown
from rnnbench.stops import CONVERGED_REASONS

FRACTIONS = (0.25, 0.5, 0.75, 1.0)
# a cut at 1/3 of 750 steps is 249.99999999999997: a validation at step 250 is still inside it
_SLACK = 1e-9


@dataclass
class BudgetSensitivity:
    """Rankings at fractions of the step budget and their agreement with the full-budget one."""

    # experiment, benchmark, fraction, steps, architecture, cell, variant, value, seeds, rank
    ranks: pd.DataFrame
    # experiment, benchmark, fraction, steps, budget, unit, architectures, tau, p, left_out
    taus: pd.DataFrame
    notes: list[str] = field(default_factory=list)

    def rank_paths(self, benchmark: str, experiment: str | None = None) -> pd.DataFrame:
        """architecture × fraction of ranks (1 = best) for one benchmark: how each one moved."""
        mine = self.ranks[self.ranks["benchmark"] == benchmark]
        if experiment is not None:
            mine = mine[mine["experiment"] == experiment]
        return mine.pivot_table(index="architecture", columns="fraction", values="rank", aggfunc="first")


def validation_points(runs: pd.DataFrame, histories: pd.DataFrame, infos: dict[str, TaskInfo]):
    """One row per validation of each complete final seed: experiment, benchmark, architecture,
    cell, variant, run_id, step (validation number), position (optimiser steps, or the validation
    number where no step count was logged), value, best (best so far), unit and stop_reason; and
    notes."""
    notes: list[str] = []
    columns = ["experiment", "benchmark", "architecture", "cell", "variant", "run_id", "step", "position",
               "value", "best", "unit", "stop_reason"]  # fmt: skip
    if histories is None or histories.empty or runs.empty or "stage" not in runs:
        return pd.DataFrame(columns=columns), notes
    finals = runs[(runs["stage"] == "final") & (runs["status"] == "complete")]
    finals = finals.assign(experiment=finals["experiment"] if "experiment" in finals else None)
    hist = histories.drop(columns=["experiment", "best_trial"], errors="ignore")
    # the trainer logs the optimiser steps done at each validation (metric ``steps``); MLflow may
    # hold the run's summary under the same name at step 0, which no validation joins
    logged = hist[hist["metric"] == "steps"].groupby(["run_id", "step"])["value"].max().rename("logged")
    meta = ["experiment", "benchmark", "architecture", "cell", "variant", "run_id"]
    frames = []
    for bench, info in infos.items():
        mine = finals[finals["benchmark"] == bench]
        if mine.empty:
            continue
        vals = hist[(hist["metric"] == f"valid_{info.metric}") & hist["run_id"].isin(mine["run_id"])]
        unseen = mine[~mine["run_id"].isin(vals["run_id"])]
        if len(unseen):
            notes.append(
                f"{bench}: {len(unseen)} final seed(s) without a validation history "
                f"({', '.join(sorted(unseen['architecture'].unique()))}) left out of the budget sensitivity"
            )
        if vals.empty:
            continue
        points = vals.merge(
            mine[meta + [c for c in ("steps", "epochs", "stop_reason") if c in mine]], on="run_id"
        )
        points = points.join(logged, on=["run_id", "step"])
        position, unit = points["logged"], "steps"
        if position.isna().any() and {"steps", "epochs"} <= set(points.columns):
            # older stores logged no step count per validation: every round is assumed to train
            # steps/epochs steps (exact for fixed epochs; the last round under max_steps may be shorter)
            position = position.fillna(points["step"] * points["steps"] / points["epochs"])
        if position.isna().any():
            notes.append(f"{bench}: no step counts logged; the budget is counted in validations")
            position, unit = points["step"], "validations"
        sign = 1.0 if info.direction == "minimize" else -1.0
        points = points.assign(
            position=position.astype(float), value=points["value"].astype(float), unit=unit
        )
        points = points.sort_values(["run_id", "step"])
        points["best"] = sign * (sign * points["value"]).groupby(points["run_id"]).cummin()
        frames.append(points if "stop_reason" in points else points.assign(stop_reason=None))
    if not frames:
        return pd.DataFrame(columns=columns), notes
    return pd.concat(frames, ignore_index=True)[columns], notes


def _ranking(points: pd.DataFrame, cut: float, sign: float) -> pd.DataFrame:
    """Architectures (index) of one benchmark at ``cut`` steps: mean over seeds of the best so far
    at each seed's last validation by then, seed count, rank (1 = best, ties averaged); only those
    whose every seed was validated by then."""
    seeds = points.groupby("architecture")["run_id"].nunique()
    upto = points[points["position"] <= cut * (1 + _SLACK)]
    at = upto.sort_values(["run_id", "position"]).groupby("run_id").last()
    by_arch = at.groupby("architecture")["best"].agg(["mean", "size"])
    by_arch = by_arch[by_arch["size"] == seeds[by_arch.index]]
    return by_arch.assign(rank=(sign * by_arch["mean"]).rank(method="average"))


def budget_sensitivity(
    runs: pd.DataFrame,
    histories: pd.DataFrame,
    infos: dict[str, TaskInfo],
    fractions: tuple[float, ...] = FRACTIONS,
) -> BudgetSensitivity:
    """Each benchmark's ranking (mean over final seeds of the best validation so far) at each
    fraction of its step budget, and Kendall's τ-b of each against the ranking at 100%.
    ``infos``: benchmark → TaskInfo (``collect.benchmark_infos``). τ is NaN with fewer than two
    architectures ranked at both points, or where one ranking is all ties."""
    # local: scipy.stats costs +1.8 s on `import rnnbench.report`; only this computation needs it
    from scipy.stats import kendalltau

    points, notes = validation_points(runs, histories, infos)
    rank_rows, tau_rows = [], []
    for (experiment, bench), group in points.groupby(["experiment", "benchmark"], dropna=False, sort=False):
        info = infos[bench]
        experiment = None if pd.isna(experiment) else experiment
        sign = 1.0 if info.direction == "minimize" else -1.0
        budget = float(group["position"].max())
        unit = group["unit"].iloc[0]
        if group.drop_duplicates("run_id")["stop_reason"].isin(CONVERGED_REASONS).all():
            notes.append(f"{bench}: every final seed stopped by patience, so the budget here is the longest "
                         f"run's {budget:g} {unit}, less than the one configured")  # fmt: skip
        names = group.drop_duplicates("architecture").set_index("architecture")[["cell", "variant"]]
        full = _ranking(group, budget, sign)
        for fraction in fractions:
            cut = fraction * budget
            now = _ranking(group, cut, sign)
            for arch, row in now.sort_values("rank").iterrows():
                rank_rows.append({"experiment": experiment, "benchmark": bench, "fraction": fraction, "steps": cut,
                                  "architecture": arch, "cell": names.loc[arch, "cell"],
                                  "variant": names.loc[arch, "variant"], "value": row["mean"],
                                  "seeds": int(row["size"]), "rank": row["rank"]})  # fmt: skip
            common = now.index.intersection(full.index)
            tau = p = math.nan
            if len(common) >= 2:
                with warnings.catch_warnings():  # all ties: scipy warns and returns NaN, which says it
                    warnings.simplefilter("ignore")
                    result = kendalltau(now.loc[common, "rank"], full.loc[common, "rank"], variant="b")
                tau, p = float(result.statistic), float(result.pvalue)
            missing = sorted(full.index.difference(now.index))
            tau_rows.append({"experiment": experiment, "benchmark": bench, "fraction": fraction, "steps": cut,
                             "budget": budget, "unit": unit, "architectures": len(common), "tau": tau, "p": p,
                             "left_out": ", ".join(missing)})  # fmt: skip
    rank_cols = ["experiment", "benchmark", "fraction", "steps", "architecture", "cell", "variant", "value",
                 "seeds", "rank"]  # fmt: skip
    tau_cols = ["experiment", "benchmark", "fraction", "steps", "budget", "unit", "architectures", "tau", "p",
                "left_out"]  # fmt: skip
    return BudgetSensitivity(pd.DataFrame(rank_rows, columns=rank_cols), pd.DataFrame(tau_rows, columns=tau_cols),
                             notes)  # fmt: skip


CAPTION = (
    "Budget sensitivity: Kendall's τ-b between each benchmark's ranking had training stopped at a "
    "fraction of its step budget and the ranking at the full budget (1 = the same order, 0 = unrelated, "
    "−1 = reversed). A ranking at x% uses each final seed's best validation score reached by then (the "
    "best checkpoint is the one kept), averaged over the seeds; the budget is the most steps any final "
    "seed of the benchmark trained, and a run that stopped sooner keeps its best. Architectures with a "
    "seed not yet validated at a point are left out of it. largest rank change: the architecture whose "
    "rank moved most across the fractions, and its ranks (1 = best; ties share the mean rank)."
)


def _count(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.1f}"


def frame(result: BudgetSensitivity) -> pd.DataFrame:
    """One row per benchmark (and experiment): τ at each fraction below 100%, the budget, and the
    architecture whose rank moved most."""
    taus = result.taus
    if taus.empty:
        return pd.DataFrame()
    several = taus["experiment"].nunique(dropna=False) > 1
    rows = []
    for (experiment, bench), group in taus.groupby(["experiment", "benchmark"], dropna=False, sort=False):
        row = {"experiment": experiment} if several else {}
        row |= {"benchmark": bench, "budget": f"{_count(group['budget'].iloc[0])} {group['unit'].iloc[0]}"}
        for _, t in group[group["fraction"] < 1].iterrows():
            tau = "–" if math.isnan(t["tau"]) else f"{t['tau']:+.2f}"
            left = f" ({t['architectures']} ranked)" if t["left_out"] else ""
            row[f"τ at {t['fraction']:.0%}"] = tau + left
        paths = result.rank_paths(bench, None if pd.isna(experiment) else experiment)
        paths = paths.reindex(columns=list(group["fraction"]))  # a fraction nobody reached shows as –
        row["architectures"] = int(group["architectures"].max())
        if len(paths):
            moved = (paths.max(axis=1) - paths.min(axis=1)).sort_values(ascending=False, kind="stable")
            arch = moved.index[0]
            ranks = " → ".join("–" if pd.isna(r) else f"{r:g}" for r in paths.loc[arch])
            row["largest rank change"] = f"{arch}: {ranks}" if moved.iloc[0] > 0 else "none"
        rows.append(row)
    return pd.DataFrame(rows).fillna("–")


def html_table(result: BudgetSensitivity) -> str:
    """The table with its caption, and the notes (the notebook shows it under its own heading)."""
    shown = frame(result)
    if shown.empty:
        return "<p>no validation history of final seeds</p>"
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in result.notes)
    return _html_table(shown, CAPTION) + (f"<ul class='notes'>{notes}</ul>" if notes else "")


def html_section(result: BudgetSensitivity) -> str:
    """The report's section: heading, table, notes."""
    return "<h2>budget sensitivity</h2>\n" + html_table(result)


def write(result: BudgetSensitivity, out: Path) -> list[Path]:
    """tables/budget_sensitivity.{csv,md,html} (τ per benchmark and fraction) and
    budget_ranks.csv (every architecture's rank at every fraction), raw numbers in the CSVs."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"budget_sensitivity{s}" for s in (".csv", ".md", ".html")] + [out / "budget_ranks.csv"]
    result.taus.to_csv(paths[0], index=False)
    shown = frame(result)
    paths[1].write_text(
        f"## budget sensitivity\n\n{CAPTION}\n\n{to_markdown(shown) if len(shown) else 'no validation history'}\n"
        + "".join(f"- {n}\n" for n in result.notes)
    )
    paths[2].write_text(_page("budget sensitivity", html_section(result)))
    result.ranks.to_csv(paths[3], index=False)
    return paths
