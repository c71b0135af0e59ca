"""The statistics helpers against SciPy and hand computation."""

import numpy as np
import pytest
from scipy import stats as sp

from routelens import stats

pytestmark = pytest.mark.quick   # the quick tier: pure functions, run first


def test_spearman_matches_scipy_and_handles_constant_input():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=30), rng.normal(size=30)
    assert stats.spearman(x, y) == pytest.approx(sp.spearmanr(x, y).statistic)
    assert np.isnan(stats.spearman(x, np.ones(30)))


def test_fisher_z_mean_by_hand_and_clipping():
    r = np.array([0.1, 0.5, 0.9, np.nan])
    expected = np.tanh(np.mean(np.arctanh([0.1, 0.5, 0.9])))
    assert stats.fisher_z_mean(r) == pytest.approx(expected)
    assert np.isfinite(stats.fisher_z(np.array([1.0, -1.0]))).all()
    assert stats.fisher_z(np.array([1.0]))[0] == pytest.approx(np.arctanh(0.9999))
    assert np.isnan(stats.fisher_z_mean(np.array([np.nan])))


def test_cluster_bootstrap_matches_scipy_on_cluster_means():
    """With equal cluster sizes the ratio of sums is the mean of cluster means, so the
    interval must equal SciPy's percentile bootstrap of the cluster means (same rng)."""
    rng = np.random.default_rng(1)
    cluster_means = rng.normal(size=25)
    sizes = np.full(25, 4.0)
    low, high = stats.cluster_bootstrap_ratio(cluster_means * sizes, sizes, seed=7, n_resamples=999)
    reference = sp.bootstrap((cluster_means,), np.mean, n_resamples=999, method="percentile",
                             rng=np.random.default_rng(7)).confidence_interval
    assert low == pytest.approx(reference.low) and high == pytest.approx(reference.high)


def test_cluster_bootstrap_keeps_clusters_together():
    """One big cluster of identical values: token-level resampling would give a zero-width
    interval, resampling clusters must not."""
    sums = np.array([100.0, 0.0, 1.0, 0.0, 2.0])
    counts = np.array([100.0, 1.0, 1.0, 1.0, 1.0])
    low, high = stats.cluster_bootstrap_ratio(sums, counts, seed=0)
    estimate = sums.sum() / counts.sum()
    assert low < estimate < high
    assert high - low > 0.1


def test_cluster_bootstrap_needs_two_clusters():
    assert all(np.isnan(stats.cluster_bootstrap_ratio(np.array([1.0]), np.array([2.0]), seed=0)))


@pytest.mark.parametrize("n", [3, 8, 20, 50, 51, 60])
def test_row_statistics_equal_the_one_row_calls(n):
    """wilcoxon_p_rows and median_interval_rows (the isolation cells, all at once) give
    exactly what wilcoxon_p and median_interval give row by row, including rows with zero
    deltas, ties, all zeros, and n where SciPy changes method (exact up to 50) or has no
    interval (n = 3)."""
    rng = np.random.default_rng(n)
    rows = rng.normal(size=(60, n)) * 0.1
    rows[3] = 0                                   # all zero: p 1.0
    rows[5, :2] = 0                               # zero deltas dropped
    rows[7] = np.round(rows[7], 1)                # ties
    rows[9, 0] = -rows[9, 1]                      # a tie of |delta| only
    rows[11] = np.abs(rows[11])                   # one-sided
    p = stats.wilcoxon_p_rows(rows)
    low, high = stats.median_interval_rows(rows)
    for row, values in enumerate(rows):
        assert np.array_equal(p[row], stats.wilcoxon_p(values), equal_nan=True), row
        assert np.array_equal([low[row], high[row]], stats.median_interval(values), equal_nan=True), row
    assert np.isnan(low).all() == (n == 3)
    with_nan = rows.copy()
    with_nan[2, 0] = np.nan
    low, high = stats.median_interval_rows(with_nan)
    assert np.array_equal([low[2], high[2]], stats.median_interval(with_nan[2]), equal_nan=True)
