"""Statistics, built on SciPy. Nothing here re-implements what SciPy provides; this module
only shapes the data (per-trajectory clusters, Fisher-z) for SciPy's routines."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import stats

FISHER_CLIP = 0.9999


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (SciPy); NaN when either side is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(stats.spearmanr(x, y).statistic)


def spearman_test(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Spearman rank correlation and its two-sided p-value (SciPy); NaNs when either side is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    result = stats.spearmanr(x, y)
    return float(result.statistic), float(result.pvalue)


def fisher_z(r: np.ndarray) -> np.ndarray:
    """arctanh of correlations clipped to +-0.9999, so that |r| = 1 stays finite."""
    return np.arctanh(np.clip(np.asarray(r, dtype=float), -FISHER_CLIP, FISHER_CLIP))


def fisher_z_mean(r: np.ndarray) -> float:
    """Mean of correlations through Fisher's z (NaNs ignored); NaN if none is finite."""
    z = fisher_z(r)
    z = z[np.isfinite(z)]
    return float(np.tanh(z.mean())) if z.size else float("nan")


def cluster_bootstrap_ratio(numerators: np.ndarray, denominators: np.ndarray, *, seed: int,
                            transform=None, n_resamples: int = 2000,
                            confidence: float = 0.95) -> tuple[float, float]:
    """Percentile interval of sum(numerators) / sum(denominators), resampling clusters.

    One entry per cluster (trajectory): the sum of the token values and the token count,
    so that resampling keeps a trajectory's tokens together (tokens of one trajectory are
    not independent). `transform` maps the ratio (e.g. tanh for Fisher-z means). Uses
    `scipy.stats.bootstrap` with paired resampling. NaNs when fewer than two clusters.
    """
    numerators = np.asarray(numerators, dtype=float)
    denominators = np.asarray(denominators, dtype=float)
    if numerators.size < 2:
        return float("nan"), float("nan")
    transform = transform or (lambda v: v)

    def statistic(num, den, axis=-1):
        with np.errstate(invalid="ignore", divide="ignore"):
            return transform(num.sum(axis=axis) / den.sum(axis=axis))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate (all-equal) clusters: a zero-width interval is right
        result = stats.bootstrap(
            (numerators, denominators), statistic, paired=True, vectorized=True,
            n_resamples=n_resamples, confidence_level=confidence, method="percentile",
            rng=np.random.default_rng(seed),
        )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n - c, k) / C(n, k)
    (Chen et al. 2021), with SciPy's exact binomial coefficients."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    from scipy.special import comb

    return 1.0 - float(comb(n - c, k, exact=True)) / float(comb(n, k, exact=True))


