"""Statistics, built on SciPy. Nothing here re-implements what SciPy provides; this module
only shapes the data (per-trajectory clusters, Fisher-z) for SciPy's routines."""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats

FISHER_CLIP = 0.9999


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (SciPy); NaN when either side is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(stats.spearmanr(x, y).statistic)


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
