"""Confidence intervals, paired comparisons and verdicts.

Two sources of uncertainty sit under every score: the seed (initialisation, data order, dropout)
and the test set itself (a finite sample of items). Seeds alone miss the second; per-item outcomes
of every final seed show both. :func:`compare_items` estimates the variance of a difference between
two architectures from both levels, paired on the same test items; :func:`compare_seeds` is the
fallback for runs without items (seed level only). Either gives a :class:`Comparison`, which
:func:`verdict` turns into better / worse / equivalent (within a margin) / inconclusive.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# The fewest seeds the report draws an interval or a verdict from (why: WHY_MIN_SEEDS).
MIN_SEEDS = 3
WHY_MIN_SEEDS = (
    f"with fewer than {MIN_SEEDS} seeds a Student-t interval has at most 1 degree of freedom "
    "(2 seeds: t = 12.71, so the interval spans ±6.4 times the gap between the two values) and a "
    "Welch test almost never rejects, so a verdict would only mean “too few seeds”"
)


def finite(values: Sequence[float | None]) -> list[float]:
    """The values that are numbers (a missing or NaN seed result is left out)."""
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


UNBOUNDED = (-math.inf, math.inf)


def mean_ci(
    values: Sequence[float],
    confidence: float = 0.95,
    min_n: int = 2,
    bounds: tuple[float, float] = UNBOUNDED,
) -> tuple[float, float, float]:
    """(mean, low, high) of a two-sided Student-t interval, cut to ``bounds`` (the values the
    metric can take: from 3 seeds a t-interval of an F1 near 1 easily reaches past it); NaN bounds
    for fewer than ``min_n`` values (the report asks for :data:`MIN_SEEDS`)."""
    vals = finite(values)
    n = len(vals)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = sum(vals) / n
    if n < max(min_n, 2):
        return mean, math.nan, math.nan
    from scipy import stats

    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return mean, max(mean - half, bounds[0]), min(mean + half, bounds[1])


def welch_p_value(a: Sequence[float], b: Sequence[float], min_n: int = 2) -> float:
    """Two-sided Welch t-test p-value (unequal variances); NaN when either side has fewer than
    ``min_n`` values (the report asks for :data:`MIN_SEEDS`)."""
    if len(a) < max(min_n, 2) or len(b) < max(min_n, 2):
        return math.nan
    from scipy import stats

    with warnings.catch_warnings():  # near-identical seeds: scipy warns, the p-value below handles it
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_ind(list(a), list(b), equal_var=False)
    return float(result.pvalue) if math.isfinite(result.pvalue) else (1.0 if list(a) == list(b) else 0.0)


# -- paired comparisons ---------------------------------------------------------------------------

ALPHA = 0.05
POWER = 0.8  # for the smallest detectable difference
REPLICATES = 2000  # bootstrap replicates of the item level

SumsMetric = Callable[[np.ndarray], np.ndarray]
"""Sums of the item columns ``[..., columns]`` -> the metric ``[...]`` (vectorised)."""


@dataclass(frozen=True)
class Comparison:
    """``a`` minus ``b`` on one metric, in the metric's own units.

    ``se`` and ``df`` define a Student-t distribution of the difference; ``ci_low``/``ci_high`` its
    95% interval; ``p_value`` the two-sided test of no difference; ``p_equivalence`` the TOST test
    of a difference within ±``margin`` (NaN without a margin); ``detectable`` the smallest true
    difference this design finds with 80% power at α = 0.05 (two-sided)."""

    difference: float
    ci_low: float
    ci_high: float
    p_value: float
    se: float
    df: float
    detectable: float
    margin: float | None
    p_equivalence: float
    seeds_a: int
    seeds_b: int
    items: int  # test items paired; 0 when only seed-level values were compared
    method: str


def _t_comparison(
    difference: float, variance: float, df: float, margin: float | None, seeds: tuple[int, int], items: int,
    method: str,
) -> Comparison:  # fmt: skip
    from scipy import stats

    se = math.sqrt(max(variance, 0.0))
    df = max(df, 1.0)
    t_crit = float(stats.t.ppf(1 - ALPHA / 2, df))
    if se == 0.0:  # identical outcomes: the difference is exact
        p = 1.0 if difference == 0 else 0.0
        p_eq = math.nan if margin is None else (0.0 if abs(difference) < margin else 1.0)
        return Comparison(
            difference, difference, difference, p, 0.0, df, 0.0, margin, p_eq, *seeds, items, method
        )
    p = float(2 * stats.t.sf(abs(difference) / se, df))
    p_eq = math.nan
    if margin is not None:  # two one-sided tests: above -margin and below +margin
        p_eq = float(
            max(stats.t.sf((difference + margin) / se, df), stats.t.cdf((difference - margin) / se, df))
        )
    detectable = (t_crit + float(stats.t.ppf(POWER, df))) * se
    return Comparison(
        difference, difference - t_crit * se, difference + t_crit * se, p, se, df, detectable, margin, p_eq,
        *seeds, items, method,
    )  # fmt: skip


def compare_seeds(a: Sequence[float], b: Sequence[float], margin: float | None = None) -> Comparison:
    """Seed-level comparison (Welch): what is left when per-item outcomes are missing. It ignores
    the test set's own sampling noise, so it is narrower than the truth; the report says so."""
    a, b = np.asarray(finite(a)), np.asarray(finite(b))
    if len(a) < 2 or len(b) < 2:
        raise ValueError("a seed-level comparison needs at least 2 seeds on each side")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    df = _satterthwaite([(va, len(a) - 1), (vb, len(b) - 1)])
    return _t_comparison(
        float(a.mean() - b.mean()), va + vb, df, margin, (len(a), len(b)), 0, "Welch over seeds"
    )