# ---------------------------------------------------------------------------- isolation study
def wilcoxon_p(deltas: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired deltas (SciPy; zero deltas dropped,
    as in Wilcoxon's method). 1.0 when every delta is zero (no evidence of any difference),
    NaN when there is no delta at all."""
    deltas = np.asarray(deltas, dtype=float)
    if deltas.size == 0:
        return float("nan")
    if not np.any(deltas != 0):
        return 1.0
    return float(stats.wilcoxon(deltas).pvalue)


def median_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free interval for the median from order statistics
    (`scipy.stats.quantile_test`); NaNs when there are too few values for the level."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return float("nan"), float("nan")
    interval = stats.quantile_test(values, q=0, p=0.5).confidence_interval(confidence)
    return float(interval.low), float(interval.high)


def wilcoxon_p_rows(deltas: np.ndarray) -> np.ndarray:
    """`wilcoxon_p` of every row of deltas [M, n] -> [M], equal to it row by row. Rows
    with no zero, tied or non-finite delta share one vectorised SciPy call (SciPy picks its
    method from the whole array, so only rows on which it would pick the same method one at
    a time go together); every other row is its own `wilcoxon_p` call."""
    deltas = np.asarray(deltas, dtype=float)
    out = np.empty(deltas.shape[0])
    if deltas.shape[0] == 0 or deltas.shape[1] == 0:
        out[:] = np.nan
        return out
    ordered = np.sort(np.abs(deltas), axis=1)
    clean = (np.isfinite(deltas).all(1) & (deltas != 0).all(1) & (np.diff(ordered, axis=1) != 0).all(1))
    if clean.any():
        out[clean] = stats.wilcoxon(deltas[clean], axis=-1).pvalue
    for row in np.flatnonzero(~clean):
        out[row] = wilcoxon_p(deltas[row])
    return out


def median_interval_rows(values: np.ndarray, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """`median_interval` of every row of values [M, n] -> (low [M], high [M]), equal to it
    row by row: SciPy's interval is a pair of order statistics whose ranks depend on n
    alone, so `quantile_test` runs once, on the ranks 0..n-1, and each sorted row is read
    at the ranks it returns."""
    values = np.asarray(values, dtype=float)
    rows, n = values.shape
    if n == 0 or np.isnan(values).any():   # NaN: one call per row, as `median_interval`
        pairs = [median_interval(row, confidence) for row in values]
        return np.array([p[0] for p in pairs], dtype=float), np.array([p[1] for p in pairs], dtype=float)
    interval = stats.quantile_test(np.arange(n, dtype=float), q=0, p=0.5).confidence_interval(confidence)
    ordered = np.sort(values, axis=1)
    low, high = np.full(rows, np.nan), np.full(rows, np.nan)
    if np.isfinite(interval.low):
        low = ordered[:, int(interval.low)]
    if np.isfinite(interval.high):
        high = ordered[:, int(interval.high)]
    return low, high


def bh_qvalues(p_values: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg step-up adjusted p-values (q-values), SciPy's
    `false_discovery_control`; a hypothesis is rejected at level alpha when q <= alpha."""
    p_values = np.asarray(p_values, dtype=float)
    if p_values.size == 0:
        return p_values
    return stats.false_discovery_control(p_values, method="bh")


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman correlation along the last axis for every leading index: Pearson of
    SciPy's average ranks (`rankdata`). NaN where a side is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    return pearson_rows(stats.rankdata(x, axis=-1), stats.rankdata(y, axis=-1))


def pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation along the last axis for every leading index (`pearsonr` with
    `axis`). NaN where a side is constant."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant rows: NaN is the answer
        return np.asarray(stats.pearsonr(np.asarray(x, dtype=float), np.asarray(y, dtype=float), axis=-1).statistic)


def bootstrap_over_units(statistic, n_units: int, *, seed: int, n_resamples: int = 2000,
                         confidence: float = 0.95, batch: int = 100) -> tuple[float, float]:
    """Percentile interval of `statistic(indices [B, n])` -> [B], resampling unit indices
    with replacement (`scipy.stats.bootstrap`, vectorised, `batch` resamples at a time so
    memory stays bounded). NaNs with fewer than two units or a statistic that is never finite."""
    if n_units < 2:
        return float("nan"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = stats.bootstrap(
            (np.arange(n_units),), lambda idx, axis=-1: statistic(np.atleast_2d(idx)), vectorized=True,
            n_resamples=n_resamples, confidence_level=confidence, method="percentile", batch=batch,
            rng=np.random.default_rng(seed),
        )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def mean_interval(values: np.ndarray, *, seed: int, n_resamples: int = 2000) -> list[float | None]:
    """95% percentile bootstrap interval of the mean over units (None ends when undefined)."""
    values = np.asarray(values, dtype=float)
    low, high = bootstrap_over_units(lambda idx: values[idx].mean(axis=-1), len(values), seed=seed,
                                     n_resamples=n_resamples)
    return [None if np.isnan(low) else low, None if np.isnan(high) else high]


def paired_test(difference: np.ndarray, *, seed: int, n_resamples: int = 2000) -> dict:
    """Paired per-unit differences: their mean, its bootstrap interval, the Wilcoxon p, the count."""
    difference = np.asarray(difference, dtype=float)
    return {"difference": float(difference.mean()), "ci": mean_interval(difference, seed=seed, n_resamples=n_resamples),
            "p_value": wilcoxon_p(difference), "items": int(len(difference))}


def trajectory_interval(frame: pd.DataFrame, value: pd.Series, seed: int, resamples: int,
                        transform=None, confidence: float = 0.95) -> list[float | None]:
    """Percentile bootstrap interval (at `confidence`) of the mean of `value` over the rows of
    `frame`, resampling trajectories (`trajectory_id`): rows of one trajectory stay together."""
    return cluster_interval(frame["trajectory_id"], value, seed, resamples, transform, confidence)


def cluster_interval(cluster: pd.Series, value: pd.Series, seed: int, resamples: int,
                     transform=None, confidence: float = 0.95) -> list[float | None]:
    """Percentile bootstrap interval (at `confidence`) of the mean of `value` over its rows,
    resampling the clusters `cluster` names (problems, or trajectories): a cluster's rows
    stay together. None ends where undefined."""
    keep = value.notna()
    clusters = pd.DataFrame({"tid": cluster[keep], "v": value[keep]}).groupby("tid")["v"]
    low, high = cluster_bootstrap_ratio(clusters.sum().to_numpy(), clusters.count().to_numpy(),
                                              seed=seed, transform=transform, n_resamples=resamples,
                                              confidence=confidence)
    return [None if np.isnan(low) else low, None if np.isnan(high) else high]


MIN_CLUSTERS = 10   # fewer trajectories than this: the bootstrap interval is marked unreliable
