"""Vectorized point estimates and their variances, from binned counts or success/failure counts.

Every function takes a batch of S independent streams (rows) and returns arrays of shape (S,),
so that one call judges a thousand replayed streams or simulation runs at once.

Binned data follow Prometheus: cumulative counts per upper bound ``le``, the last bound ``+Inf``.
Quantiles interpolate linearly inside a bucket, as ``histogram_quantile`` does; the variance of a
quantile estimate uses Woodruff's method (the quantile function's slope between the quantiles at
``q -/+ z*sqrt(q(1-q)/n)``), which needs no density estimate and works on coarse buckets; we take the
steeper one-sided slope so that a bucket bound next to the quantile does not hide the steep side.

Bucket resolution. Interpolation inside a wide bucket can hide most of a shift (a 10% larger p99
inside a (2.5, 5] bucket moves the interpolated p99 by about 3%). So each estimate also carries the
range the statistic can have given the counts (``lo_value``..``hi_value``: the edges of the bucket
holding the quantile, or the means of the lower/upper bucket edges), and a *pass* must hold even at
the unfavourable end of it: coarse buckets can make a pass impossible (then the phase ends
``inconclusive``), never wrong. A *fail* uses the interpolated estimate: both arms are binned the
same way, so under "no difference" their estimates have the same distribution.

An estimate that lands in the ``+Inf`` bucket is only a lower bound of the true value (it is
clamped to the highest finite bound); the ``open_hi`` flag says so, and the decision rule then
refuses to conclude in the direction that would rely on it.

Raw samples are first accumulated into a fixed log-spaced layout (:data:`SKETCH_LE`, 2% wide
buckets from 1e-6 to 1e6) so that memory stays bounded however long a phase runs; relative
resolution of 2% is well below any useful margin and the interpolation error is common to both arms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

_SKETCH_RATIO = 1.02
_SKETCH_MIN = 1e-6
_SKETCH_MAX = 1e6
SKETCH_LE: FloatArray = np.append(
    _SKETCH_MIN * _SKETCH_RATIO ** np.arange(int(np.ceil(np.log(_SKETCH_MAX / _SKETCH_MIN) / np.log(_SKETCH_RATIO))) + 1),
    np.inf,
)
"""Upper bounds of the fixed log-spaced layout raw samples are accumulated into."""

WOODRUFF_Z = 1.96


@dataclass(frozen=True)
class Estimate:
    """Point estimates of one arm for S streams: ``value``, ``var`` (variance of the estimate), ``n``."""

    value: FloatArray
    var: FloatArray
    n: FloatArray
    open_hi: BoolArray  # the true value may be higher than ``value`` (it fell into the +Inf bucket)
    lo_value: FloatArray  # what bucket resolution allows the statistic to be at least (given the counts)
    hi_value: FloatArray  # ... and at most (inf when the +Inf bucket is involved)


def sketch_counts(values: FloatArray, le: FloatArray = SKETCH_LE) -> FloatArray:
    """Cumulative counts of ``values`` per upper bound ``le`` (values equal to a bound count below it)."""
    finite = values[~np.isnan(values)]
    idx = np.searchsorted(le, finite, side="left")
    per_bucket = np.bincount(idx, minlength=le.size).astype(np.float64)
    return np.cumsum(per_bucket)


def lower_bounds(le: FloatArray) -> FloatArray:
    """Lower bound of each bucket: the previous upper bound, and min(0, le[0]) for the first."""
    return np.concatenate(([min(0.0, float(le[0]))], le[:-1]))


def _quantile_at(
    cum: FloatArray, le: FloatArray, lo: FloatArray, q: FloatArray
) -> tuple[FloatArray, BoolArray, FloatArray, FloatArray]:
    """Linear-interpolated quantile per row of ``cum`` (S,B) at levels ``q`` (S,)."""
    s, b = cum.shape
    total = cum[:, -1]
    rank = q * total
    # First bucket whose cumulative count reaches the rank.
    idx = np.minimum((cum < rank[:, None]).sum(axis=1), b - 1)
    rows = np.arange(s)
    upper_cum = cum[rows, idx]
    prev_cum = np.where(idx > 0, cum[rows, np.maximum(idx - 1, 0)], 0.0)
    in_bucket = upper_cum - prev_cum
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(in_bucket > 0, (rank - prev_cum) / in_bucket, 1.0)
    frac = np.clip(frac, 0.0, 1.0)
    low = lo[idx]
    high = le[idx]
    open_hi = np.isinf(high)
    value = np.where(open_hi, low, low + frac * (np.where(open_hi, low, high) - low))
    return value, open_hi, low, high


def quantile_binned(cum: FloatArray, le: FloatArray, q: float, z: float = WOODRUFF_Z) -> Estimate:
    """Quantile ``q`` of each row of cumulative counts ``cum`` (S,B) over bounds ``le`` (B,)."""
    cum = np.atleast_2d(np.asarray(cum, dtype=np.float64))
    lo = lower_bounds(le)
    n = cum[:, -1]
    qs = np.full(n.shape, q)
    value, open_v, b_lo, b_hi = _quantile_at(cum, le, lo, qs)
    with np.errstate(invalid="ignore", divide="ignore"):
        se_p = np.sqrt(q * (1.0 - q) / n)
    # Near a bucket bound the interpolated quantile function has a kink; a centred secant across it
    # averages a flat and a steep slope and understates the variance. So the slope is the largest of
    # the centred secant over q -/+ z*se and the two one-sided secants over one standard error.
    q_lo = np.clip(q - z * se_p, 0.0, 1.0)
    q_hi = np.clip(q + z * se_p, 0.0, 1.0)
    v_lo, _, _, _ = _quantile_at(cum, le, lo, q_lo)
    v_hi, open_h, _, _ = _quantile_at(cum, le, lo, q_hi)
    q_l1 = np.clip(q - se_p, 0.0, 1.0)
    q_h1 = np.clip(q + se_p, 0.0, 1.0)
    v_l1, _, _, _ = _quantile_at(cum, le, lo, q_l1)
    v_h1, _, _, _ = _quantile_at(cum, le, lo, q_h1)
    with np.errstate(invalid="ignore", divide="ignore"):
        centred = (v_hi - v_lo) / (q_hi - q_lo)
        right = np.where(q_h1 > q, (v_h1 - value) / (q_h1 - q), 0.0)
        left = np.where(q_l1 < q, (value - v_l1) / (q - q_l1), 0.0)
        slope = np.fmax(centred, np.fmax(right, left))
        var = slope**2 * q * (1.0 - q) / n
    return Estimate(value=value, var=var, n=n, open_hi=open_v | open_h, lo_value=b_lo, hi_value=b_hi)


def mean_binned(
    cum: FloatArray,
    le: FloatArray,
    sums: FloatArray | None = None,
    sums_sq: FloatArray | None = None,
) -> Estimate:
    """Mean per row from bucket counts; exact when ``sums`` (and ``sums_sq``) are given.

    Without ``sums_sq`` the per-observation variance is taken from the buckets: squared distance of the
    bucket midpoint plus width^2/12 (the spread a bucket hides, assuming values uniform in it).
    """
    cum = np.atleast_2d(np.asarray(cum, dtype=np.float64))
    per = np.diff(cum, axis=1, prepend=0.0)
    lo = lower_bounds(le)
    top = np.isinf(le)
    hi = np.where(top, lo, le)
    mid = (lo + hi) / 2.0
    width_sq = (hi - lo) ** 2
    n = cum[:, -1]
    open_hi = per[:, top].sum(axis=1) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_b = (per * mid).sum(axis=1) / n
        mean = mean_b if sums is None else np.asarray(sums, dtype=np.float64) / n
        if sums is not None and sums_sq is not None:
            ss = np.asarray(sums_sq, dtype=np.float64)
            var_obs = np.maximum(ss / n - mean**2, 0.0) * n / np.maximum(n - 1.0, 1.0)
        else:
            var_obs = (per * ((mid - mean_b[:, None]) ** 2 + width_sq / 12.0)).sum(axis=1) / np.maximum(n - 1.0, 1.0)
        var = var_obs / n
        if sums is None:
            lo_value = (per * lo).sum(axis=1) / n
            hi_value = np.where(open_hi, np.inf, (per * hi).sum(axis=1) / n)
        else:
            lo_value = hi_value = mean
    # With exact sums the +Inf bucket only affects the variance, not the mean itself.
    return Estimate(
        value=mean, var=var, n=n, open_hi=open_hi & (sums is None), lo_value=lo_value, hi_value=hi_value
    )


def rate_counts(failures: FloatArray, totals: FloatArray, *, agreement: bool = False) -> tuple[Estimate, FloatArray]:
    """Failure rate (or agreement = 1 - rate) per row, with a shrunk value for logarithms.

    The variance uses (f+1)/(n+2) instead of f/n, so that zero failures in a short window do not
    claim zero uncertainty (which would let the judge pass after a handful of requests). The second
    return value is that shrunk proportion, used where a logarithm of the rate is needed.
    """
    f = np.asarray(failures, dtype=np.float64)
    n = np.asarray(totals, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = f / n
        shrunk = (f + 1.0) / (n + 2.0)
        var = shrunk * (1.0 - shrunk) / n
    closed = np.zeros(n.shape, dtype=bool)
    if agreement:
        return Estimate(1.0 - p, var, n, closed, 1.0 - p, 1.0 - p), 1.0 - shrunk
    return Estimate(p, var, n, closed, p, p), shrunk
