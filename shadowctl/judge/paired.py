"""Paired metrics: the candidate against the primary on the *same* requests, from per-pair log ratios.

Why pairs
---------
In the shadow phase the candidate answers the very requests the primary answers (same
``x-request-id``). An LLM request's latency is mostly the request's own doing (prompt length, output
length): across requests it varies by a factor of e (lognormal sigma about 1), while the server's
share varies by some 20%. Two independent samples carry all of the request's variance; the log
ratio ``d = log(candidate/primary)`` of one request carries only the two servers' noise, so the
same regression is seen with tens of times fewer requests (``bench/judge/paired.py``).

The effect is ``theta = log(candidate/primary)`` as for every relative latency metric, so a margin
"at most 10% slower" is ``log(1.1)`` on either statistic.

Methods
-------
``paired-mean``: the mean of ``d`` (the log of the geometric-mean ratio). Its estimate ``sum d / n``
has variance ``s^2/n`` from exact running sums; the decision is the judge's one-sided normal-mixture
confidence sequence (:func:`shadowctl.judge.sequential.decide`), the time-uniform CLT confidence
sequence of Waudby-Smith et al. (2024): asymptotic like the other metrics, with ``min_samples`` pairs
needed. ``s^2`` is floored at 1e-6 (0.1% per pair) so that identical ratios do not claim certainty.

``paired-median``: the median of ``d``, by a sign test turned into an e-process, which is exact
(non-asymptotic) and needs no variance. If the median of ``d`` is at most ``x`` then, for
independent pairs, each indicator ``1{d_i > x}`` is Bernoulli with ``p <= 1/2`` given the past, and

    E_n(x) = integral over p' in [1/2, 1] of prod_i (2 p')^{1{d_i > x}} (2 (1-p'))^{1{d_i <= x}}  2 dp'
           = 2^(n+1) B(k+1, n-k+1) P(Beta(k+1, n-k+1) > 1/2),      k = #{d_i > x},

(a uniform mixture over the alternatives of the Bernoulli likelihood ratio against 1/2) is a
nonnegative supermartingale of initial value 1 under that null: each factor has conditional mean
``2(p p' + (1-p)(1-p')) <= 1`` for ``p <= 1/2 <= p'``. By Ville's inequality it ever reaches
``1/a`` with probability at most ``a``, however often one looks. So:

* **fail** (direction increase) when ``E_n(0) >= 1/alpha``: more pairs are slower on the candidate
  than a fair coin allows at any look, so the median ratio is above 1;
* **pass** when the mirror test, with ``1{d_i < log(1+m)}`` against "median >= log(1+m)", reaches
  ``1/beta``: the median ratio is below the margin.

``decrease`` mirrors both; ``either`` tests both tails at alpha/2. Inverting the test at every bound
of the layout gives the interval shown in the evidence: a confidence sequence for the median
(Howard & Ramdas 2022). Counts at a threshold that is not a bound of :data:`LOG_RATIO_LE` are taken
at the nearest bound on the side that counts fewer (at most 0.5% of the ratio), so never more.

Both need pairs: a pair where a side lacks the quantity, or failed, is not counted (the evidence
says how many were left out); no pairs is ``nodata``, never a pass.

After a restart
---------------
The controller keeps in `.status` only what the decision needs (:meth:`Paired.to_record`): ``n``,
the sums, and the cumulative counts at the bounds the sign test reads (:func:`decision_bounds`: 0,
the bound below 0, and each margin's) and at a coarse grid. Restored, the pairs before the restart are
known only between two kept bounds (:attr:`Paired.counts_max`). Both statistics are exchangeable in the
pairs, so the e-values and the mean's sequence are exactly those of a controller that never
restarted on the same pairs; only the median's estimate and interval in the evidence widen to the
grid for the restored pairs, each count taken on the side that says less (never more evidence than
the pairs hold).

References
----------
- S. R. Howard, A. Ramdas, J. McAuliffe, J. Sekhon (2021), "Time-uniform, nonparametric,
  nonasymptotic confidence sequences", Annals of Statistics (mixture boundaries for Bernoulli and
  sub-Gaussian processes; the beta-binomial mixture).
- S. R. Howard, A. Ramdas (2022), "Sequential estimation of quantiles with applications to A/B-testing
  and best-arm identification", Bernoulli (quantile confidence sequences from indicator processes).
- I. Waudby-Smith, D. Arbour, R. Sinha, E. H. Kennedy, A. Ramdas (2024), "Time-uniform central limit
  theory and asymptotic confidence sequences", Annals of Statistics.
- G. Shafer, V. Vovk (2019), "Game-Theoretic Foundations for Probability and Finance" (test
  martingales, Ville's inequality).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special

from shadowctl.judge.model import (
    LOG_RATIO_LE,
    Direction,
    FloatArray,
    JudgeInputError,
    MetricResult,
    MetricSpec,
    Outcome,
    Paired,
)
from shadowctl.judge.sequential import CONTINUE, FAIL, PASS, Bounds, IntArray, decide

VAR_FLOOR = 1e-6
"""Smallest per-pair variance of ``d`` the mean's test assumes (a ratio known to 0.1%)."""

