"""Known-answer tests of the paired comparison: coverage and false-positive rate on simulated
outcomes with a known true difference, and the verdict rules."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from rnnbench.stats import (
    Comparison,
    ItemScores,
    bootstrap_weights,
    compare_items,
    compare_seeds,
    holm,
    verdict,
)


def _mean(sums: np.ndarray) -> np.ndarray:
    return sums[..., 0] / sums[..., 1]


def _crossed(rng, delta, n=200, seeds=5, item=0.5, own=0.5, seed_sd=0.05, interaction=1.0):
    """Outcomes of two architectures on the same n items: a shared item effect, an effect of each
    item on each architecture, a seed effect and a seed-by-item interaction. True difference: delta."""
    common = rng.normal(0, item, n)
    out = []
    for mu in (delta, 0.0):
        y = (
            mu
            + common
            + rng.normal(0, own, n)
            + rng.normal(0, seed_sd, (seeds, 1))
            + rng.normal(0, interaction, (seeds, n))
        )
        out.append(np.stack([y, np.ones_like(y)], -1))
    return out


def _simulate(delta, sims=1000, replicates=200, seed=1, **design):
    rng = np.random.default_rng(seed)
    covered = rejected = 0
    for _ in range(sims):
        a, b = _crossed(rng, delta, **design)
        weights = bootstrap_weights(a.shape[1], replicates, seed=int(rng.integers(2**31)))
        c = compare_items(ItemScores.of(a, weights, _mean), ItemScores.of(b, weights, _mean))
        covered += c.ci_low <= delta <= c.ci_high
        rejected += c.p_value < 0.05
    return covered / sims, rejected / sims


@pytest.mark.parametrize(
    "design",
    [
        {},  # every component matters
        # seed noise dominates, 3 seeds; the seed-by-item interaction dominates (about 20 s each)
        pytest.param({"seeds": 3, "seed_sd": 0.3, "interaction": 0.5}, marks=pytest.mark.slow),
        pytest.param({"seeds": 10, "own": 0.1, "interaction": 2.0}, marks=pytest.mark.slow),
    ],
)
def test_interval_covers_the_true_difference_and_zero_is_rejected_at_alpha(design):
    coverage, _ = _simulate(0.3, **design)
    assert 0.93 <= coverage <= 0.97
    coverage_at_zero, false_positives = _simulate(0.0, seed=2, **design)
    assert 0.93 <= coverage_at_zero <= 0.97
    assert 0.03 <= false_positives <= 0.07


def test_seed_level_comparison_is_welch():
    a, b = [0.81, 0.83, 0.80, 0.82], [0.78, 0.80, 0.79]
    c = compare_seeds(a, b)
    assert c.p_value == pytest.approx(sps.ttest_ind(a, b, equal_var=False).pvalue)
    assert c.ci_low < c.difference < c.ci_high
    assert c.items == 0 and c.method == "Welch over seeds"


def test_pairing_cancels_what_both_architectures_share():
    """The same items for both sides: a large common item effect must not widen the interval."""
    rng = np.random.default_rng(3)
    a, b = _crossed(rng, 0.2, n=500, item=5.0, own=0.1, interaction=0.1)
    weights = bootstrap_weights(500, 500)
    paired = compare_items(ItemScores.of(a, weights, _mean), ItemScores.of(b, weights, _mean))
    unpaired = compare_items(
        ItemScores.of(a, weights, _mean), ItemScores.of(b, bootstrap_weights(500, 500, seed=9), _mean)
    )
    assert paired.se < unpaired.se / 5
    assert paired.ci_low <= 0.2 <= paired.ci_high


def test_ratio_metric_from_sums():
    """A metric that is a ratio of sums (micro F1) is recomputed per replicate, vectorised."""
    rng = np.random.default_rng(4)
    tp, fp, fn = (rng.poisson(lam, (3, 100)) for lam in (3.0, 1.0, 1.0))
    items = np.stack([tp, fp, fn], -1).astype(np.float32)

    def f1(s):
        return 2 * s[..., 0] / (2 * s[..., 0] + s[..., 1] + s[..., 2])

    scores = ItemScores.of(items, bootstrap_weights(100, 50), f1)
    full = items.sum(1)
    assert np.allclose(scores.full, 2 * full[:, 0] / (2 * full[:, 0] + full[:, 1] + full[:, 2]))
    assert scores.replicates.shape == (50, 3)


def _comparison(difference, se, margin):
    c = compare_seeds([0.0, 1.0], [0.0, 1.0], margin)  # a template; fields replaced below
    fields = {**c.__dict__, "difference": difference, "se": se, "df": 30.0}
    lo, hi = sps.t.interval(0.95, 30, loc=difference, scale=se)
    p = 2 * sps.t.sf(abs(difference) / se, 30)
    p_eq = max(sps.t.sf((difference + margin) / se, 30), sps.t.cdf((difference - margin) / se, 30))
    return Comparison(**fields | {"ci_low": lo, "ci_high": hi, "p_value": p, "p_equivalence": p_eq})


@pytest.mark.parametrize(
    ("difference", "se", "direction", "expected"),
    [
        (0.02, 0.002, "maximize", "better"),
        (0.02, 0.002, "minimize", "worse"),
        (0.0005, 0.001, "maximize", "equivalent"),  # tight interval inside ±0.005
        (0.004, 0.01, "maximize", "inconclusive"),  # neither excluded nor inside the margin
    ],
)
def test_three_verdicts(difference, se, direction, expected):
    c = _comparison(difference, se, margin=0.005)
    assert verdict(c.difference, direction, c.p_value, c.p_equivalence) == expected


def test_no_margin_means_no_equivalence():
    c = compare_seeds([0.5, 0.5001, 0.4999], [0.5, 0.5002, 0.4998], margin=None)
    assert math.isnan(c.p_equivalence)
    assert verdict(c.difference, "maximize", c.p_value, c.p_equivalence) == "inconclusive"


def test_holm_matches_the_textbook_and_statsmodels_and_skips_nan():
    from statsmodels.stats.multitest import multipletests

    # Holm: sorted p (0.01, 0.02, 0.04) times (3, 2, 1), running maximum
    assert holm([0.04, math.nan, 0.01, 0.02]) == pytest.approx([0.04, math.nan, 0.03, 0.04], nan_ok=True)
    rng = np.random.default_rng(7)
    for size in (1, 2, 7, 50):
        p = rng.uniform(0, 0.2, size) ** 2
        p[rng.integers(0, size)] = p[0]  # ties
        assert holm(p) == pytest.approx(multipletests(p, method="holm")[1].tolist())
    assert holm([]) == []


def test_detectable_difference_has_the_stated_power():
    """At a true difference equal to the stated smallest detectable one, about 80% of studies reject."""
    rng = np.random.default_rng(6)
    a, b = _crossed(rng, 0.0)
    weights = bootstrap_weights(200, 400)
    target = compare_items(ItemScores.of(a, weights, _mean), ItemScores.of(b, weights, _mean)).detectable
    rejected = 0
    for i in range(400):
        a, b = _crossed(rng, target)
        w = bootstrap_weights(200, 200, seed=i)
        rejected += compare_items(ItemScores.of(a, w, _mean), ItemScores.of(b, w, _mean)).p_value < 0.05
    assert 0.7 <= rejected / 400 <= 0.9
