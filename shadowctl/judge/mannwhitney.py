"""Mann-Whitney U with the Hodges-Lehmann shift and its interval, computed exactly as order statistics.

Kayenta (and R's ``wilcox.test(conf.int=TRUE)`` with the normal approximation) defines the interval
bounds and the estimate as roots in ``mu`` of the standardized rank statistic of ``x - mu`` against ``y``,
with the tie correction in the variance and a continuity correction of 1/2. As a function of ``mu``
that statistic is a step function: between two consecutive pairwise differences ``x_i - y_j`` the
ranks do not change, so it jumps only at those differences. A root solver (Kayenta's Brent, tolerance
1e-4) therefore lands within its tolerance of one pairwise difference; this module returns that
difference itself, found by counting, never by iterating on a tolerance:

* on an open interval between differences the statistic depends only on ``c``, the number of
  differences above ``mu``, and on the within-arm ties; the bound for quantile ``zq`` is the
  difference at which ``c`` drops below the smallest count whose statistic exceeds ``zq``;
* the estimate is the median of the pairwise differences (the classical Hodges-Lehmann estimate),
  which always lies where the solver's function changes sign or is zero;
* a bound sits *on* a jump, and whether that jump point belongs to the confidence set depends on
  the statistic evaluated at the point itself (where ``x_i - mu`` ties with ``y_j`` and counts one
  half). ``lower_open``/``upper_open`` say that the point is rejected: the set lies strictly beyond
  it. That is what decides a mostly-zero sample, whose bounds and estimate all sit on the jump at 0.

Memory stays O(n + m): for large samples the k-th difference is found by bisection on the value
axis with sorted arrays, then snapped to the exact difference.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from shadowctl.judge.model import FloatArray, JudgeInputError


def _stats() -> ModuleType:
    """scipy.stats, imported on the first fixed-method judgement rather than with the controller: it adds about
    45 MiB to the process over scipy.special (which the sequential judge loads anyway), measured with
    ``resource.getrusage`` (docs/scaling.md, controller memory), and only ``method: fixed`` policies use it."""
    return importlib.import_module("scipy.stats")

_DENSE_LIMIT = 1_000_000
"""Up to this many pairs the differences are materialized and partitioned; above, bisection."""


@dataclass(frozen=True)
class MannWhitney:
    """Result of :func:`mann_whitney`: shift = candidate - primary."""

    u: float
    p_value: float
    estimate: float
    lower: float
    upper: float
    cles: float  # P(candidate > primary) + 0.5 P(equal)
    lower_open: bool = False
    """The point ``lower`` itself is rejected by the test: every shift in the set is above it."""
    upper_open: bool = False
    """The point ``upper`` itself is rejected by the test: every shift in the set is below it."""


def _tie_term(values: FloatArray) -> float:
    counts = np.unique(values, return_counts=True)[1].astype(np.float64)
    return float((counts**3 - counts).sum())


def rank_statistic(mu: float, zq: float, x: FloatArray, y: FloatArray) -> float:
    """Kayenta's standardized statistic of ``x - mu`` against ``y``, minus ``zq`` (its root function).

    Ranks with ties averaged, the tie-corrected variance and a continuity correction of 1/2 toward 0.
    """
    n, m = float(x.size), float(y.size)
    combined = np.concatenate([x - mu, y])
    ranks = _stats().rankdata(combined)
    dz = float(ranks[: x.size].sum()) - n * (n + 1) / 2 - n * m / 2
    sigma = math.sqrt(n * m / 12 * ((n + m + 1) - _tie_term(combined) / ((n + m) * (n + m - 1))))
    if sigma == 0:
        raise JudgeInputError("Mann-Whitney: all observations are tied, no interval exists")
    return (dz - 0.5 * float(np.sign(dz))) / sigma - zq


def _kth_dense(x: FloatArray, y: FloatArray, k: int) -> float:
    diffs = np.subtract.outer(x, y).ravel()
    return float(np.partition(diffs, k - 1)[k - 1])


def _count_at_most(x: FloatArray, y_sorted: FloatArray, value: float) -> int:
    # pairs with x_i - y_j <= value  <=>  y_j >= x_i - value
    return int((y_sorted.size - np.searchsorted(y_sorted, x - value, side="left")).sum())


def _kth_bisect(x: FloatArray, y_sorted: FloatArray, k: int) -> float:
    lo = float(x.min() - y_sorted[-1])
    hi = float(x.max() - y_sorted[0])
    if _count_at_most(x, y_sorted, lo) >= k:
        return lo
    for _ in range(200):  # invariant: count(<= lo) < k <= count(<= hi)
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if _count_at_most(x, y_sorted, mid) >= k:
            hi = mid
        else:
            lo = mid
    # the k-th difference is the smallest difference above lo
    idx = np.searchsorted(y_sorted, x - lo, side="left") - 1
    ok = idx >= 0
    return float((x[ok] - y_sorted[idx[ok]]).min())


def kth_difference(x: FloatArray, y_sorted: FloatArray, k: int) -> float:
    """The k-th smallest (1-based) of all differences ``x_i - y_j`` (``y_sorted`` ascending)."""
    if x.size * y_sorted.size <= _DENSE_LIMIT:
        return _kth_dense(x, y_sorted, k)
    return _kth_bisect(x, y_sorted, k)


def _smallest_count_above(t: float, nm: int) -> int:
    """The smallest count c of differences above mu whose corrected statistic c - nm/2 -+ 1/2 exceeds t."""
    half = nm / 2.0
    if t >= 0:
        return math.floor(half + 0.5 + t) + 1
    return math.floor(half - 0.5 + t) + 1


def _bound(x: FloatArray, y_sorted: FloatArray, zq: float, sigma_open: float) -> float:
    """Where the statistic minus zq changes sign: Kayenta's root, as the exact pairwise difference."""
    nm = x.size * y_sorted.size
    mu_min = float(x.min() - y_sorted[-1])
    mu_max = float(x.max() - y_sorted[0])
    if rank_statistic(mu_min, zq, x, y_sorted) <= 0:
        return mu_min
    if rank_statistic(mu_max, zq, x, y_sorted) >= 0:
        return mu_max
    c = _smallest_count_above(zq * sigma_open, nm)
    k = min(max(nm - c + 1, 1), nm)
    return kth_difference(x, y_sorted, k)