NODATA = 3
"""The kernel code for 'too few pairs' (the same as :data:`shadowctl.judge.core.NODATA`)."""


def log_sign_evalue(k: FloatArray, n: FloatArray) -> FloatArray:
    """log E: the uniform-mixture sign-test e-value of ``k`` successes in ``n`` (see the module docstring)."""
    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    a, b = k + 1.0, n - k + 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = special.betainc(b, a, 0.5)  # P(Beta(a, b) > 1/2) = I_{1/2}(b, a)
        out: FloatArray = (n + 1.0) * math.log(2.0) + special.betaln(a, b) + np.log(tail)
    return np.where(n > 0, out, 0.0)


def critical_count(n: FloatArray, level: float) -> FloatArray:
    """The least k with ``E(k, n) >= 1/level`` (``n + 1`` where even k = n is not enough); vectorized."""
    n = np.asarray(n, dtype=np.float64)
    target = -math.log(level)
    lo = np.zeros_like(n)  # E(lo) < target (E(0, n) <= 1)
    hi = n + 1.0  # a sentinel: "never"
    while True:
        open_ = hi - lo > 1
        if not open_.any():
            return hi
        mid = np.floor((lo + hi) / 2.0)
        ok = log_sign_evalue(np.minimum(mid, n), n) >= target
        hi = np.where(open_ & ok, mid, hi)
        lo = np.where(open_ & ~ok, mid, lo)


def _margins(spec: MetricSpec) -> tuple[float, float]:
    if not spec.margin.relative:
        raise JudgeInputError(
            f"metric {spec.name!r}: a paired metric's margin is relative ('10%': the candidate at most 10% "
            f"slower), not {spec.margin}"
        )
    return math.log1p(spec.margin.value), math.log1p(-spec.margin.value)


@dataclass(frozen=True)
class PairedBatch:
    """Decisions for S streams of one paired metric."""

    bounds: Bounds
    code: IntArray
    n: FloatArray
    dropped: FloatArray
    errored: FloatArray
    primary: FloatArray  # geometric mean of the primary's side
    candidate: FloatArray
    slower: FloatArray  # pairs with the candidate slower (d > 0)
    log_e_fail: FloatArray  # the sign test's log e-value towards fail (median only; NaN for the mean)
    log_e_pass: FloatArray
    need: int
    restored: FloatArray | None = None  # pairs restored from `.status` (counted before a controller restart)


def decision_bounds(spec: MetricSpec) -> tuple[float, ...]:
    """The bounds of :data:`LOG_RATIO_LE` at which the decision of ``spec`` reads the cumulative counts:
    0 (slower on the candidate), the bound below 0 (faster), and each margin's (below ``log(1+m)``,
    above ``log(1-m)``). `.status` keeps the counts there, so a restored test decides exactly."""
    m_up, m_down = _margins(spec)
    last = LOG_RATIO_LE.size - 1
    at = {int(np.searchsorted(LOG_RATIO_LE, 0.0, side="left")), int(np.searchsorted(LOG_RATIO_LE, 0.0)) - 1,
          int(np.searchsorted(LOG_RATIO_LE, m_up, side="left")) - 1,
          min(int(np.searchsorted(LOG_RATIO_LE, m_down, side="left")), last)}
    return tuple(float(LOG_RATIO_LE[j]) for j in sorted(at) if 0 <= j < last)


