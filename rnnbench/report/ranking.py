"""Architectures ranked over all benchmarks: a Friedman test and a Nemenyi critical-difference
diagram (Demšar, JMLR 2006).

Why this test: the benchmarks measure different metrics on different scales, so only ranks are
comparable across them; Friedman's test uses exactly the per-benchmark ranks, assumes nothing about
their distribution, and Demšar's protocol is the one reviewers of multi-dataset comparisons know.
Its price is power: with few benchmarks the critical difference is wide, and the diagram says so.
(A Bayesian signed-rank test with a region of practical equivalence needs a common scale for the
differences, which perplexity, F1 and MSE do not share.)

Written with scipy rather than ``autorank``: autorank and its dependency baycomp install a
top-level ``tests`` package into site-packages, which shadows the project's own ``tests``
package for pytest (seen with autorank 1.3.0 and baycomp 1.0.3). The arithmetic is two lines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from rnnbench.report.tables import BASELINE_ROW
from rnnbench.stats import ALPHA


@dataclass
class CrossBenchmarkRanks:
    """Mean ranks of architectures over the benchmarks every one of them was ranked on."""

    ranks: pd.DataFrame  # benchmarks × architectures, 1 = best
    mean_ranks: pd.Series  # best first
    friedman_p: float
    critical_difference: float
    left_out: dict[str, str] = field(default_factory=dict)  # architecture or benchmark -> why

    @property
    def benchmarks(self) -> list[str]:
        return list(self.ranks.index)

    def groups(self) -> list[list[str]]:
        """Maximal runs of architectures (in mean-rank order) whose mean ranks lie within one
        critical difference: members of a group are not told apart by the test."""
        names, values = list(self.mean_ranks.index), self.mean_ranks.to_numpy()
        cliques = []
        for i in range(len(names)):
            j = i
            while j + 1 < len(names) and values[j + 1] - values[i] <= self.critical_difference:
                j += 1
            if j > i and not any(a <= i and j <= b for a, b in cliques):
                cliques.append((i, j))
        return [names[a : b + 1] for a, b in cliques]


def rank_over_benchmarks(scores: pd.DataFrame, directions: dict[str, str]) -> CrossBenchmarkRanks | None:
    """``scores``: one row per benchmark, one column per architecture (NaN where it was not
    ranked). Keeps the largest block in which every architecture has every benchmark: first the
    architectures ranked on the most benchmarks, then the benchmarks they all share. None when
    fewer than 2 benchmarks or 3 architectures remain."""
    # local: scipy.stats costs +1.8 s on `import rnnbench.report`; only this test needs it
    from scipy import stats

    left_out: dict[str, str] = {}
    coverage = scores.notna().sum()
    kept = coverage[coverage == coverage.max()].index if len(coverage) else coverage.index
    for arch in scores.columns.difference(kept):
        left_out[arch] = f"ranked on {int(coverage[arch])} of {len(scores)} benchmarks only"
    block = scores[kept].dropna(axis=0, how="any")
    for bench in scores.index.difference(block.index):
        left_out[bench] = "not every architecture was ranked on it"
    if len(block) < 2 or block.shape[1] < 3:
        return None
    ranks = pd.DataFrame(
        [
            (row if directions[bench] == "minimize" else -row).rank(method="average")
            for bench, row in block.iterrows()
        ]
    )
    ranks.index = block.index
    mean_ranks = ranks.mean().sort_values()
    k, n = block.shape[1], len(block)
    p = float(stats.friedmanchisquare(*[ranks[c].to_numpy() for c in ranks.columns]).pvalue)
    # Nemenyi: q_alpha of the studentized range with infinite df, over sqrt(2) (Demšar, eq. 5)
    q = float(stats.studentized_range.ppf(1 - ALPHA, k, np.inf)) / math.sqrt(2)
    cd = q * math.sqrt(k * (k + 1) / (6 * n))
    return CrossBenchmarkRanks(ranks, mean_ranks, p if math.isfinite(p) else 1.0, cd, left_out)


def scores_of(tables) -> tuple[pd.DataFrame, dict[str, str]]:
    """Benchmarks × architectures of mean test scores from the ranking tables (one experiment)."""
    rows, directions = {}, {}
    for t in tables:
        if t.table.empty or "mean" not in t.table:
            continue
        ranked = t.table[(t.table["architecture"] != BASELINE_ROW) & (t.table["seeds"] > 0)]
        rows[t.task] = ranked.set_index("architecture")["mean"].astype(float)
        directions[t.task] = t.info.direction
    return pd.DataFrame(rows).T, directions


def critical_difference_diagram(result: CrossBenchmarkRanks, style=None):
    """Demšar's diagram: mean ranks on one axis (1 = best, at the left), a bar of one critical
    difference, and thick lines joining architectures the test does not tell apart."""
    # local: pyplot costs +0.8 s on `import rnnbench.report`; the report picks the Agg backend first
    import matplotlib.pyplot as plt

    names = list(result.mean_ranks.index)
    k = len(names)
    half = (k + 1) // 2
    fig, ax = plt.subplots(figsize=(8.5, 1.6 + 0.32 * half))
    ax.set_xlim(0.5, k + 0.5)
    ax.set_ylim(-(half + 1.8), 1.4)
    ax.axis("off")
    ax.hlines(0, 1, k, color="black", lw=1)
    for r in range(1, k + 1):
        ax.vlines(r, 0, 0.15, color="black", lw=1)
        ax.text(r, 0.3, str(r), ha="center", va="bottom", fontsize=9)
    ax.hlines(1.05, 1, 1 + result.critical_difference, color="black", lw=2)
    ax.text(1 + result.critical_difference / 2, 1.15, f"CD = {result.critical_difference:.2f}",
            ha="center", va="bottom", fontsize=9)  # fmt: skip
    for i, name in enumerate(names):
        rank = result.mean_ranks[name]
        left = i < half
        level = -(i + 1) if left else -(k - i)
        x_text = 0.6 if left else k + 0.4
        colour = style.colour(name.split("-")[0]) if style is not None else "black"
        ax.plot([rank, rank, x_text], [0, level, level], color=colour, lw=1)
        ax.text(x_text, level, f"{name} ({rank:.2f})", ha="left" if not left else "right",
                va="center", fontsize=9, color=colour)  # fmt: skip
    for g, group in enumerate(result.groups()):
        lo, hi = result.mean_ranks[group[0]], result.mean_ranks[group[-1]]
        ax.hlines(-0.35 - 0.22 * g, lo - 0.05, hi + 0.05, color="0.2", lw=4, alpha=0.6)
    verdict = "differ" if result.friedman_p < ALPHA else "are not shown to differ"
    ax.set_title(
        f"mean rank over {len(result.benchmarks)} benchmarks (1 = best); Friedman p = "
        f"{result.friedman_p:.3g}: the architectures {verdict} at α = {ALPHA}",
        fontsize=10,
    )
    fig.tight_layout()
    return fig
