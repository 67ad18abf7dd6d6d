"""Vectorized point estimates and their variances, from binned counts or success/failure counts.

Every function takes a batch of S independent streams (rows) and returns arrays of shape (S,),
so that one call judges a thousand replayed streams or simulation runs at once.

Binned data follow Prometheus: cumulative counts per upper bound ``le``, the last bound ``+Inf``.
Inside the bucket holding the median a quantile interpolates linearly, as ``histogram_quantile``
does. In the tails it does not: latency tails (lognormal, Pareto-like) are close to straight lines in
log(survival) against log(x), and Prometheus buckets are wide there (vLLM: 2.5, 5, 10 s). So in a
bucket wholly above the median the survival count is interpolated along a power law between the
bucket's edges (below the median, the cumulative count). On lognormal latency (sigma 0.6) binned on
vLLM's bounds the p99 is then 3.9 s against a true 4.0 s, where linear interpolation says 4.7 s and,
worse, moves by a fraction of a real shift: a +30% p99 regression went from ~30% to ~95% detected
within 10 minutes in ``bench/judge`` when this was introduced. Both arms are binned the same way,
so under "no difference" their estimates still have the same distribution.
The variance of a quantile estimate uses Woodruff's method (the quantile function's slope between
the quantiles at ``q -/+ z*sqrt(q(1-q)/n)``), which needs no density estimate and works on coarse
buckets; we take the steeper one-sided slope so that a bucket bound next to the quantile does not
hide the steep side. A mean's variance takes within-bucket moments from the same model
(:func:`bucket_moments`).

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
    _SKETCH_MIN
    * _SKETCH_RATIO ** np.arange(int(np.ceil(np.log(_SKETCH_MAX / _SKETCH_MIN) / np.log(_SKETCH_RATIO))) + 1),
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


def _power_tail_value(
    a: FloatArray, b: FloatArray, mass_a: FloatArray, mass_b: FloatArray, target: FloatArray
) -> tuple[FloatArray, BoolArray]:
    """Where a power law through (a, mass_a) and (b, mass_b) reaches ``target``, in log-log space.

    ``mass`` is a survival count (upper tail) or a cumulative count (lower tail); either way
    ``log mass`` is taken to be linear in ``log x`` inside the bucket. Returns the value and whether
    the power law applies (both edges positive and finite, both masses positive and different).
    """
    ok = (a > 0) & np.isfinite(b) & (b > a) & (mass_a > 0) & (mass_b > 0) & (mass_a != mass_b) & (target > 0)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        sa, sb, st = (np.where(ok, v, 1.0) for v in (a, b, target))
        ma, mb = np.where(ok, mass_a, 2.0), np.where(ok, mass_b, 1.0)
        t = np.log(ma / st) / np.log(ma / mb)  # 0 at a, 1 at b
        value = sa * np.exp(np.clip(t, 0.0, 1.0) * np.log(sb / sa))
    return value, ok


def _quantile_at(
    cum: FloatArray, le: FloatArray, lo: FloatArray, q: FloatArray
) -> tuple[FloatArray, BoolArray, FloatArray, FloatArray]:
    """Quantile per row of ``cum`` (S,B) at levels ``q`` (S,): linear in the median's bucket, a power law in the tails."""
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
    # Tail buckets (wholly above or below the median): latency tails are close to straight lines in
    # log-log survival (lognormal, Pareto), so interpolate along a power law there; see the module docstring.
    upper = prev_cum >= total / 2.0
    lower = upper_cum <= total / 2.0
    v_up, ok_up = _power_tail_value(low, high, total - prev_cum, total - upper_cum, total - rank)
    v_dn, ok_dn = _power_tail_value(low, high, prev_cum, upper_cum, rank)
    value = np.where(upper & ok_up & ~open_hi, v_up, np.where(lower & ok_dn & ~open_hi, v_dn, value))
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


def _power_moments(a: FloatArray, b: FloatArray, c: FloatArray) -> tuple[FloatArray, FloatArray]:
    """First and second moments of a density proportional to x**c on [a, b] (0 < a < b < inf)."""
    log_r = np.log(b / a)

    def g(e: FloatArray) -> FloatArray:  # integral of t**(e-1) over [1, r]: (r**e - 1)/e, log r at e = 0
        small = np.abs(e * log_r) < 1e-8
        safe = np.where(small, 1.0, e)
        return np.where(small, log_r, np.expm1(np.clip(safe * log_r, -700.0, 700.0)) / safe)

    base = g(c + 1.0)
    return a * g(c + 2.0) / base, a * a * g(c + 3.0) / base