def _stack(rows: Sequence[Paired]) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray | None]:
    counts = np.stack([r.counts for r in rows])
    upper = np.stack([r.upper_counts for r in rows]) if any(r.counts_max is not None for r in rows) else None
    sums = np.asarray([[r.sum, r.sum_sq, r.sum_log_primary, r.sum_log_candidate] for r in rows], dtype=np.float64)
    left = np.asarray([[r.dropped, r.errored, r.restored] for r in rows], dtype=np.float64)
    return counts, sums, left, upper


def _count_above(counts: FloatArray, x: float) -> FloatArray:
    """Per row, #d above x (taken at the nearest bound >= x; give the upper counts: never more)."""
    j = min(int(np.searchsorted(LOG_RATIO_LE, x, side="left")), LOG_RATIO_LE.size - 1)
    out: FloatArray = counts[:, -1] - counts[:, j]
    return out


def _count_below(counts: FloatArray, x: float) -> FloatArray:
    """Per row, #d below x (taken at the nearest bound < x; give the lower counts: never more)."""
    j = int(np.searchsorted(LOG_RATIO_LE, x, side="left")) - 1
    out: FloatArray = counts[:, j] if j >= 0 else np.zeros(counts.shape[0])
    return out


def _at_rank(counts: FloatArray, rank: FloatArray) -> FloatArray:
    """Per row, the value of ``d`` at 1-based ascending ``rank``, interpolated inside its 0.5% bucket."""
    s, b = counts.shape
    idx = np.minimum((counts < rank[:, None]).sum(axis=1), b - 1)
    rows = np.arange(s)
    prev = np.where(idx > 0, counts[rows, np.maximum(idx - 1, 0)], 0.0)
    inside = counts[rows, idx] - prev
    high = LOG_RATIO_LE[idx]
    low = np.where(idx > 0, LOG_RATIO_LE[np.maximum(idx - 1, 0)], LOG_RATIO_LE[0])
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.clip(np.where(inside > 0, (rank - prev) / inside, 1.0), 0.0, 1.0)
    value = np.where(np.isinf(high), low, low + frac * (np.where(np.isinf(high), low, high) - low))
    out: FloatArray = np.where((rank >= 1) & (rank <= counts[:, -1]), value, np.nan)
    return out


def _median_bounds(counts: FloatArray, upper_counts: FloatArray, n: FloatArray,
                   level: float) -> tuple[FloatArray, FloatArray]:
    """The sign test inverted at ``level``: (lower, upper) bounds of the median of ``d`` per row.

    The test of "median <= x" rejects when #(d > x) >= k*, that is for every x below the
    (n - k* + 1)-th smallest d; the lower bound is that order statistic's bucket's lower edge (the
    median lies above it). The upper bound is the upper edge of the bucket of the k*-th smallest.
    Where pairs are known only between bounds, the lower bound places them as low as they may lie
    (``upper_counts``) and the upper bound as high (``counts``): the interval only widens.
    """
    k = critical_count(n, level)
    never = k > n
    r_low = n - k + 1.0
    j_low = (upper_counts < r_low[:, None]).sum(axis=1)  # bucket holding the r_low-th smallest
    lower = np.where((j_low > 0) & ~never, LOG_RATIO_LE[np.maximum(j_low - 1, 0)], -np.inf)
    j_up = (counts < k[:, None]).sum(axis=1)
    upper = np.where(never | (j_up >= counts.shape[1]), np.inf,
                     LOG_RATIO_LE[np.minimum(j_up, counts.shape[1] - 1)])
    return lower, upper


def batch_paired(spec: MetricSpec, rows: Sequence[Paired], *, alpha: float, beta: float) -> PairedBatch:
    """Sequential decisions for S streams of a paired metric (``paired-mean`` or ``paired-median``)."""
    counts, sums, left, upper = _stack(rows)
    return batch_paired_counts(spec, counts, sums, left, alpha=alpha, beta=beta, upper_counts=upper)