def mann_whitney(primary: FloatArray, candidate: FloatArray, confidence: float = 0.98) -> MannWhitney:
    """Two-sided Mann-Whitney U test with the Hodges-Lehmann shift and its confidence interval.

    When both arms are constant (Kayenta adds tiny Gaussian noise there to break the ties), every
    pairwise difference is the same number: the estimate and both bounds are that difference.
    """
    if not 0 < confidence < 1:
        raise JudgeInputError(f"Mann-Whitney: confidence must be in (0, 1), got {confidence}")
    x = np.asarray(candidate, dtype=np.float64)
    y = np.sort(np.asarray(primary, dtype=np.float64))
    n, m = x.size, y.size
    if n == 0 or m == 0:
        raise JudgeInputError("Mann-Whitney needs at least one value per arm")
    nm = n * m
    at_most = _count_at_most(x, y, 0.0)  # pairs with x_i <= y_j
    below = int((m - np.searchsorted(y, x, side="right")).sum())  # pairs with x_i < y_j
    u = float(nm - at_most) + 0.5 * float(at_most - below)
    cles = u / nm
    if np.unique(x).size == 1 and np.unique(y).size == 1:
        d = float(x[0] - y[0])
        return MannWhitney(u=u, p_value=float("nan"), estimate=d, lower=d, upper=d, cles=cles)
    stats = _stats()
    res = stats.mannwhitneyu(x, y, alternative="two-sided", method="asymptotic")
    estimate = 0.5 * (kth_difference(x, y, (nm + 1) // 2) + kth_difference(x, y, nm // 2 + 1))
    sigma_open = math.sqrt(nm / 12 * ((n + m + 1) - (_tie_term(x) + _tie_term(y)) / ((n + m) * (n + m - 1))))
    z = float(stats.norm.ppf(1.0 - (1.0 - confidence) / 2.0))
    lower = _bound(x, y, z, sigma_open)
    upper = _bound(x, y, -z, sigma_open)
    return MannWhitney(
        u=u, p_value=float(res.pvalue), estimate=estimate, lower=lower, upper=upper, cles=cles,
        lower_open=rank_statistic(lower, z, x, y) > 0, upper_open=rank_statistic(upper, -z, x, y) < 0,
    )