def bootstrap_weights(n_items: int, replicates: int = REPLICATES, seed: int = 0) -> np.ndarray:
    """``[replicates, n_items]`` multinomial resampling counts. Every architecture of a benchmark
    uses the same draws, so each replicate resamples the same items for both sides of a
    comparison (the pairing)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_items, np.full(n_items, 1.0 / n_items), size=replicates).astype(np.float64)


@dataclass(frozen=True)
class ItemScores:
    """One architecture's metric per seed on the full test set (``full``, ``[seeds]``) and on each
    bootstrap resample of its items (``replicates``, ``[R, seeds]``)."""

    full: np.ndarray
    replicates: np.ndarray
    n_items: int

    @classmethod
    def of(cls, items: np.ndarray, weights: np.ndarray, metric: SumsMetric) -> ItemScores:
        """``items``: ``[seeds, n_items, columns]`` outcomes whose column sums give the metric."""
        seeds, n, columns = items.shape
        if weights.shape[1] != n:
            raise ValueError(f"{n} items against weights for {weights.shape[1]}")
        flat = items.astype(np.float64).transpose(1, 0, 2).reshape(n, seeds * columns)
        sums = (weights @ flat).reshape(len(weights), seeds, columns)  # one BLAS call for all replicates
        full = np.asarray(metric(items.sum(axis=1, dtype=np.float64)), float)
        return cls(full, np.asarray(metric(sums), float), n)


def compare_items(a: ItemScores, b: ItemScores, margin: float | None = None) -> Comparison:
    """Paired two-level comparison of ``a`` minus ``b`` (seeds, then the test items they share).

    The estimate is the difference of the seed means. Its variance has three parts: each side's
    seed-to-seed variance over its number of seeds (as Welch), and the variance that comes from
    which items the test set happens to hold, estimated by resampling the items (the same draws for
    both sides, so what is common to both cancels). The seed variances, measured on one fixed test
    set, already contain each seed's own item-by-seed interaction, and so does the resampled
    difference: counted twice, it would make the interval too wide. That interaction is the spread,
    within one resample, of the seeds' deviations from their full-sample scores, and it is taken
    out once. The difference is then read against Student t with Satterthwaite's degrees of
    freedom, which the percentile bootstrap lacks at 3 to 10 seeds (it under-covers there).

    Written here rather than with ``scipy.stats.bootstrap``: that resamples one level of
    independent observations; this design is crossed (seeds × shared items) and paired.
    """
    seeds_a, seeds_b = a.full.size, b.full.size
    if seeds_a < 2 or seeds_b < 2:
        raise ValueError("a paired comparison needs at least 2 seeds on each side")
    difference = float(a.full.mean() - b.full.mean())
    seed_a, seed_b = a.full.var(ddof=1) / seeds_a, b.full.var(ddof=1) / seeds_b
    resampled = a.replicates.mean(axis=1) - b.replicates.mean(axis=1)
    interaction = sum(
        float(np.mean((s.replicates - s.full).var(axis=1, ddof=1))) / s.full.size for s in (a, b)
    )
    items_part = max(float(resampled.var(ddof=1)) - interaction, 0.0)
    if a.n_items != b.n_items:
        raise ValueError(f"unpaired items: {a.n_items} against {b.n_items}")
    n_items = a.n_items
    df = _satterthwaite([(seed_a, seeds_a - 1), (seed_b, seeds_b - 1), (items_part, max(n_items - 1, 1))])
    return _t_comparison(
        difference, seed_a + seed_b + items_part, df, margin, (seeds_a, seeds_b), n_items,
        "paired bootstrap over seeds and items",
    )  # fmt: skip


def _satterthwaite(parts: list[tuple[float, float]]) -> float:
    """Welch–Satterthwaite degrees of freedom of a sum of independent variance estimates."""
    total = sum(v for v, _ in parts)
    denominator = sum(v * v / df for v, df in parts if df > 0)
    return total * total / denominator if denominator > 0 else math.inf


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values of one family; NaN entries stay NaN and are not counted.

    The same numbers as statsmodels' ``multipletests(method="holm")`` (tests/test_stats.py checks
    it), written out because statsmodels runs a full ``gc.collect()`` in its Holm branch on every
    call: 0.12 s each with MLflow and pandas loaded, 1.5 of the 2.5 s a six-benchmark ranking took."""
    values = np.asarray(p_values, dtype=float)
    adjusted = np.full(values.shape, np.nan)
    tested = np.flatnonzero(~np.isnan(values))
    order = tested[np.argsort(values[tested], kind="stable")]
    scaled = values[order] * np.arange(len(order), 0, -1)  # the k-th smallest times (m - k + 1)
    adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return adjusted.tolist()


VERDICTS = ("better", "worse", "equivalent", "inconclusive")


def verdict(difference: float, direction: str, p_adjusted: float, p_equivalence_adjusted: float) -> str:
    """``a`` against ``b`` (``difference`` = a − b): better or worse when the (family-adjusted)
    test rejects no difference; equivalent when the (family-adjusted) two one-sided tests place it
    within ±margin (their p-value is NaN without a margin, so never); else inconclusive. A rejected
    difference inside the margin stays better/worse (it is real, if small)."""
    if p_adjusted < ALPHA:
        a_higher = difference > 0
        return "better" if a_higher == (direction == "maximize") else "worse"
    if p_equivalence_adjusted < ALPHA:
        return "equivalent"
    return "inconclusive"