def batch_paired_counts(
    spec: MetricSpec, counts: FloatArray, sums: FloatArray, left: FloatArray | None = None, *, alpha: float,
    beta: float, upper_counts: FloatArray | None = None,
) -> PairedBatch:
    """:func:`batch_paired` on arrays: ``counts`` (S, B) cumulative per bound of :data:`LOG_RATIO_LE`;
    ``sums`` (S, 4): sum of d, of d^2, of log primary, of log candidate; ``left`` (S, 2 or 3): dropped,
    errored (and restored from `.status`); ``upper_counts``: where pairs are known only between bounds,
    the cumulative counts with them placed as low as they may lie (``counts`` places them as high;
    None: exact)."""
    if not spec.paired:
        raise JudgeInputError(f"metric {spec.name!r}: statistic {spec.statistic!r} is not judged on pairs")
    m_up, m_down = _margins(spec)
    if left is None:
        left = np.zeros((counts.shape[0], 3))
    restored = left[:, 2] if left.shape[1] > 2 else np.zeros(counts.shape[0])
    hi = counts if upper_counts is None else upper_counts
    n = counts[:, -1]
    direction = spec.direction.value
    with np.errstate(invalid="ignore", divide="ignore"):
        gp = np.exp(sums[:, 2] / n)
        gc = np.exp(sums[:, 3] / n)
    slower = _count_above(hi, 0.0)
    nan = np.full(n.shape, np.nan)
    need = spec.min_samples
    if spec.statistic == "paired-mean":
        with np.errstate(invalid="ignore", divide="ignore"):
            theta = sums[:, 0] / n
            s2 = np.maximum((sums[:, 1] - n * theta * theta) / np.maximum(n - 1.0, 1.0), VAR_FLOOR)
            var = s2 / n
        b = decide(theta, var, direction=direction, margin_up=m_up, margin_down=m_down, tau=m_up,
                   alpha=alpha, beta=beta)
        code = np.where((n >= need) & (n >= 2), b.code, NODATA).astype(np.int64)
        return PairedBatch(b, code, n, left[:, 0], left[:, 1], gp, gc, slower, nan, nan, need, restored)
    a_fail = alpha / 2.0 if direction == "either" else alpha
    lf, uf = _median_bounds(counts, hi, n, a_fail)
    lp, up = _median_bounds(counts, hi, n, beta)
    theta = _at_rank(counts if upper_counts is None else (counts + hi) / 2.0, (n + 1.0) / 2.0)
    fail_target, pass_target = -math.log(a_fail), -math.log(beta)
    e_fail_up = log_sign_evalue(slower, n)
    e_fail_down = log_sign_evalue(_count_below(counts, 0.0), n)
    e_pass_up = log_sign_evalue(_count_below(counts, m_up), n)
    e_pass_down = log_sign_evalue(_count_above(hi, m_down), n)
    if direction == "increase":
        e_fail, e_pass = e_fail_up, e_pass_up
        fail, ok = e_fail >= fail_target, e_pass >= pass_target
    elif direction == "decrease":
        e_fail, e_pass = e_fail_down, e_pass_down
        fail, ok = e_fail >= fail_target, e_pass >= pass_target
    else:
        e_fail, e_pass = np.fmax(e_fail_up, e_fail_down), np.fmin(e_pass_up, e_pass_down)
        fail = (e_fail_up >= fail_target) | (e_fail_down >= fail_target)
        ok = (e_pass_up >= pass_target) & (e_pass_down >= pass_target)
    kernel = np.where(ok, PASS, np.where(fail, FAIL, CONTINUE)).astype(np.int64)
    code = np.where(n >= need, kernel, NODATA).astype(np.int64)
    bounds = Bounds(theta, lf, uf, lp, up, kernel)
    return PairedBatch(bounds, code, n, left[:, 0], left[:, 1], gp, gc, slower, e_fail, e_pass, need, restored)


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return "∞" if x > 0 else ("-∞" if x < 0 else "?")
    return f"{x:.4g}"


def _ratio(theta: float) -> float:
    return math.exp(theta) if math.isfinite(theta) else (math.inf if theta > 0 else 0.0)