def bucket_moments(cum: FloatArray, le: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Mean and second moment of the values inside each bucket (S,B), under the tail model.

    Inside the bucket holding the median values are taken as uniform; in a bucket wholly above the
    median the survival count follows a power law between the bucket's edges (density ~ x**(-k-1)),
    below it the cumulative count does (density ~ x**(k-1)), as in :func:`quantile_binned`. Bucket
    midpoints instead overstate the variance of a lognormal latency by ~40% on vLLM's bounds (their
    wide tail buckets hold values near their lower edges), which slows every decision on means.
    The open-ended buckets continue the power law of their neighbour (see the code).
    """
    s, nb = cum.shape
    per = np.diff(cum, axis=1, prepend=0.0)
    total = cum[:, -1:]
    prev = cum - per
    lo = np.broadcast_to(lower_bounds(le), (s, nb))
    hi = np.broadcast_to(le, (s, nb))
    finite = np.isfinite(hi)
    top = np.where(finite, hi, lo)
    e1 = (lo + top) / 2.0
    e2 = e1**2 + (top - lo) ** 2 / 12.0
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        pos = (lo > 0) & finite & (per > 0)
        sa, sb = total - prev, total - cum  # survival counts at the edges
        up = pos & (prev >= total / 2.0) & (sb > 0)
        dn = pos & (cum <= total / 2.0) & (prev > 0)
        k_up = np.log(np.where(up, sa / sb, 2.0)) / np.log(np.where(pos, top / lo, 2.0))
        k_dn = np.log(np.where(dn, cum / prev, 2.0)) / np.log(np.where(pos, top / lo, 2.0))
        c = np.where(up, -k_up - 1.0, k_dn - 1.0)
        m1, m2 = _power_moments(np.where(pos, lo, 1.0), np.where(pos, top, 2.0), c)
        model = (up | dn) & np.isfinite(m1) & np.isfinite(m2)
        e1 = np.where(model, m1, e1)
        e2 = np.where(model, m2, e2)
        # Open-ended buckets continue the neighbouring power law: the first bucket (0, b] as
        # F ~ x**k, the +Inf bucket as a Pareto tail S ~ x**(-k) (k at least 2.5, so both moments exist).
        e1, e2 = e1.copy(), e2.copy()
        if nb >= 3 and lo[0, 0] == 0.0 and hi[0, 0] > 0:
            b0, b1 = hi[0, 0], hi[0, 1]
            f0, f1 = cum[:, 0], cum[:, 1]
            ok0 = (f0 > 0) & (f1 > f0) & (f1 <= total[:, 0] / 2.0) & np.isfinite(b1)
            k0 = np.log(np.where(ok0, f1 / f0, 2.0)) / np.log(b1 / b0 if np.isfinite(b1) else 2.0)
            e1[:, 0] = np.where(ok0, b0 * k0 / (k0 + 1.0), e1[:, 0])
            e2[:, 0] = np.where(ok0, b0 * b0 * k0 / (k0 + 2.0), e2[:, 0])
        if nb >= 2 and not np.isfinite(le[-1]):
            a_inf = lo[:, -1]
            k_last = np.where(up[:, -2], k_up[:, -2], 4.0)
            k_inf = np.fmax(k_last, 2.5)
            e1[:, -1] = a_inf * k_inf / (k_inf - 1.0)
            e2[:, -1] = a_inf * a_inf * k_inf / (k_inf - 2.0)
    return e1, e2


def mean_binned(
    cum: FloatArray,
    le: FloatArray,
    sums: FloatArray | None = None,
    sums_sq: FloatArray | None = None,
) -> Estimate:
    """Mean per row from bucket counts; exact when ``sums`` (and ``sums_sq``) are given.

    Without ``sums_sq`` the per-observation variance comes from the buckets under the tail model of
    :func:`bucket_moments` (within-bucket spread included).
    """
    cum = np.atleast_2d(np.asarray(cum, dtype=np.float64))
    per = np.diff(cum, axis=1, prepend=0.0)
    lo = lower_bounds(le)
    top = np.isinf(le)
    hi = np.where(top, lo, le)
    n = cum[:, -1]
    open_hi = per[:, top].sum(axis=1) > 0
    e1, e2 = bucket_moments(cum, le)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_b = (per * e1).sum(axis=1) / n
        mean = mean_b if sums is None else np.asarray(sums, dtype=np.float64) / n
        if sums is not None and sums_sq is not None:
            ss = np.asarray(sums_sq, dtype=np.float64)
            var_obs = np.maximum(ss / n - mean**2, 0.0) * n / np.maximum(n - 1.0, 1.0)
        else:
            second = (per * e2).sum(axis=1) / n
            var_obs = np.maximum(second - mean_b**2, 0.0) * n / np.maximum(n - 1.0, 1.0)
        var = var_obs / n
        if sums is None:
            lo_value = (per * lo).sum(axis=1) / n
            hi_value = np.where(open_hi, np.inf, (per * hi).sum(axis=1) / n)
        else:
            lo_value = hi_value = mean
    # With exact sums the +Inf bucket only affects the variance, not the mean itself.
    return Estimate(value=mean, var=var, n=n, open_hi=open_hi & (sums is None), lo_value=lo_value, hi_value=hi_value)


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