def paired_result(spec: MetricSpec, batch: PairedBatch, i: int, *, alpha: float, beta: float,
                  final: bool) -> MetricResult:
    """The :class:`MetricResult` of stream ``i`` of a paired batch (numbers and a sentence)."""
    n, dropped, errored = float(batch.n[i]), int(batch.dropped[i]), int(batch.errored[i])
    left = []
    if dropped:
        left.append(f"{dropped} without the quantity on a side")
    if errored:
        left.append(f"{errored} with a failed side")
    left_out = f"; left out: {', '.join(left)}" if left else ""
    restored = int(batch.restored[i]) if batch.restored is not None else 0
    if restored:
        left_out += f"; {restored} of the pairs counted before a controller restart, restored from .status"
    extra = {"pairs": int(n), "pairsDropped": dropped, "pairsErrored": errored, "candidateSlower": int(batch.slower[i])}
    if restored:
        extra["pairsRestored"] = restored
    code = int(batch.code[i])
    if code == NODATA:
        from shadowctl.judge.core import nodata_result

        why = (f"{int(n)} pairs, {batch.need} needed" if n > 0 else "no pairs yet") + left_out
        res = nodata_result(spec, why, alpha=alpha, beta=beta, n_p=n, n_c=n)
        return _with(res, extra)
    b = batch.bounds
    m_up, m_down = _margins(spec)
    theta = float(b.theta[i])
    lf, uf, lp, up = (float(x[i]) for x in (b.lower_fail, b.upper_fail, b.lower_pass, b.upper_pass))
    d = spec.direction
    if d is Direction.increase:
        lower, upper = lf, up
    elif d is Direction.decrease:
        lower, upper = lp, uf
    else:
        lower, upper = min(lf, lp), max(uf, up)
    median = spec.statistic == "paired-median"
    what = "median" if median else "geometric-mean"
    gp, gc = float(batch.primary[i]), float(batch.candidate[i])
    base = (f"{spec.name} {spec.statistic}: {what} ratio candidate/primary {_fmt(_ratio(theta))} over {int(n)} pairs "
            f"(geometric means {_fmt(gc)} vs {_fmt(gp)}; {int(batch.slower[i])} pairs slower on the candidate"
            f"{left_out})")
    crossed: str | None = None
    threshold: float | None = None
    e_fail, e_pass = float(batch.log_e_fail[i]), float(batch.log_e_pass[i])
    if code == PASS:
        outcome = Outcome.passed
        if d is Direction.decrease:
            crossed, threshold = "lower bound (beta)", _ratio(m_down)
            why = f"lower bound {_fmt(_ratio(lp))} > margin {_fmt(threshold)}"
        elif d is Direction.increase:
            crossed, threshold = "upper bound (beta)", _ratio(m_up)
            why = f"upper bound {_fmt(_ratio(up))} < margin {_fmt(threshold)}"
        else:
            crossed, threshold = "both bounds (beta)", _ratio(m_up)
            why = f"bounds [{_fmt(_ratio(lp))}, {_fmt(_ratio(up))}] inside [{_fmt(_ratio(m_down))}, {_fmt(threshold)}]"
        if median:
            why += f" (sign-test e-value {_fmt(math.exp(e_pass))} >= 1/beta)"
        sentence = f"pass: {base}; {why}, so not worse by the margin {spec.margin} (false-pass risk <= {beta:g})."
    elif code == FAIL:
        outcome = Outcome.failed
        threshold = 1.0
        if median:
            crossed = "sign test (alpha)"
            above = d is Direction.increase or (d is Direction.either and 2 * float(batch.slower[i]) > n)
            why = (f"the median ratio is {'above' if above else 'below'} 1 "
                   f"(sign-test e-value {_fmt(math.exp(e_fail))} >= 1/alpha)")
        elif lf > 0:
            crossed, why = "lower bound (alpha)", f"lower bound {_fmt(_ratio(lf))} > 1"
        else:
            crossed, why = "upper bound (alpha)", f"upper bound {_fmt(_ratio(uf))} < 1"
        sentence = f"fail: {base}; {why}, so the candidate is worse (false-fail risk <= {alpha:g})."
    else:
        outcome = Outcome.inconclusive if final else Outcome.cont
        word = "inconclusive" if final else "continue"
        sentence = (f"{word}: {base}; interval [{_fmt(_ratio(lower))}, {_fmt(_ratio(upper))}] still holds both "
                    f"'not worse' and 'worse by {spec.margin}'.")
    return MetricResult(
        name=spec.name, outcome=outcome, statistic=spec.statistic, direction=d, margin=spec.margin,
        critical=spec.critical, n_primary=n, n_candidate=n, primary_value=gp, candidate_value=gc,
        effect=_ratio(theta), interval=(_ratio(lower), _ratio(upper)), alpha=alpha, beta=beta, crossed=crossed,
        threshold=threshold, sentence=sentence,
        extra=extra | ({"logEValueFail": e_fail, "logEValuePass": e_pass} if median else {}),
    )


def _with(res: MetricResult, extra: dict[str, int]) -> MetricResult:
    from dataclasses import replace

    return replace(res, extra=extra)
